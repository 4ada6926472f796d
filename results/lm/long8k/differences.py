"""Paired differences of ppl_after_first / ppl_beyond_16 / ppl_beyond_64 between memories and their controls,
and (documents of 64 segments) the second half against the first, from committed LM runs.

    python results/lm/long8k/differences.py                                  # results/lm/long8k/README.md
    python results/lm/long8k/differences.py results/r3mem/heldout/wikitext2  # the README's beyond-window numbers
    python results/lm/long8k/differences.py results/r3mem/ablations/wikitext2 \
        r3mem_no_recon:results/r3mem/heldout/wikitext2/r3mem ...   # pairs A:B (a name with '/' is a run directory)
    python results/lm/long8k/differences.py results/r3mem/ablations/qa/needle \
        "r3mem_no_recon:qa_reader=memory::results/qa_likelihood/needle/r3mem_kv"   # QA runs (answer_nll,
                                                      # choice_acc, recall); '::' splits names that hold ':'
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np

from r3mem_bench import stats

RUNS = Path(__file__).resolve().parent / "wikitext2"
PAIRS = [("r3mem", "window@r3mem"), ("r3mem", "r3mem_reset"), ("rmt", "rmt_reset"), ("r3mem", "rmt")]


def run_dir(method: str) -> Path:
    """A method's run directory under RUNS, or a run directory's path (a name with a '/')."""
    return Path(method) if "/" in method else RUNS / method


def rows(method: str) -> list[dict]:
    return [json.loads(line) for line in (run_dir(method) / "results.jsonl").read_text().splitlines()]


def main() -> None:
    global RUNS
    if len(sys.argv) > 1:
        RUNS = Path(sys.argv[1])
    pairs = [tuple(p.split("::")) if "::" in p else tuple(p.split(":")) for p in sys.argv[2:]] or PAIRS
    pairs = [(a, b) for a, b in pairs if run_dir(a).is_dir() and run_dir(b).is_dir()]
    if pairs and "segment_nll_sum" not in rows(pairs[0][0])[0]:  # QA runs: per-question answer metrics
        for metric in ("answer_nll", "choice_acc", "recall"):
            for a, b in pairs:
                got = stats.paired_bootstrap_diff(stats.qa_units(rows(a), metric), stats.qa_units(rows(b), metric))
                if got:
                    print(f"{metric:16s} {a} - {b} over questions: {got[0]:+.3f} [{got[1]:+.3f}, {got[2]:+.3f}]")
        return
    for metric in ("ppl_after_first", "ppl_beyond_16", "ppl_beyond_64"):
        for a, b in pairs:
            for unit in ("segment", "document"):
                d, lo, hi = stats.paired_bootstrap_diff(stats.lm_units(rows(a), metric, unit=unit),
                                                        stats.lm_units(rows(b), metric, unit=unit))
                print(f"{metric:16s} {a} - {b:13s} over {unit}s: {d:+.2f} [{lo:+.2f}, {hi:+.2f}]")
    rng = np.random.default_rng(0)
    if not (RUNS / "no_memory").is_dir() or min(len(r["segment_tokens"]) for r in rows("no_memory")) < 64:
        return
    for d in sorted(p for p in RUNS.iterdir() if p.is_dir()):
        a = np.array([[sum(r["segment_nll_sum"][1:32]), sum(r["segment_tokens"][1:32]),
                       sum(r["segment_nll_sum"][32:64]), sum(r["segment_tokens"][32:64])] for r in rows(d.name)])

        def halves(x):  # perplexity of segments 33-64 minus that of segments 2-32
            return math.exp(x[:, 2].sum() / x[:, 3].sum()) - math.exp(x[:, 0].sum() / x[:, 1].sum())

        boots = [halves(a[rng.integers(0, len(a), len(a))]) for _ in range(2000)]
        lo, hi = np.percentile(boots, [2.5, 97.5])
        early, late = math.exp(a[:, 0].sum() / a[:, 1].sum()), math.exp(a[:, 2].sum() / a[:, 3].sum())
        print(f"{d.name:14s} segments 2-32 {early:.2f}, 33-64 {late:.2f}: {late - early:+.2f} [{lo:+.2f}, {hi:+.2f}]")


if __name__ == "__main__":
    main()
