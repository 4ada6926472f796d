"""Aggregate finished runs into tables: one record per (task, method) with its metrics, and the paper report.

``collect`` reads every result directory (``manifest.json`` + ``results.jsonl``) into records; ``render`` prints
them as one tidy table. ``build_report`` turns records into the paper's tables:

* the **main table**: methods x tasks, the family's headline metrics (lm: ``ppl_after_first``, ``bits_per_byte``;
  rag: ``f1``, ``em``, ``recall``, ``answer_nll``, ``choice_acc``; dialogue: ``f1``, ``recall``, ``answer_nll``,
  ``choice_acc``; a column only where a task has the metric), best value in bold, bootstrap 95% intervals as
  ``±`` and, with a reference method, the p-value of a paired test against it (:mod:`r3mem_bench.stats`);
* one table per **family** with every quality metric and the cost columns (tokens processed, latency, memory
  state bytes), LM perplexity per segment (position in the stream), dialogue F1 per question category;
* the **missing cells**: cells a suite expected that have no results or did not finish.

Every number comes from the stored rows; the bootstrap is seeded, so regenerating a report from the same runs
gives byte-identical Markdown, CSV and LaTeX.
"""

from __future__ import annotations

import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from r3mem_bench import stats
from r3mem_bench.errors import UserError
from r3mem_bench.families import get_family
from r3mem_bench.store import MANIFEST, RESULTS, check_manifest, read_rows

HEADLINE = {"lm": ("ppl_after_first", "bits_per_byte"), "rag": ("f1", "em", "recall", "answer_nll", "choice_acc"),
            "dialogue": ("f1", "recall", "answer_nll", "choice_acc")}
QUALITY = {"lm": ("ppl", "ppl_after_first", "ppl_beyond_16", "ppl_beyond_64", "bits_per_byte"),
           "rag": ("em", "f1", "contains", "recall", "answer_nll", "choice_acc"),
           "dialogue": ("em", "f1", "contains", "recall", "answer_nll", "choice_acc")}
COSTS = {"lm": ("tokens_processed", "seconds_per_segment", "state_bytes"),
         "rag": ("tokens_processed", "prompt_tokens", "answer_s", "ingest_s", "state_bytes",
                 "bytes_per_1k_corpus_tokens"),
         "dialogue": ("tokens_processed", "prompt_tokens", "answer_s", "ingest_s", "state_bytes")}
_LOWER = re.compile(r"^(ppl|ppl_after_first|ppl_beyond_\d+|bits_per_byte|latency.*|seconds_per_segment|.*_s|tokens_processed|"
                    r"prompt_tokens|state_bytes|bytes_per_1k_corpus_tokens|answer_nll(/.*)?)$")
_HIGHER = re.compile(r"^(em|f1|contains|recall|abstention|abstention_acc|choice_acc)(/.*)?$")
MAX_POSITIONS = 12  # segment columns in the LM position table


def find_runs(dirs: list[str]) -> list[Path]:
    """Every (task, method) result directory under the given directories."""
    found: list[Path] = []
    for d in dirs:
        root = Path(d)
        if not root.exists():
            raise UserError(f"report: {root} does not exist; fix: give the --output directory of a run")
        found.extend(sorted(p.parent for p in root.rglob(MANIFEST)))
    if not found:
        raise UserError(f"report: no runs found under {', '.join(dirs)}; fix: run `r3mem-bench run` first")
    return found


def load_run(path: Path) -> tuple[dict, list[dict]]:
    """Manifest and rows of one result directory."""
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise UserError(f"{path / MANIFEST}: corrupt manifest; fix: delete {path} and rerun it") from None
    return check_manifest(manifest, path / MANIFEST), read_rows(path / RESULTS)


