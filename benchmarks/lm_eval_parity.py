"""lm-eval parity of full-context bits per byte: our LM protocol vs lm-evaluation-harness's HFLM, one process.

Exports the task's documents (after the same truncation) as an lm-eval ``loglikelihood_rolling`` task, scores them
with ``full_context`` through ``r3mem_bench.families.lm`` and with lm-eval's ``hf`` model on the same loaded model
object and document prefix token, and writes both bits-per-byte numbers and their relative difference.

    nice -n 10 python benchmarks/lm_eval_parity.py                       # SmolLM2, 2 WikiText-2 articles x 2048 tokens
    nice -n 10 python benchmarks/lm_eval_parity.py --model tiny-random --out /tmp/parity.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv: list[str] | None = None) -> int:
    """Run the parity check and write the JSON; exit 1 when the difference is 1% or more."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--task", default="wikitext2")
    ap.add_argument("--documents", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "results/benchmarks/lm_eval_parity.json"))
    args = ap.parse_args(argv)

    import torch

    from r3mem_bench.lm_eval_export import lm_eval_parity
    from r3mem_bench.models import load_model
    from r3mem_bench.task import TaskRegistry

    torch.set_num_threads(args.threads)
    lm = load_model(args.model, device="cpu")
    task = TaskRegistry().resolve(args.task, {"max_tokens": args.max_tokens, "max_documents": args.documents})[0]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        res = lm_eval_parity(lm, task, Path(tmp))
    res.update({"wall_seconds": time.perf_counter() - t0, "threads": args.threads,
                "command": "python benchmarks/lm_eval_parity.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                "passed": res["relative_difference"] < 0.01})
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))
    return 0 if res["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
