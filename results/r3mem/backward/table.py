"""The backward-path table of results/r3mem/backward/README.md, from the committed runs and reconstruction reports.

    python results/r3mem/backward/table.py

Rows: the matched rerun of the earlier second stage (w_recon 1, no QA samples), the same stage without the
backward path, and each backward-path variant (``<variant>/<task>/<method>``; training records in
``<variant>/checkpoint/``). Perplexity after the first
segment with the paired bootstrap 95% interval over documents (WikiText-2) or segments (pydoc, 3 documents)
against the matched rerun and against the equal-state window (../heldout); teacher-forced reconstruction token
accuracy (and, where decoded, greedy ROUGE-L) at M = 32 on ../recon_heldout_2k.txt, the empty memory's in
brackets (``<variant>/reconstruct_M32.json``); stage-2 training seconds from each checkpoint's record.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from r3mem_bench import stats

HERE = Path(__file__).resolve().parent
R3 = HERE.parent
CONTROL = "rerun"  # the matched rerun: the other rows' differences are against it
VARIANTS = [  # (label, directory here: <task>/<method>/ runs, reconstruct_M32.json, checkpoint/r3mem.json; method)
    ("r3mem (rerun): w_recon 1, argmax cycle 0.2, last segment", "rerun", "r3mem"),
    ("r3mem_no_recon: w_recon 0, no cycle", "no_recon", "r3mem_no_recon"),
    ("w_recon 0.3", "wrecon03", "r3mem"),
    ("soft cycle, w_cycle 1.0", "softcycle", "r3mem"),
    ("reconstruct every segment", "reconall", "r3mem"),
    ("w_recon 0.3 + every segment", "w03all", "r3mem"),
    ("QA level, share 0.3", "qalevel", "r3mem"),
]


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in (path / "results.jsonl").read_text().splitlines()]


def ppl(rs: list[dict]) -> float:
    s = stats.lm_units(rs, "ppl_after_first")
    return math.exp(s.num.sum() / s.den.sum())


def diff(a: list[dict], b: list[dict], unit: str) -> str:
    d, lo, hi = stats.paired_bootstrap_diff(stats.lm_units(a, "ppl_after_first", unit=unit),
                                            stats.lm_units(b, "ppl_after_first", unit=unit))
    return f"{d:+.2f} [{lo:+.2f}, {hi:+.2f}]".replace("-", "−")


def main() -> None:
    print("| variant | WikiText-2 ppl | Δ vs rerun | Δ vs window@r3mem | pydoc ppl | Δ vs rerun | recon acc M=32 (empty) "
          "| ROUGE-L M=32 (empty) | stage-2 wall / CPU s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    control = {t: rows(HERE / CONTROL / t / "r3mem") for t in ("wikitext2", "pydoc_heldout")}
    window = {t: rows(R3 / "heldout" / t / "window@r3mem") for t in ("wikitext2", "pydoc_heldout")}
    for label, name, method in VARIANTS:
        variant = HERE / name
        cells = []
        for task, unit in (("wikitext2", "document"), ("pydoc_heldout", "segment")):
            run = variant / task / method
            if not run.is_dir():
                cells += ["—"] * (3 if task == "wikitext2" else 2)
                continue
            rs = rows(run)
            cells.append(f"{ppl(rs):.2f}")
            cells.append("—" if name == CONTROL else diff(rs, control[task], unit))
            if task == "wikitext2":
                cells.append(diff(rs, window[task], unit))
        report = variant / "reconstruct_M32.json"
        if report.exists():
            r = json.loads(report.read_text())
            rouge = "—" if r["rouge_l"] is None else f"{r['rouge_l']:.3f} ({r['empty_memory_rouge_l']:.3f})"
            cells += [f"{r['token_accuracy']:.3f} ({r['empty_memory_token_accuracy']:.3f})", rouge]
        else:
            cells += ["—", "—"]
        record = variant / "checkpoint" / "r3mem.json"
        if not record.exists():
            continue
        meta = json.loads(record.read_text())["training"]
        cells.append(f"{meta['seconds']:,.0f} / {meta['cpu_seconds']:,.0f}")
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
