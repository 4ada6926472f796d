"""The report's figures (matplotlib, Agg, no pyplot state), each written as PNG and PDF.

* ``lm_position``: perplexity of each segment against the tokens of history before it, one line per method;
* ``quality_vs_memory``: each task's headline metric against the memory state the method carries (bytes);
* ``lm_frontier``: the quality-state frontier: LM perplexity after the first segment against the bytes of state
  a method carries (log scale), one line per method family across its sizes (``r3mem:memory_tokens=M``, sliding
  windows ``no_memory:window=W`` and ``window@...``, ...); methods that carry nothing are dashed lines;
* ``latency_vs_history``: seconds per document (LM) or per question (QA) against the history length in tokens;
* ``dialogue_categories``: dialogue F1 per question category and method;
* ``r3mem_reconstruction``: R3Mem reconstruction quality against memory size, from ``results/r3mem/*.json``
  when the R3Mem training writes it (skipped with a message otherwise).

Files are byte-identical when regenerated from the same runs: PNG without the ``Software`` tag, PDF without
creation date and producer, fixed figure sizes and DPI.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from r3mem_bench.families.lm import LMFamily
from r3mem_bench.reconstruction import load_reconstruction
from r3mem_bench.report import HEADLINE, Report

PNG_METADATA = {"Software": None}
PDF_METADATA = {"CreationDate": None, "Producer": None}
DPI = 120


def save(fig: Figure, base: Path) -> list[Path]:
    """Write ``base.png`` and ``base.pdf`` with fixed metadata; returns both paths."""
    base.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    png, pdf = base.with_suffix(".png"), base.with_suffix(".pdf")
    fig.savefig(png, dpi=DPI, metadata=PNG_METADATA)
    fig.savefig(pdf, metadata=PDF_METADATA)
    return [png, pdf]


def _grid(n: int, width: float = 4.2, height: float = 3.2) -> tuple[Figure, list]:
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(width * cols, height * rows))
    axes = [fig.add_subplot(rows, cols, i + 1) for i in range(n)]
    return fig, axes


def _all_rows(cell) -> list[dict]:
    return [r for rows in cell.rows for r in rows]


def plot_position(report: Report, outdir: Path) -> list[Path]:
    """Perplexity per segment vs tokens of history, per LM task (one line per method)."""
    tasks = [t for fam, t in report.tasks if fam == "lm"]
    if not tasks:
        return []
    fig, axes = _grid(len(tasks))
    for ax, task in zip(axes, tasks):
        for model in report.models:
            for method in report.methods:
                cell = report.cell(model, task, method)
                if not cell or not cell.rows:
                    continue
                curve = [math.exp(x) for x in LMFamily.position_curve(_all_rows(cell))]
                seg = int(cell.params.get("segment_len", 1))
                label = method if len(report.models) == 1 else f"{model}: {method}"
                ax.plot([i * seg for i in range(len(curve))], curve, marker="o", ms=3, label=label)
        ax.set(title=task, xlabel="tokens of history before the segment", ylabel="segment perplexity")
        ax.legend(fontsize=7)
    return save(fig, outdir / "lm_position")


def plot_quality_vs_memory(report: Report, outdir: Path) -> list[Path]:
    """Each task's first headline metric against memory-state bytes, one point per method."""
    panels = []
    for fam, task in report.tasks:
        metric = next((m for m in report.options.headline.get(fam, HEADLINE.get(fam, ()))
                       if any(m in c.metrics for c in report.cells if c.task == task)), None)
        if metric:
            panels.append((task, metric))
    if not panels:
        return []
    fig, axes = _grid(len(panels))
    for ax, (task, metric) in zip(axes, panels):
        for model in report.models:
            for method in report.methods:
                cell = report.cell(model, task, method)
                if not cell or metric not in cell.metrics:
                    continue
                x = float(cell.metrics.get("state_bytes", 0.0))
                s = report.stat(cell, metric)
                yerr = None
                if s.lo is not None and s.hi is not None:
                    yerr = [[max(0.0, s.value - s.lo)], [max(0.0, s.hi - s.value)]]
                ax.errorbar([x], [s.value], yerr=yerr, fmt="o", capsize=3,
                            label=method if len(report.models) == 1 else f"{model}: {method}")
        ax.set_xscale("symlog", linthresh=1024)
        ax.set(title=task, xlabel="memory state (bytes)", ylabel=metric)
        ax.legend(fontsize=7)
    return save(fig, outdir / "quality_vs_memory")


def series_of(method: str) -> str:
    """The line a method's point belongs to in the frontier: its base name, or "sliding window"."""
    base = method.split(":")[0]
    return "sliding window" if base.startswith("window") or base == "no_memory" else base


