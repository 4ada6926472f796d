"""Streaming cost: seconds per segment and memory-state bytes vs history length (1K to 64K tokens) for every
registered LM method.

Each method streams one long token sequence (WikiText-2 test articles joined) segment by segment through
``score_segment``, as the LM protocol's default ``score_stream`` does, and after every segment we record its wall
time and ``state_bytes()``; the series reports, at each history length H, the median time of the segments around
H. ``full_context`` keeps no state between ``score_segment`` calls (it scores whole documents in one pass), so its
per-segment cost at history H is measured as what a streaming full-context scorer pays: one forward pass over
the new segment plus as much history as fits the model's window (``max_context``), with the KV bytes of that
window as its state. Expected shape: R3Mem and RMT flat, full_context growing until the window is full, then flat
(it truncates), vector RAG storage growing linearly. Trainable methods run with ``untrained=true`` when the
model has no checkpoint (cost does not depend on the weights' values).

    nice -n 10 python benchmarks/streaming_cost.py                          # tiny-random, 512-token segments
    nice -n 10 python benchmarks/streaming_cost.py --methods r3mem,rmt --max-history 16384 --out /tmp/s.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import lm_docs, lm_task, median, plot, setup, slope, write_result


def token_stream(lm, n: int):
    """At least ``n`` token ids of WikiText-2 test articles, joined with blank lines."""
    import torch

    task = lm_task(0)
    ids: list[int] = []
    for doc in lm_docs(task, lm.tokenizer, 10_000):
        ids += lm.tokenizer(doc["text"] + "\n\n", add_special_tokens=False)["input_ids"]
        if len(ids) >= n:
            break
    return torch.tensor(ids[:n], dtype=torch.long)


def build(lm, name: str):
    """The method with default options (``untrained=true`` for trainable methods without a checkpoint)."""
    from r3mem_bench.errors import UserError
    from r3mem_bench.methods import get_method_class

    cls = get_method_class(name)
    try:
        return cls(lm, {}), {}
    except UserError:
        if not getattr(cls, "trainable", False):
            raise
        return cls(lm, {"untrained": True}), {"untrained": True}


def stream_method(method, ids, segment_len: int, budget_s: float) -> tuple[list[float], list[int]]:
    """Per-segment seconds and state bytes of one stream (stops early when ``budget_s`` is spent)."""
    method.begin("streaming-cost")
    method.reset()
    seconds, states = [], []
    start = time.perf_counter()
    for s in range(0, ids.numel() - segment_len + 1, segment_len):
        t0 = time.perf_counter()
        method.score_segment(ids[s: s + segment_len])
        seconds.append(time.perf_counter() - t0)
        states.append(int(method.state_bytes()))
        if time.perf_counter() - start > budget_s:
            break
    return seconds, states


def full_context_point(method, ids, history: int, segment_len: int) -> tuple[float, int]:
    """Seconds and KV bytes of scoring the segment after ``history`` tokens with as much history as fits."""
    keep = min(history, method.max_context - 1 - segment_len)
    hist, seg = ids[history - keep: history], ids[history: history + segment_len]
    method.reset()
    t0 = time.perf_counter()
    method.score_stream([hist, seg])
    return time.perf_counter() - t0, int(method.segment_state_bytes[-1])


def main(argv: list[str] | None = None) -> int:
    """Measure every LM method and write results/benchmarks/streaming_cost.json (+ PNG plots)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-random")
    ap.add_argument("--methods", default="", help="comma separated (default: every method of the lm family)")
    ap.add_argument("--segment-len", type=int, default=512)
    ap.add_argument("--max-history", type=int, default=65536)
    ap.add_argument("--budget-s", type=float, default=50.0, help="wall-clock cap per method")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    setup(args.threads)
    from r3mem_bench.methods import all_methods
    from r3mem_bench.models import load_model

    lm = load_model(args.model, threads=args.threads)
    names = [m for m in args.methods.split(",") if m] or [n for n, c in all_methods().items() if "lm" in c.families]
    S = args.segment_len
    ids = token_stream(lm, args.max_history + S)
    points = [h for h in (2 ** k for k in range(10, 17)) if h <= args.max_history]
    results, series_t, series_b = {}, {}, {}
    for name in names:
        method, opts = build(lm, name)
        t0 = time.perf_counter()
        if name == "full_context":
            full_context_point(method, ids, points[0], S)  # warm-up
            rows = [full_context_point(method, ids, h, S) for h in points]
            hist, secs, states = points, [r[0] for r in rows], [r[1] for r in rows]
            reached = points[-1]
        else:
            seconds, state_series = stream_method(method, ids, S, args.budget_s)
            reached = len(seconds) * S
            hist, secs, states = [], [], []
            for h in points:
                k = h // S  # the segment that starts after h tokens of history
                if k >= len(seconds):
                    break
                hist.append(h)
                secs.append(median(seconds[max(0, k - 1): k + 2]))
                states.append(state_series[k])
        wall = time.perf_counter() - t0
        per_1k = [h / 1024 for h in hist]
        results[name] = {"options": opts, "history_tokens": hist, "seconds_per_segment": secs, "state_bytes": states,
                         "history_reached": reached, "wall_s": wall,
                         "slope_seconds_per_1k_history": slope(per_1k, secs),
                         "slope_state_bytes_per_1k_history": slope(per_1k, states)}
        series_t[name], series_b[name] = (hist, secs), (hist, [max(1, b) for b in states])
        print(f"{name:16s} reached {reached:6d} tok in {wall:5.1f} s; s/segment {secs[0]:.4f} -> {secs[-1]:.4f} "
              f"(slope {results[name]['slope_seconds_per_1k_history']:+.2e} s per 1K); state {states[0]} -> "
              f"{states[-1]} B (slope {results[name]['slope_state_bytes_per_1k_history']:+.3g} B per 1K)", flush=True)
        del method
    payload = {"model": args.model, "model_max_length": lm.max_length, "threads": args.threads, "segment_len": S,
               "methods": results,
               "notes": "seconds_per_segment at history H is the median of the segments starting at H-S, H, H+S; "
                        "full_context: one forward pass over min(H, max_context-1-S) history tokens + the segment."}
    path = write_result("streaming_cost", payload, args.out)
    plot(path.with_name(path.stem + "_seconds.png"), f"Seconds per segment ({args.model}, S={S})",
         "history tokens", "seconds per segment", series_t, logx=True)
    plot(path.with_name(path.stem + "_state_bytes.png"), f"Memory-state bytes ({args.model}, S={S})",
         "history tokens", "state bytes", series_b, logx=True, logy=True)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
