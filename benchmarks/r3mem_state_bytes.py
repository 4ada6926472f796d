"""R3Mem's memory state stays the same size from 1K to 32K tokens of history (full context grows linearly).

Streams 1K, 2K, ..., 32K tokens of bundled tinyshakespeare through R3Mem's LM protocol (``score_segment`` per
segment) and records ``state_bytes()`` after the stream, next to the KV-cache bytes full context would hold
for the same history. Default: ``tiny-random`` with an untrained R3Mem (sizes depend on the shapes, not on the
weights), so it runs in minutes on a CPU.

    python benchmarks/r3mem_state_bytes.py [--model tiny-random] [--memory-tokens 16] [--segment-len 256]
        [--out results/benchmarks/r3mem_state_bytes.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from r3mem_bench.data import bundled_text
from r3mem_bench.methods import get_method_class
from r3mem_bench.models import load_model
from r3mem_bench.provenance import library_versions, machine
from r3mem_bench.scoring import kv_bytes


def main() -> None:
    """Measure and write the JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-random")
    ap.add_argument("--checkpoint", default=None, help="R3Mem checkpoint (default: untrained, shapes only)")
    ap.add_argument("--memory-tokens", type=int, default=16)
    ap.add_argument("--segment-len", type=int, default=256)
    ap.add_argument("--lengths", default="1024,2048,4096,8192,16384,32768")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="results/benchmarks/r3mem_state_bytes.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model(args.model, device="cpu")
    options = {"memory_tokens": args.memory_tokens, "segment_len": args.segment_len,
               "max_memory_tokens": max(64, args.memory_tokens)}
    options.update({"checkpoint": args.checkpoint} if args.checkpoint else {"untrained": True})
    torch.manual_seed(0)
    method = get_method_class("r3mem")(lm, options)
    lengths = [int(x) for x in args.lengths.split(",")]
    ids = lm.tokenizer(bundled_text("tinyshakespeare"), add_special_tokens=False)["input_ids"][: max(lengths)]
    if len(ids) < max(lengths):
        raise SystemExit(f"the text has only {len(ids)} tokens")
    rows = []
    for n in lengths:
        method.reset()
        t0 = time.perf_counter()
        series = []
        for start in range(0, n, args.segment_len):
            method.score_segment(torch.tensor(ids[start: start + args.segment_len]))
            series.append(method.state_bytes())
        rows.append({"history_tokens": n, "segments": len(series), "r3mem_state_bytes": series[-1],
                     "r3mem_state_bytes_min": min(series), "r3mem_state_bytes_max": max(series),
                     "full_context_kv_bytes": kv_bytes(lm, n), "seconds": round(time.perf_counter() - t0, 2)})
        print(json.dumps(rows[-1]), flush=True)
    out = {"benchmark": "r3mem_state_bytes", "model": args.model, "checkpoint": args.checkpoint,
           "memory_tokens": args.memory_tokens, "segment_len": args.segment_len, "rows": rows,
           "constant": len({r["r3mem_state_bytes"] for r in rows}) == 1
           and all(r["r3mem_state_bytes_min"] == r["r3mem_state_bytes_max"] for r in rows),
           "command": "python benchmarks/r3mem_state_bytes.py " + " ".join(
               f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None and k != "out"),
           "versions": library_versions(), "machine": machine()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"constant: {out['constant']}; written {args.out}")


if __name__ == "__main__":
    main()