def collect(dirs: list[str]) -> list[dict]:
    """One record ``{task, method, n, metrics, ...}`` per result directory, sorted by task then method."""
    records = []
    for path in find_runs(dirs):
        manifest, rows = load_run(path)
        family = get_family(manifest["family"])
        params = manifest["config"]["task"]["params"]
        family.check_rows(rows, str(path / RESULTS))  # hand-edited rows: a clear error, never a wrong number
        metrics = family.aggregate(rows, params) if rows else {}
        records.append({"task": manifest["task"], "family": manifest["family"], "method": manifest["method"],
                        "model": manifest["model"], "seed": manifest["seed"], "n": len(rows),
                        "metrics": {k: _clean(v) for k, v in metrics.items()}, "path": str(path)})
    records.sort(key=lambda r: (r["task"], r["method"], r["seed"]))
    return records


def _clean(v):
    return None if isinstance(v, float) and (math.isnan(v) or math.isinf(v)) else v


def to_frame(records: list[dict]) -> pd.DataFrame:
    """A tidy table: one row per (task, method), one column per metric."""
    rows = [{"task": r["task"], "method": r["method"], "n": r["n"], **r["metrics"]} for r in records]
    return pd.DataFrame(rows)


def render(records: list[dict], fmt: str) -> str:
    """The records as ``md``, ``csv``, ``latex`` or ``json``."""
    if fmt == "json":
        return json.dumps([{k: r[k] for k in ("task", "method", "n", "metrics")} for r in records], indent=2) + "\n"
    df = to_frame(records)
    if fmt == "csv":
        return df.to_csv(index=False, float_format="%.6g")
    if fmt == "md":
        return df.to_markdown(index=False, floatfmt=".4g") + "\n"
    if fmt == "latex":
        return df.to_latex(index=False, float_format="%.4g", escape=True)
    raise UserError(f"--format {fmt}: unknown; fix: use md, csv, latex or json")


# ---- the paper report ------------------------------------------------------------------------------------------
def metric_direction(metric: str) -> str | None:
    """``"lower"`` or ``"higher"`` is better for ``metric``; None when it has no preferred direction."""
    if _HIGHER.match(metric):
        return "higher"
    if _LOWER.match(metric):
        return "lower"
    return None


@dataclass
class ReportOptions:
    """How to compute the report's intervals and tests."""

    reference: str | None = None  # method the paired tests compare against
    n_resamples: int = 1000
    seed: int = 0
    ci_unit: str = "auto"  # LM resampling unit: auto (documents when >= 10, else segments), document, segment
    headline: dict = field(default_factory=lambda: dict(HEADLINE))
    method_order: list[str] = field(default_factory=list)


@dataclass
class ExpectedCell:
    """A cell a suite asked for, with whether it finished (from the suite's done markers)."""

    model: str
    seed: int
    task: str
    method: str
    done: bool = False
    note: str = ""


@dataclass
class Cell:
    """All seeds of one (model, task, method): metrics averaged over seeds, rows kept for resampling."""

    model: str
    task: str
    family: str
    method: str
    params: dict
    seeds: list[int]
    n: int
    metrics: dict
    rows: list[list[dict]]  # rows of each seed that has any
    counts: dict = field(default_factory=dict)  # seed -> rows stored

    def sample(self, metric: str, unit: str) -> stats.Sample:
        """Resampling units of ``metric`` (seeds merged by unit id)."""
        return stats.merge_seeds([stats.units(self.family, r, metric, self.params, unit) for r in self.rows])


@dataclass
class Stat:
    """A metric's value with its interval and p-value against the reference (either may be None).

    ``kind``: "value" (interval shown as ± half-width), "difference" (method minus control, interval in
    brackets) or "percent" (a derived share, never formatted as a count).
    """

    value: float | None
    lo: float | None = None
    hi: float | None = None
    p: float | None = None
    kind: str = "value"


@dataclass
class Table:
    """A titled table: label columns (strings) then value columns (``Stat`` or None)."""

    name: str
    title: str
    labels: list[str]
    columns: list[str]
    rows: list[tuple[list[str], list[Stat | None]]]
    note: str = ""


