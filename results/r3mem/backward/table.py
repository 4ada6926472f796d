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
VARIANTS = [  # (label, run root or None, reconstruction report, training record)
    ("r3mem (rerun): w_recon 1, argmax cycle 0.2, last segment", HERE / "rerun", HERE / "rerun",
     HERE / "rerun/checkpoint"),
    ("r3mem_no_recon: w_recon 0, no cycle", HERE / "no_recon", HERE / "no_recon", HERE / "no_recon/checkpoint"),
    ("w_recon 0.3", HERE / "wrecon03", HERE / "wrecon03", HERE / "wrecon03/checkpoint"),
    ("soft cycle, w_cycle 1.0", HERE / "softcycle", HERE / "softcycle", HERE / "softcycle/checkpoint"),
    ("reconstruct every segment", HERE / "reconall", HERE / "reconall", HERE / "reconall/checkpoint"),
    ("w_recon 0.3 + every segment", HERE / "w03all", HERE / "w03all", HERE / "w03all/checkpoint"),
    ("QA level, share 0.3", HERE / "qalevel", HERE / "qalevel", HERE / "qalevel/checkpoint"),
]
METHOD = {"r3mem_no_recon: w_recon 0, no cycle": "r3mem_no_recon"}


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
    control = {t: rows(HERE / "rerun" / t / "r3mem") for t in ("wikitext2", "pydoc_heldout")}
    window = {t: rows(R3 / "heldout" / t / "window@r3mem") for t in ("wikitext2", "pydoc_heldout")}
    for label, root, recon, record in VARIANTS:
        cells = []
        for task, unit in (("wikitext2", "document"), ("pydoc_heldout", "segment")):
            run = root / task / METHOD.get(label, "r3mem")
            if not run.is_dir():
                cells += ["—"] * (3 if task == "wikitext2" else 2)
                continue
            rs = rows(run)
            cells.append(f"{ppl(rs):.2f}")
            cells.append("—" if label.startswith("r3mem (rerun)") else diff(rs, control[task], unit))
            if task == "wikitext2":
                cells.append(diff(rs, window[task], unit))
        report = recon / "reconstruct_M32.json"
        if report.exists():
            r = json.loads(report.read_text())
            rouge = "—" if r["rouge_l"] is None else f"{r['rouge_l']:.3f} ({r['empty_memory_rouge_l']:.3f})"
            cells += [f"{r['token_accuracy']:.3f} ({r['empty_memory_token_accuracy']:.3f})", rouge]
        else:
            cells += ["—", "—"]
        if not (record / "r3mem.json").exists():
            continue
        meta = json.loads((record / "r3mem.json").read_text())["training"]
        cells.append(f"{meta['seconds']:,.0f} / {meta['cpu_seconds']:,.0f}")
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