def plot_frontier(report: Report, outdir: Path, metric: str = "ppl_after_first") -> list[Path]:
    """LM quality against state bytes, one line per series (see ``series_of``), one panel per LM task."""
    tasks = [t for fam, t in report.tasks if fam == "lm"]
    tasks = [t for t in tasks if any(c.task == t and metric in c.metrics for c in report.cells)]
    if not tasks:
        return []
    fig, axes = _grid(len(tasks), width=5.0, height=3.8)
    for ax, task in zip(axes, tasks):
        for model in report.models:
            lines: dict[str, list[tuple[float, object]]] = {}
            for method in report.methods:
                cell = report.cell(model, task, method)
                if cell and metric in cell.metrics:
                    lines.setdefault(series_of(method), []).append((float(cell.metrics.get("state_bytes", 0.0)),
                                                                    report.stat(cell, metric), method))
            prefix = "" if len(report.models) == 1 else f"{model}: "
            for name, points in sorted(lines.items()):
                for x, s, method in points:
                    if x <= 0:
                        ax.axhline(s.value, ls="--", lw=1, color="grey")
                        ax.annotate(f"{prefix}{method} (no state)", (0.01, s.value),
                                    xycoords=("axes fraction", "data"), fontsize=6, va="bottom")
                points = sorted(((x, s) for x, s, _ in points if x > 0), key=lambda p: p[0])
                if not points:
                    continue
                xs = [x for x, _ in points]
                ys = [s.value for _, s in points]
                err = [[max(0.0, s.value - s.lo) for _, s in points], [max(0.0, s.hi - s.value) for _, s in points]] \
                    if all(s.lo is not None and s.hi is not None for _, s in points) else None
                ax.errorbar(xs, ys, yerr=err, marker="o", ms=4, capsize=2, lw=1, label=prefix + name)
        ax.set_xscale("log")
        ax.set(title=f"{task}: quality vs state", xlabel="state carried between segments (bytes, log)", ylabel=metric)
        ax.legend(fontsize=7)
    return save(fig, outdir / "lm_frontier")


def _latency_points(cell) -> tuple[np.ndarray, np.ndarray]:
    rows = _all_rows(cell)
    if cell.family == "lm":
        return (np.array([sum(r["segment_tokens"]) for r in rows], float),
                np.array([r["latency_s"] for r in rows], float))
    return (np.array([r.get("corpus_tokens", 0) for r in rows], float),
            np.array([r.get("answer_s", 0.0) for r in rows], float))


def plot_latency(report: Report, outdir: Path) -> list[Path]:
    """Seconds per document (LM) or per answer (QA) against history tokens, per task."""
    tasks = [(fam, t) for fam, t in report.tasks]
    if not tasks:
        return []
    fig, axes = _grid(len(tasks))
    for ax, (fam, task) in zip(axes, tasks):
        for model in report.models:
            for method in report.methods:
                cell = report.cell(model, task, method)
                if not cell or not cell.rows:
                    continue
                x, y = _latency_points(cell)
                order = np.argsort(x, kind="stable")
                ax.plot(x[order], y[order], marker="o", ms=3, lw=1,
                        label=method if len(report.models) == 1 else f"{model}: {method}")
        unit = "document" if fam == "lm" else "answer"
        ax.set(title=task, xlabel="history (tokens)", ylabel=f"seconds per {unit}")
        ax.legend(fontsize=7)
    return save(fig, outdir / "latency_vs_history")


def plot_categories(report: Report, outdir: Path) -> list[Path]:
    """Grouped bars of dialogue F1 per category, one group per category, one bar per method."""
    table = report.category_table()
    if table is None or not table.rows:
        return []
    tasks = sorted({labels[0] for labels, _ in table.rows})
    fig, axes = _grid(len(tasks), width=5.5)
    for ax, task in zip(axes, tasks):
        rows = [(labels, vals) for labels, vals in table.rows if labels[0] == task]
        x = np.arange(len(table.columns))
        width = 0.8 / max(1, len(rows))
        for k, (labels, vals) in enumerate(rows):
            ax.bar(x + k * width, [v.value if v else 0.0 for v in vals], width, label=" ".join(labels[1:]))
        ax.set_xticks(x + width * (len(rows) - 1) / 2, [c.split("/", 1)[1] for c in table.columns], fontsize=7)
        ax.set(title=task, ylabel="F1")
        ax.legend(fontsize=7)
    return save(fig, outdir / "dialogue_categories")


def plot_reconstruction(folder: Path, outdir: Path) -> tuple[list[Path], str]:
    """R3Mem reconstruction quality vs memory size, one panel per quality measure."""
    points, message = load_reconstruction(folder)
    if not points:
        return [], message
    measures = sorted({p["y_name"] for p in points})
    fig, axes = _grid(len(measures))
    for ax, measure in zip(axes, measures):
        sel = [p for p in points if p["y_name"] == measure]
        for label in sorted({p["label"] for p in sel}):
            pts = sorted((p["x"], p["y"]) for p in sel if p["label"] == label)
            ax.plot([a for a, _ in pts], [b for _, b in pts], marker="o", ms=3, label=label)
        ax.set(title=f"R3Mem reconstruction: {measure}", xlabel=sel[0]["x_name"], ylabel=measure)
        ax.legend(fontsize=7)
    return save(fig, outdir / "r3mem_reconstruction"), ""


def plot_all(report: Report, outdir: Path, r3mem_dir: Path | None = None) -> tuple[list[Path], list[str]]:
    """Every figure that the runs support; returns the files written and messages about skipped figures."""
    written: list[Path] = []
    for fn in (plot_position, plot_quality_vs_memory, plot_frontier, plot_latency, plot_categories):
        written += fn(report, outdir)
    messages = []
    if r3mem_dir is not None:
        files, message = plot_reconstruction(r3mem_dir, outdir)
        written += files
        if message:
            messages.append(message)
    return written, messages