def load_cells(records: list[dict]) -> list[Cell]:
    """Group records by (model, task, method) over seeds, reading each cell's rows once."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["model"], r["task"], r["method"]), []).append(r)
    cells = []
    for (model, task, method), recs in sorted(groups.items()):
        recs = sorted(recs, key=lambda r: r["seed"])
        loaded = [load_run(Path(r["path"])) for r in recs]
        rows = [rw for _, rw in loaded if rw]
        metric_names = sorted({k for r in recs for k, v in r["metrics"].items() if v is not None})
        metrics = {}
        for k in metric_names:
            vals = [r["metrics"][k] for r in recs if r["metrics"].get(k) is not None]
            metrics[k] = sum(vals) / len(vals)
        cells.append(Cell(model, task, recs[0]["family"], method, loaded[0][0]["config"]["task"]["params"],
                          [r["seed"] for r in recs], sum(r["n"] for r in recs), metrics, rows,
                          {r["seed"]: r["n"] for r in recs}))
    return cells


class Report:
    """The tables of a set of runs (see the module docstring)."""

    def __init__(self, records: list[dict], options: ReportOptions | None = None,
                 expected: list[ExpectedCell] | None = None):
        self.options = options or ReportOptions()
        self.records = records
        self.cells = load_cells(records)
        self.expected = expected
        self.models = sorted({c.model for c in self.cells})
        order = {m: i for i, m in enumerate(self.options.method_order)}
        self.methods = sorted({c.method for c in self.cells}, key=lambda m: (order.get(m, len(order)), m))
        self.tasks = sorted({(c.family, c.task) for c in self.cells}, key=lambda ft: (_FAMILY_ORDER.get(ft[0], 9), ft[1]))
        self._by_key = {(c.model, c.task, c.method): c for c in self.cells}
        self._stats: dict[tuple, Stat] = {}

    def cell(self, model: str, task: str, method: str) -> Cell | None:
        """The cell of (model, task, method), if it has results."""
        return self._by_key.get((model, task, method))

    def stat(self, cell: Cell, metric: str) -> Stat | None:
        """Value, bootstrap interval and paired p-value of ``metric`` in ``cell``."""
        key = (cell.model, cell.task, cell.method, metric)
        if key in self._stats:
            return self._stats[key]
        value = cell.metrics.get(metric)
        if value is None:
            return None
        out = Stat(value)
        if stats.supports(cell.family, metric) and cell.rows:
            o = self.options
            sample = cell.sample(metric, o.ci_unit)
            ci = stats.bootstrap_ci(sample, o.n_resamples, o.seed)
            if ci:
                out.lo, out.hi = ci
            ref = self.cell(cell.model, cell.task, o.reference) if o.reference else None
            if ref is not None and ref is not cell and ref.rows:
                res = stats.paired_test(sample, ref.sample(metric, o.ci_unit), o.n_resamples, o.seed)
                out.p = res.p_value if res else None
        self._stats[key] = out
        return out

    def _row_label(self, model: str, method: str) -> list[str]:
        return [model, method] if len(self.models) > 1 else [method]

    def main_table(self) -> Table:
        """Methods x tasks with the headline metrics of each task's family."""
        cols = [(fam, task, m) for fam, task in self.tasks for m in self.options.headline.get(fam, ())
                if any(m in c.metrics for c in self.cells if c.task == task)]
        rows = []
        for model in self.models:
            for method in self.methods:
                vals = []
                for _, task, metric in cols:
                    cell = self.cell(model, task, method)
                    vals.append(self.stat(cell, metric) if cell else None)
                if any(v is not None for v in vals):
                    rows.append((self._row_label(model, method), vals))
        return Table("main", "Main results", ["model", "method"] if len(self.models) > 1 else ["method"],
                     [f"{task} {metric}" for _, task, metric in cols], rows)

    def family_table(self, family: str) -> Table | None:
        """Every quality metric and cost column of one family's cells, one row per (task, method)."""
        cells = [c for c in self.cells if c.family == family]
        if not cells:
            return None
        present = {k for c in cells for k in c.metrics}
        metrics = [m for m in QUALITY.get(family, ()) if m in present] + [m for m in COSTS.get(family, ()) if m in present]
        rows = []
        for fam, task in self.tasks:
            if fam != family:
                continue
            for model in self.models:
                for method in self.methods:
                    cell = self.cell(model, task, method)
                    if cell:
                        label = [task] + self._row_label(model, method) + [self._n_label(cell)]
                        rows.append((label, [self.stat(cell, m) for m in metrics]))
        labels = ["task"] + (["model"] if len(self.models) > 1 else []) + ["method", "n"]
        note = ("n: questions scored; '(gen k)': generated answers (EM/F1) on the first k of them, answer "
                "likelihood on all (task parameter generate_questions).") if family != "lm" else ""
        return Table(family, f"{family}: quality and cost", labels, list(metrics), rows, note)

    @staticmethod
    def _n_label(cell) -> str:
        """The cell's n, with the count of generated answers when only some questions generated."""
        generated = sum(1 for rows in (cell.rows or []) for r in rows if "em" in r.get("metrics", {}))
        return f"{cell.n} (gen {generated})" if 0 < generated < cell.n else str(cell.n)

    def position_table(self) -> Table | None:
        """LM perplexity at each segment index (tokens of history before it), per (task, method)."""
        from r3mem_bench.families.lm import LMFamily

        cells = [c for c in self.cells if c.family == "lm" and c.rows]
        if not cells:
            return None
        curves = {id(c): [math.exp(x) for x in LMFamily.position_curve(r for rows in c.rows for r in rows)]
                  for c in cells}
        width = min(MAX_POSITIONS, max(len(v) for v in curves.values()))
        seg = {c.task: int(c.params.get("segment_len", 0)) for c in cells}
        rows = []
        for _, task in self.tasks:
            for model in self.models:
                for method in self.methods:
                    cell = self.cell(model, task, method)
                    if cell and id(cell) in curves:
                        curve = curves[id(cell)]
                        vals = [Stat(curve[i]) if i < len(curve) else None for i in range(width)]
                        rows.append(([task] + self._row_label(model, method), vals))
        cols = [f"seg {i}" for i in range(width)]
        note = "Perplexity of segment i (it follows i * segment_len tokens of history: " + ", ".join(
            f"{t}: {s}" for t, s in sorted(seg.items())) + ")."
        labels = ["task"] + (["model"] if len(self.models) > 1 else []) + ["method"]
        return Table("lm_position", "lm: perplexity by position in the stream", labels, cols, rows, note)

    def category_table(self) -> Table | None:
        """Dialogue F1 per question category."""
        cells = [c for c in self.cells if c.family == "dialogue"]
        cats = sorted({k for c in cells for k in c.metrics if k.startswith("f1/")})
        if not cats:
            return None
        rows = []
        for _, task in self.tasks:
            for model in self.models:
                for method in self.methods:
                    cell = self.cell(model, task, method)
                    if cell and cell.family == "dialogue":
                        rows.append(([task] + self._row_label(model, method), [self.stat(cell, k) for k in cats]))
        labels = ["task"] + (["model"] if len(self.models) > 1 else []) + ["method"]
        return Table("dialogue_categories", "dialogue: F1 by question category", labels, cats, rows)

    def memory_gain_table(self, metric: str = "ppl_after_first") -> Table | None:
        """LM: each memory method against ``no_memory``, its own reset and the equal-state sliding window.

        Differences (method minus control) come with paired bootstrap 95% intervals over documents; "gap closed"
        is the share of the no_memory -> full_context gap the method closes (needs both references). A method's
        reset control is ``<base>_reset`` with the same fixed options (``rmt:num_mem_tokens=4`` ->
        ``rmt_reset:num_mem_tokens=4``); its equal-state window is ``window@<method>``.
        """
        rows = []
        o = self.options
        for fam, task in self.tasks:
            for model in self.models if fam == "lm" else ():
                base, ceiling = self.cell(model, task, "no_memory"), self.cell(model, task, "full_context")
                if base is None or metric not in base.metrics:
                    continue
                for method in self.methods:
                    cell = self.cell(model, task, method)
                    if cell is None or metric not in cell.metrics:
                        continue
                    head, sep, fixed = method.partition(":")
                    controls = [self.cell(model, task, f"{head}_reset{sep}{fixed}"),
                                self.cell(model, task, f"window@{method}")]
                    vals: list[Stat | None] = [self.stat(cell, metric)]
                    for control in [base] + controls:
                        diff = None
                        if control is not None and control is not cell and cell.rows and control.rows:
                            diff = stats.paired_bootstrap_diff(cell.sample(metric, o.ci_unit),
                                                               control.sample(metric, o.ci_unit), o.n_resamples, o.seed)
                        vals.append(Stat(*diff, kind="difference") if diff else None)
                    gap = None
                    if ceiling is not None and metric in ceiling.metrics:
                        width = base.metrics[metric] - ceiling.metrics[metric]
                        if width:
                            gap = Stat(100.0 * (base.metrics[metric] - cell.metrics[metric]) / width, kind="percent")
                    rows.append(([task] + self._row_label(model, method), vals + [gap]))
        if not rows:
            return None
        labels = ["task"] + (["model"] if len(self.models) > 1 else []) + ["method"]
        return Table("lm_memory_gain", f"LM: what the memory adds ({metric})", labels,
                     [metric, "Δ vs no_memory", "Δ vs own reset", "Δ vs equal-state window", "gap closed %"], rows,
                     note="Δ: method minus control, paired bootstrap 95% interval in brackets (resampling "
                          f"units: {o.ci_unit}; auto = documents when a task has at least 10, else segments; "
                          "negative = lower perplexity than the control). Own reset: the same trained adapter "
                          "with its memory emptied at every segment. Equal-state window: no_memory with the "
                          "largest sliding window whose key/value cache fits in the bytes the method carries "
                          "between segments (window@<method>). Gap closed: (no_memory - method) / "
                          "(no_memory - full_context).")

    def frontier_table(self, metric: str = "ppl_after_first") -> Table | None:
        """LM: every method's state bytes and ``metric``, smallest state first (the data of the frontier figure)."""
        rows = []
        for fam, task in self.tasks:
            for model in self.models if fam == "lm" else ():
                cells = [c for m in self.methods if (c := self.cell(model, task, m)) and metric in c.metrics]
                for c in sorted(cells, key=lambda c: (c.metrics.get("state_bytes", 0.0), c.method)):
                    rows.append(([task] + self._row_label(model, c.method),
                                 [Stat(c.metrics.get("state_bytes", 0.0)), self.stat(c, metric)]))
        if not rows:
            return None
        labels = ["task"] + (["model"] if len(self.models) > 1 else []) + ["method"]
        return Table("lm_frontier", f"LM: quality against state carried between segments ({metric})", labels,
                     ["state_bytes", metric], rows,
                     note="state_bytes: the largest memory state a method carries from one segment to the next "
                          "over a document (full_context: the key/value cache of the whole window).")

    def tables(self) -> list[Table]:
        """All tables of the report, main table first."""
        out = [self.main_table()]
        for t in (self.family_table("lm"), self.memory_gain_table(), self.frontier_table(), self.position_table(), self.family_table("rag"),
                  self.family_table("dialogue"), self.category_table()):
            if t is not None and t.rows:
                out.append(t)
        return out

    def missing(self) -> list[ExpectedCell]:
        """Expected cells without finished results (empty when no suite says what to expect)."""
        out = []
        for e in self.expected or []:
            if e.done:
                continue
            cell = self.cell(e.model, e.task, e.method)
            rows = cell.counts.get(e.seed, 0) if cell else 0
            note = e.note or (f"incomplete: {rows} examples stored, not finished" if rows else "not run")
            out.append(ExpectedCell(e.model, e.seed, e.task, e.method, False, note))
        return out

    def notes(self) -> str:
        """How the intervals and tests were computed."""
        o = self.options
        text = (f"Intervals: percentile bootstrap 95% over examples ({o.n_resamples} resamples, seed {o.seed}; "
                f"LM units: {o.ci_unit} — auto means documents when a cell has at least 10, else segments), "
                "shown as ± half-width. Bold: best value of its column.")
        if o.reference:
            text += (f" p: two-sided paired permutation test against `{o.reference}` on shared examples "
                     f"({o.n_resamples} resamples).")
        return text


