"""Where the time goes: torch-profiler breakdown of one scoring pass and one training step of R3Mem and RMT.

Each case runs once to warm up, then once under ``torch.profiler``; the self CPU time of every operator is put in
a category (GEMMs, attention, log-softmax / cross-entropy over the vocabulary, copies and dtype casts,
element-wise, other) and the wall time not covered by operators (divided over the threads) is reported as
"python and framework". Writes ``results/benchmarks/profile.json`` and a Markdown table ``profile.md``.

    nice -n 10 python benchmarks/profile_steps.py                       # SmolLM2-135M, 2 threads
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RMT_TRAINING, model_parser, setup, write_result

CATEGORIES = {  # first match wins; names are torch operator names
    "gemm": ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::baddbmm"),
    "attention": ("scaled_dot_product", "aten::_softmax", "aten::softmax", "flash_attention"),
    "log-softmax / cross-entropy": ("log_softmax", "nll_loss", "cross_entropy"),
    "copies and casts": ("aten::copy_", "aten::_to_copy", "aten::to", "aten::cat", "aten::clone", "aten::contiguous",
                         "aten::index", "aten::stack", "aten::expand", "aten::fill_", "aten::empty", "aten::zeros"),
    "element-wise": ("aten::mul", "aten::add", "aten::sub", "aten::div", "aten::silu", "aten::rsqrt", "aten::pow",
                     "aten::mean", "aten::neg", "aten::cos", "aten::sin", "aten::sum", "aten::where"),
}


def category(name: str) -> str:
    for cat, keys in CATEGORIES.items():
        if any(k in name for k in keys):
            return cat
    return "other operators"


def profile(fn, threads: int) -> dict:
    """Run ``fn`` once to warm up, then once under the profiler: wall seconds and self CPU seconds by category."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    fn()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        fn()
        wall = time.perf_counter() - t0
    by_cat: dict[str, float] = {}
    for evt in prof.key_averages():
        by_cat[category(evt.key)] = by_cat.get(category(evt.key), 0.0) + evt.self_cpu_time_total / 1e6
    op_wall = sum(by_cat.values()) / threads  # operators run on `threads` threads at best
    by_cat["python and framework"] = max(0.0, wall - op_wall)
    total = sum(by_cat.values())
    return {"wall_s": wall, "seconds": by_cat, "share": {k: v / total for k, v in by_cat.items()}}


def cases(model: str, threads: int):
    """(name, callable) of each profiled case, built once."""
    import torch

    from r3mem_bench.methods import get_method_class
    from r3mem_bench.methods.reference import _batched_nll
    from r3mem_bench.models import load_model
    from r3mem_bench.train import TrainingData, bf16_training

    lm = load_model(model, threads=threads)
    data = TrainingData("wiki_train*2+pydoc_train+shakespeare", lm.tokenizer, 128, 4)
    rows = [(torch.cat([torch.tensor([lm.prefix_token_id]), seg]), 128) for seg in data.sample(0, 0, 0)]
    r3 = get_method_class("r3mem")(lm, {})
    rmt = get_method_class("rmt")(lm, {})
    torch.manual_seed(0)
    rmt_train = get_method_class("rmt")(lm, {"for_training": True, **RMT_TRAINING,
                                             "segment_len": 128, "train_segments": 4})
    rmt_train.train(True)
    r3_train = get_method_class("r3mem")(lm, {"for_training": True, "lora_r": 16, "lora_alpha": 32,
                                              "train_segments": 3, "level_probs": [1.0, 0.0, 0.0],
                                              "train_memory_sizes": [16], "train_memory_probs": [1.0]})
    r3_train.train(True)
    rmt_bf16, r3_bf16 = bf16_training(rmt_train), bf16_training(r3_train)  # as `train --precision bf16` runs

    def score_no_memory():
        _batched_nll(lm, rows, 4)

    def score_r3mem():
        r3.reset()
        for seg in data.sample(0, 0, 0):
            r3.score_segment(seg)

    def score_rmt():
        rmt.reset()
        for seg in data.sample(0, 0, 0):
            rmt.score_segment(seg)

    def train_rmt():
        batch = data.batch(0, 1, 0, 4)
        with rmt_bf16():
            loss = rmt_train.training_losses(batch)["loss"]
        loss.backward()

    def train_r3mem():
        torch.manual_seed(0)
        r3_train.train_step = 10**6  # past any warm-up: every loss
        with r3_bf16():
            loss = r3_train.training_losses(data.batch(0, 2, 0, 4)[:3])["loss"]
        loss.backward()

    return [("score no_memory (4 x 129 tokens, batch 4)", score_no_memory),
            ("score r3mem (4 segments of 128)", score_r3mem),
            ("score rmt (4 segments of 128)", score_rmt),
            ("train rmt step (bf16, 4 samples x 4 segments)", train_rmt),
            ("train r3mem step (bf16, 4 samples x 3 segments, document level, M = 16, every loss)", train_r3mem)]


def main(argv: list[str] | None = None) -> int:
    args = model_parser(__doc__).parse_args(argv)
    setup(args.threads)
    results = {}
    for name, fn in cases(args.model, args.threads):
        results[name] = profile(fn, args.threads)
        print(f"{name}: {results[name]['wall_s']:.2f} s", flush=True)
    path = write_result("profile", {"model": args.model, "threads": args.threads, "cases": results}, args.out)
    cats = list(CATEGORIES) + ["other operators", "python and framework"]
    lines = ["| case | wall s | " + " | ".join(cats) + " |", "|---|---:|" + "---:|" * len(cats)]
    for name, r in results.items():
        lines.append(f"| {name} | {r['wall_s']:.2f} | " + " | ".join(f"{100 * r['share'].get(c, 0):.0f}%" for c in cats)
                     + " |")
    md = path.with_suffix(".md")
    md.write_text(f"Share of time by kind of work ({args.model}, {args.threads} threads; `python "
                  f"benchmarks/profile_steps.py`). Operator shares are self CPU time; 'python and framework' is "
                  "the wall time not covered by operators.\n\n" + "\n".join(lines) + "\n")
    print(f"wrote {path} and {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
