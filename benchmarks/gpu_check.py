"""GPU check (run it whenever a CUDA machine is available): vLLM against HF on the same prompts and weights.

* greedy answers of vLLM and HF on ``--prompts`` needle questions (chat template, gold passages as context):
  the agreement rate of the answer texts (bf16/fp16 kernels differ, so a few answers may differ);
* generation throughput (new tokens/s, questions/s) of both backends at batch 1, 16 and 64;
* R3Mem training-step time on the GPU (``--train-steps`` steps of the shipped stage-2 recipe from scratch).

Writes ``results/benchmarks/gpu_check.json``. Without CUDA and vllm it exits 2 with one line saying so.

    python benchmarks/gpu_check.py                         # SmolLM2-135M
    python benchmarks/gpu_check.py --model HuggingFaceTB/SmolLM2-1.7B-Instruct --prompts 50
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_result
from throughput import qa_prompts

BATCHES = (1, 16, 64)


def timed_generate(gen, prompts: list[str], batch: int) -> dict:
    """Answers and rates of ``gen`` over ``prompts``, submitted ``batch`` at a time."""
    t0, out = time.perf_counter(), []
    for start in range(0, len(prompts), batch):
        out.extend(gen.generate(prompts[start: start + batch]))
    seconds = time.perf_counter() - t0
    new = sum(g.new_tokens for g in out)
    return {"batch_size": batch, "seconds": round(seconds, 3), "questions_per_s": len(out) / seconds,
            "new_tokens_per_s": new / seconds, "answers": [g.text for g in out]}


def train_step_seconds(model: str, steps: int) -> dict:
    """Seconds per step of R3Mem's stage-2 recipe (3 x 128-token segments, one sample per step) on this device."""
    from r3mem_bench.train import TrainConfig, train

    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(method="r3mem", model=model, steps=steps + 1, output=tmp, segment_len=128, segments=3,
                          warmup=1, checkpoint_every=10_000, method_options={"lora_r": 16, "lora_alpha": 32})
        train(cfg, stop_after=steps + 1, quiet=True)
        import json

        log = [json.loads(x) for x in (Path(tmp) / "train_log.jsonl").read_text().splitlines()]
    timed = [r["seconds"] for r in log[1:]]  # the first step includes warm-up (kernels, allocator)
    return {"steps": len(timed), "seconds_per_step": sum(timed) / len(timed), "first_step_s": log[0]["seconds"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompts", type=int, default=50)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--train-steps", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from r3mem_bench.vllm_backend import vllm_unavailable_reason

    reason = vllm_unavailable_reason()
    if reason:
        print(f"gpu_check: {reason}; fix: run it on a CUDA machine with `pip install -e '.[gpu]'`", file=sys.stderr)
        return 2
    import torch

    from r3mem_bench.generation import HFGenerator
    from r3mem_bench.models import load_model
    from r3mem_bench.vllm_backend import VLLMGenerator

    lm = load_model(args.model)
    prompts = qa_prompts(lm, args.prompts)
    hf, vl = HFGenerator(lm, max_new_tokens=args.max_new_tokens), VLLMGenerator(lm, max_new_tokens=args.max_new_tokens)
    vl.generate(prompts[:2])  # start the engine (CUDA graphs) before timing
    runs = {"hf": [timed_generate(hf, prompts, b) for b in BATCHES], "vllm": [timed_generate(vl, prompts, b) for b in BATCHES]}
    hf_answers, vl_answers = runs["hf"][0]["answers"], runs["vllm"][-1]["answers"]
    agree = sum(a == b for a, b in zip(hf_answers, vl_answers)) / len(prompts)
    payload = {"model": args.model, "device": torch.cuda.get_device_name(0), "dtype": lm.info["dtype"],
               "prompts": len(prompts), "max_new_tokens": args.max_new_tokens,
               "greedy_agreement_vllm_vs_hf": agree,
               "generation": {k: [{f: v for f, v in r.items() if f != "answers"} for r in rs] for k, rs in runs.items()},
               "disagreements": [{"hf": a, "vllm": b} for a, b in zip(hf_answers, vl_answers) if a != b][:10],
               "r3mem_training": train_step_seconds(args.model, args.train_steps)}
    print(write_result("gpu_check", payload, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