_FAMILY_ORDER = {"lm": 0, "rag": 1, "dialogue": 2}


# ---- formatting ------------------------------------------------------------------------------------------------
def fmt_number(v: float | None, count: bool = False) -> str:
    """A metric value with precision suited to its size (``count``: whole numbers without decimals)."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    a = abs(v)
    if a >= 1000 or (count and float(v).is_integer()):
        return f"{v:.0f}"
    if a >= 100:
        return f"{v:.1f}"
    if a >= 10:
        return f"{v:.2f}"
    return f"{v:.3f}"


def _best(table: Table) -> list[set[int]]:
    """Per column, the row indices holding the best value of their task (by direction; quality metrics only)."""
    group_of = [r[0][0] if table.labels[0] == "task" else "" for r in table.rows]
    best: list[set[int]] = []
    for j, col in enumerate(table.columns):
        metric = "ppl" if col.startswith("seg ") else col.split(" ")[-1]  # position columns are perplexities
        direction = metric_direction(metric) if stats_metric(metric) else None
        chosen: set[int] = set()
        for group in sorted(set(group_of)):
            vals = [(i, r[1][j].value) for i, r in enumerate(table.rows)
                    if group_of[i] == group and r[1][j] is not None and r[1][j].value is not None]
            if direction is None or len(vals) < 2:
                continue
            target = fmt_number((min if direction == "lower" else max)(v for _, v in vals))
            chosen |= {i for i, v in vals if fmt_number(v) == target}
        best.append(chosen)
    return best


def stats_metric(metric: str) -> bool:
    """Whether ``metric`` is a quality metric (bold best applies; costs are not ranked)."""
    return metric in stats.LM_RATIO_METRICS or metric.split("/", 1)[0] in stats.QA_SCORE_METRICS


def _cell_text(s: Stat | None, bold: bool, latex: bool, column: str = "") -> str:
    if s is None:
        return "—" if not latex else "--"
    text = fmt_number(s.value, count=s.kind == "value" and not stats_metric(column.split(" ")[-1])
                      and not column.startswith("seg "))
    if s.lo is not None and s.hi is not None and s.kind == "difference":  # its interval in brackets
        text += f" [{fmt_number(s.lo)}, {fmt_number(s.hi)}]"
    elif s.lo is not None and s.hi is not None:
        half = (s.hi - s.lo) / 2
        text += (r" $\pm$ " if latex else " ± ") + fmt_number(half)
    if bold:
        text = rf"\textbf{{{text}}}" if latex else f"**{text}**"
    if s.p is not None:
        text += f" (p={s.p:.3f})" if s.p >= 0.001 else " (p<0.001)"
    return text


def _latex_escape(text: str) -> str:
    return re.sub(r"([_%&#$])", r"\\\1", text).replace("Δ", r"$\Delta$")


def table_markdown(table: Table) -> str:
    """A table as GitHub Markdown (bold best, ± intervals, p-values)."""
    best = _best(table)
    body = [labels + [_cell_text(v, i in best[j], False, table.columns[j]) for j, v in enumerate(vals)]
            for i, (labels, vals) in enumerate(table.rows)]
    df = pd.DataFrame(body, columns=table.labels + table.columns, dtype=object)
    text = f"### {table.title}\n\n" + df.to_markdown(index=False, disable_numparse=True) + "\n"
    return text + (f"\n{table.note}\n" if table.note else "")


def table_latex(table: Table) -> str:
    """A table as a booktabs LaTeX tabular (bold best, ``$\\pm$`` intervals)."""
    best = _best(table)
    body = [[_latex_escape(x) for x in labels] + [_cell_text(v, i in best[j], True, table.columns[j]) for j, v in enumerate(vals)]
            for i, (labels, vals) in enumerate(table.rows)]
    cols = [_latex_escape(c) for c in table.labels + table.columns]
    df = pd.DataFrame(body, columns=cols, dtype=object)
    fmt = "l" * len(table.labels) + "r" * len(table.columns)
    return f"% {table.title}\n" + df.to_latex(index=False, escape=False, column_format=fmt)


def table_csv(table: Table) -> str:
    """A table as CSV: each value column with its ``_ci_low``, ``_ci_high`` and ``_p`` columns."""
    out = []
    for labels, vals in table.rows:
        row = dict(zip(table.labels, labels))
        for col, s in zip(table.columns, vals):
            row[col] = s.value if s else None
            row[f"{col}_ci_low"] = s.lo if s else None
            row[f"{col}_ci_high"] = s.hi if s else None
            row[f"{col}_p"] = s.p if s else None
        out.append(row)
    df = pd.DataFrame(out)
    df = df.dropna(axis=1, how="all") if len(df) else df
    buf = io.StringIO()
    df.to_csv(buf, index=False, float_format="%.6g", lineterminator="\n")
    return buf.getvalue()


def missing_markdown(missing: list[ExpectedCell]) -> str:
    """The missing-cells section."""
    if not missing:
        return ""
    df = pd.DataFrame([{"model": m.model, "seed": m.seed, "task": m.task, "method": m.method, "status": m.note}
                       for m in missing])
    return f"### Missing cells ({len(missing)})\n\n" + df.to_markdown(index=False, disable_numparse=True) + "\n"


def build_report(records: list[dict], options: ReportOptions | None = None,
                 expected: list[ExpectedCell] | None = None) -> Report:
    """The report object of ``records`` (see :class:`Report`)."""
    return Report(records, options, expected)


def report_markdown(report: Report) -> str:
    """The whole report as one Markdown document."""
    parts = ["## r3mem-bench report\n", f"{report.notes()}\n"]
    missing = report.missing()
    if missing:
        parts.append(missing_markdown(missing))
    parts += [table_markdown(t) for t in report.tables()]
    return "\n".join(parts)


def write_tables(report: Report, outdir: Path) -> list[Path]:
    """Every table as ``<name>.md``, ``.csv`` and ``.tex`` plus ``report.md`` and ``missing.csv`` in ``outdir``."""
    from r3mem_bench.store import atomic_write_text

    written = []
    for t in report.tables():
        for ext, fn in (("md", table_markdown), ("csv", table_csv), ("tex", table_latex)):
            path = outdir / f"{t.name}.{ext}"
            atomic_write_text(path, fn(t))
            written.append(path)
    missing = report.missing()
    path = outdir / "missing.csv"
    if missing:
        rows = [{"model": m.model, "seed": m.seed, "task": m.task, "method": m.method, "status": m.note}
                for m in missing]
        atomic_write_text(path, pd.DataFrame(rows).to_csv(index=False, lineterminator="\n"))
        written.append(path)
    elif path.exists():
        path.unlink()
    path = outdir / "report.md"
    atomic_write_text(path, report_markdown(report))
    written.append(path)
    return written


def reconstruction_table(folder: Path) -> Table | None:
    """R3Mem reconstruction quality per memory size, next to the same decoding from an empty memory."""
    from r3mem_bench.reconstruction import empty_label, load_reconstruction

    points, _ = load_reconstruction(folder)
    if not points:
        return None
    measures = sorted({p["y_name"] for p in points})
    columns = [c for m in measures for c in (m, f"{m} (empty memory)")]
    rows = []
    for label in sorted({p["label"] for p in points if not p["label"].endswith("empty memory")}):
        for x in sorted({p["x"] for p in points if p["label"] == label}):
            def value(measure: str, lab: str) -> Stat | None:
                ys = [p["y"] for p in points if p["x"] == x and p["y_name"] == measure and p["label"] == lab]
                return Stat(ys[0]) if ys else None

            rows.append(([label, fmt_number(x, count=True)], [v for m in measures
                                                              for v in (value(m, label), value(m, empty_label(label)))]))
    x_name = points[0]["x_name"]
    return Table("r3mem_reconstruction", f"R3Mem reconstruction vs {x_name}", ["method", x_name], columns, rows,
                 note="Teacher-forced token accuracy and greedy ROUGE-L of each held-out chunk decoded from its own "
                      "memory; 'empty memory': the same decoder from the memory of no text.")
