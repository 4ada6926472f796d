"""How far bf16 training's gradients lie from float32's: one RMT training sample (4 samples x 4 segments of 128
tokens, SmolLM2-135M, the benchmark's LoRA settings) in float32, in eager bf16 (``train --precision bf16``) and
compiled bf16 (``train --precision bf16 --compile``), from the same weights (LoRA B drawn nonzero, so every adapter
matrix gets a gradient). Reports each bf16 variant's loss, the relative error of its gradient against float32's
(||g - g32|| / ||g32|| over all trained tensors), their cosine and the share of gradient entries whose sign differs.
Writes ``results/benchmarks/grad_precision.json``.

    nice -n 10 python benchmarks/grad_precision.py
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RMT_TRAINING, model_parser, setup, write_result


def main(argv: list[str] | None = None) -> int:
    args = model_parser(__doc__).parse_args(argv)
    setup(args.threads)
    import torch

    from r3mem_bench.methods import get_method_class
    from r3mem_bench.models import load_model
    from r3mem_bench.train import TrainingData, bf16_training

    lm = load_model(args.model, threads=args.threads)
    batch = TrainingData("wiki_train*2+pydoc_train+shakespeare", lm.tokenizer, 128, 4).batch(0, 1, 0, 4)

    def build():
        torch.manual_seed(0)
        m = get_method_class("rmt")(lm, {"for_training": True, **RMT_TRAINING,
                                         "segment_len": 128, "train_segments": 4})
        m.train(True)
        with torch.no_grad():
            for name, p in m.trainable_parameters().items():
                if "lora_B" in name:
                    p.normal_(0, 0.01)
        return m

    def loss_and_grads(m, context) -> tuple[float, dict]:
        with context():
            loss = m.training_losses(batch)["loss"]
        loss.backward()
        return float(loss.detach()), {n: p.grad.detach().float().clone()
                                      for n, p in m.trainable_parameters().items() if p.grad is not None}

    ref_loss, ref = loss_and_grads(build(), contextlib.nullcontext)
    ref_norm = sum(float(g.norm() ** 2) for g in ref.values()) ** 0.5
    rows = {}
    for variant in ("eager bf16", "compiled bf16"):
        m = build()
        context = bf16_training(m)
        if variant.startswith("compiled"):
            m.compile_for_training()
        loss, grads = loss_and_grads(m, context)
        norm = sum(float(g.norm() ** 2) for g in grads.values()) ** 0.5
        rows[variant] = {
            "loss": loss, "loss_relative_difference": abs(loss - ref_loss) / ref_loss,
            "grad_relative_error": sum(float((grads[n] - ref[n]).norm() ** 2) for n in ref) ** 0.5 / ref_norm,
            "grad_cosine": sum(float((grads[n] * ref[n]).sum()) for n in ref) / (norm * ref_norm),
            "grad_sign_flips": sum(int(((grads[n] > 0) != (ref[n] > 0)).sum()) for n in ref)
            / sum(g.numel() for g in ref.values())}
        print(variant, {k: round(v, 5) for k, v in rows[variant].items()}, flush=True)
    path = write_result("grad_precision", {"model": args.model, "threads": args.threads, "float32_loss": ref_loss,
                                           "variants": rows}, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
