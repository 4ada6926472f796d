"""Table and position-curve plot of an LM sweep run (default: results/lm/runs from the wikitext2_sweep command).

    python results/lm/make_lm_figures.py [RUN_DIR] [OUT_PREFIX]

Writes OUT_PREFIX_table.md (``r3mem-bench report`` table plus a full_context vs no_memory check per setting) and
OUT_PREFIX_position_curve.png (mean NLL per token by segment, x = token offset of the segment end).
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from r3mem_bench.families.lm import LMFamily  # noqa: E402
from r3mem_bench.report import collect, find_runs, load_run, render  # noqa: E402


def main() -> None:
    """Build the table and the plot."""
    here = Path(__file__).resolve().parent
    run_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else here / "runs"
    prefix = Path(sys.argv[2]) if len(sys.argv) > 2 else here / "wikitext2_sweep"
    records = collect([str(run_dir)])
    curves: dict[str, dict[str, tuple[int, list[float]]]] = {}
    for path in find_runs([str(run_dir)]):
        manifest, rows = load_run(path)
        params = manifest["config"]["task"]["params"]
        cell = f"max_tokens={params['max_tokens']}"
        curves.setdefault(cell, {})[f"{manifest['method']} S={params['segment_len']}"] = (
            params["segment_len"], LMFamily.position_curve(rows))
    checks = ["", "| task | full_context bpb | no_memory bpb | full_context not worse |", "|:--|--:|--:|:--|"]
    by_task: dict[str, dict[str, float]] = {}
    for r in records:
        by_task.setdefault(r["task"], {})[r["method"]] = r["metrics"]["bits_per_byte"]
    for task, m in sorted(by_task.items()):
        if {"full_context", "no_memory"} <= set(m):
            ok = m["full_context"] <= m["no_memory"]
            checks.append(f"| {task} | {m['full_context']:.4f} | {m['no_memory']:.4f} | {'yes' if ok else 'NO'} |")
    prefix.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{prefix}_table.md").write_text(render(records, "md") + "\n".join(checks) + "\n")
    fig, axes = plt.subplots(1, len(curves), figsize=(6 * len(curves), 4), squeeze=False)
    for ax, (cell, series) in zip(axes[0], sorted(curves.items())):
        for label, (seg_len, curve) in sorted(series.items()):
            xs = [(i + 1) * seg_len for i in range(len(curve))]
            ax.plot(xs, curve, marker="o", markersize=3, label=label,
                    linestyle="-" if label.startswith("full_context") else "--")
        ax.set_title(f"wikitext2_sweep, {cell}")
        ax.set_xlabel("tokens of history at segment end")
        ax.set_ylabel("mean NLL per token (nats)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(f"{prefix}_position_curve.png", dpi=120)
    print(f"wrote {prefix}_table.md and {prefix}_position_curve.png")


if __name__ == "__main__":
    main()
