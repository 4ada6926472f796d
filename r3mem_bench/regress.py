"""Regression checks of model quality: run a suite and compare every metric with a committed reference.

``r3mem-bench regress --suite ci --reference results/reference/ci.json`` runs the suite into a fresh directory
(or ``--output``, emptied of an earlier suite run unless ``--resume``), then checks each (task, method, metric) against the reference in the metric's direction
(lower is better for perplexity and bits per byte, higher for EM, F1, containment and recall): the current value
may be worse by at most ``max(abs, rel * |reference|)``, or with ``--use-ci`` by the distance from the reference
value to the worse end of its bootstrap 95% interval. Only quality metrics are checked unless the suite's
``regress.metrics`` lists others (timings are noisy). Tolerances come from the suite's ``regress.tolerances``,
then the reference file's ``tolerances``, then :data:`DEFAULT_TOLERANCES`, by full metric name (``f1/temporal``)
or its base (``f1``).

The reference records, per cell, hashes of the model (name and architecture from the manifests), of the data
(example ids and their token/byte counts, questions and answers from the rows) and of the run config; a
comparison across a different setup is refused (exit 2) unless ``--force``. ``--update-reference`` writes the
current numbers as the new reference and prints what changed. Exit codes: 0 all hold, 1 regression, 2 usage/data.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pandas as pd
import typer

from r3mem_bench.errors import CheckFailed, UserError
from r3mem_bench.report import QUALITY, Report, ReportOptions, build_report, collect, load_run, metric_direction

FORMAT = "r3mem-bench-reference/1"
DEFAULT_TOLERANCES = {"ppl": {"rel": 0.002}, "ppl_after_first": {"rel": 0.002}, "bits_per_byte": {"rel": 0.002},
                      "ppl_beyond_16": {"rel": 0.002}, "ppl_beyond_64": {"rel": 0.002},
                      "em": {"abs": 0.02}, "f1": {"abs": 0.02}, "contains": {"abs": 0.02}, "recall": {"abs": 0.02}}


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def data_fingerprint(family: str, rows: list[dict]) -> str:
    """Hash of what the examples were (not what a method answered): ids with token/byte counts or Q/A text."""
    if family == "lm":
        items = [(r["id"], r["segment_tokens"], r["segment_bytes"]) for r in rows]
    else:
        items = [(r["id"], r.get("corpus_id"), r.get("question"), r.get("answers"), r.get("corpus_tokens"))
                 for r in rows]
    return _hash(sorted(items, key=lambda x: x[0]))


def snapshot(report: Report) -> list[dict]:
    """One reference entry per report cell: setup hashes and every metric with its bootstrap interval."""
    out = []
    for cell in report.cells:
        manifests = []
        for d in sorted({r["path"] for r in _records_of(report, cell)}):
            manifests.append(load_run(Path(d))[0])
        model = {"model": manifests[0]["config"]["model"], "info": manifests[0]["config"].get("model_info")}
        config = [m["config_hash"] for m in sorted(manifests, key=lambda m: m["seed"])]
        rows = [r for rs in cell.rows for r in rs]
        metrics = {}
        for name in sorted(cell.metrics):
            s = report.stat(cell, name)
            if s is None or s.value is None:
                continue
            metrics[name] = {"value": s.value}
            if s.lo is not None:
                metrics[name]["ci"] = [s.lo, s.hi]
        out.append({"model": cell.model, "task": cell.task, "family": cell.family, "method": cell.method,
                    "seeds": cell.seeds, "n": cell.n,
                    "setup": {"model": _hash(model), "data": data_fingerprint(cell.family, rows), "config": _hash(config)},
                    "model_name": cell.model, "config": manifests[0]["config"], "metrics": metrics})
    return out


def _records_of(report: Report, cell) -> list[dict]:
    return [r for r in report.records if (r["model"], r["task"], r["method"]) == (cell.model, cell.task, cell.method)]


def _key(entry: dict) -> tuple:
    return entry["model"], entry["task"], entry["method"]


def match(reference: dict, current: list[dict]) -> tuple[list[tuple[dict, dict | None]], list[dict]]:
    """Pair reference cells with current ones: by (task, method) when each side has one model (so a changed
    model is reported as such), else by (model, task, method). Returns the pairs and the unmatched current cells."""
    one_model = len({e["model"] for e in reference["cells"]}) <= 1 and len({e["model"] for e in current}) <= 1
    key = (lambda e: _key(e)[1:]) if one_model else _key
    now = {key(e): e for e in current}
    pairs = [(ref, now.pop(key(ref), None)) for ref in reference["cells"]]
    return pairs, list(now.values())


@dataclass
class Check:
    """One metric of one cell compared with the reference."""

    task: str
    method: str
    metric: str
    reference: Optional[float]
    current: Optional[float]
    allowed: float
    verdict: str  # ok | improved | REGRESSION | missing

    @property
    def delta(self) -> Optional[float]:
        """Current minus reference."""
        return None if self.reference is None or self.current is None else self.current - self.reference


def tolerance(metric: str, suite_tol: dict, ref_tol: dict) -> dict:
    """The ``{abs, rel}`` tolerance of a metric: suite config, then reference file, then defaults."""
    base = metric.split("/", 1)[0]
    for source in (suite_tol, ref_tol, DEFAULT_TOLERANCES):
        for name in (metric, base):
            if name in source:
                tol = source[name]
                if not isinstance(tol, dict) or set(tol) - {"abs", "rel"}:
                    raise UserError(f"tolerance of '{name}': expected {{abs: X, rel: Y}}, got {tol!r}; fix the "
                                    "suite's regress.tolerances or the reference's tolerances")
                return tol
    return {"abs": 0.0}


def checked_metrics(entry: dict, configured: list[str] | None) -> list[str]:
    """Metrics compared for a reference entry: the configured list, else the family's quality metrics."""
    names = list(entry["metrics"])
    if configured:
        return [m for m in names if m in configured or m.split("/", 1)[0] in configured]
    quality = set(QUALITY.get(entry["family"], ()))
    return [m for m in names if m in quality or (m.split("/", 1)[0] in quality and "/" in m)]


def compare(reference: dict, current: list[dict], suite_tol: dict, metrics: list[str] | None,
            use_ci: bool) -> list[Check]:
    """Check every metric of every reference cell against the current run."""
    checks = []
    for ref, cur in match(reference, current)[0]:
        for m in checked_metrics(ref, metrics):
            r = ref["metrics"][m]
            direction = metric_direction(m)
            if direction is None:
                continue
            tol = tolerance(m, suite_tol, reference.get("tolerances", {}))
            allowed = max(float(tol.get("abs", 0.0)), float(tol.get("rel", 0.0)) * abs(r["value"]))
            if use_ci and r.get("ci"):
                lo, hi = r["ci"]
                allowed = (hi - r["value"]) if direction == "lower" else (r["value"] - lo)
            c = (cur or {}).get("metrics", {}).get(m)
            if c is None:
                checks.append(Check(ref["task"], ref["method"], m, r["value"], None, allowed, "missing"))
                continue
            worse = (c["value"] - r["value"]) if direction == "lower" else (r["value"] - c["value"])
            verdict = "REGRESSION" if worse > allowed + 1e-12 else ("improved" if -worse > allowed + 1e-12 else "ok")
            checks.append(Check(ref["task"], ref["method"], m, r["value"], c["value"], allowed, verdict))
    return checks


def config_diff(a, b, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two manifest configs."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += config_diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def setup_mismatches(reference: dict, current: list[dict]) -> list[str]:
    """Cells whose model, data or config differ from the reference (or that exist on one side only)."""
    pairs, extra = match(reference, current)
    problems = []
    for ref, cur in pairs:
        if cur is None:
            problems.append(f"{ref['task']} · {ref['method']} ({ref['model']}): not in the current run")
            continue
        for what in ("model", "data", "config"):
            if ref["setup"][what] != cur["setup"][what]:
                names = (f"{ref['model']} vs {cur['model']}, " if what == "model" and ref["model"] != cur["model"]
                         else "")
                where = ""
                if what == "config" and isinstance(ref.get("config"), dict):
                    keys = config_diff(ref["config"], cur.get("config") or {})
                    where = f"in {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}; " if keys else ""
                problems.append(f"{ref['task']} · {ref['method']}: {what} differs ({where}reference vs current: "
                                f"{names}hash {ref['setup'][what]} vs {cur['setup'][what]})")
    for cur in extra:
        problems.append(f"{cur['task']} · {cur['method']} ({cur['model']}): not in the reference")
    return problems


# ---- outputs ---------------------------------------------------------------------------------------------------
def _num(v: Optional[float]) -> str:
    return "—" if v is None else f"{v:.6g}"


def checks_frame(checks: list[Check]) -> pd.DataFrame:
    """The checks as a table (task, method, metric, reference, current, delta, allowed, verdict)."""
    return pd.DataFrame([{"task": c.task, "method": c.method, "metric": c.metric, "reference": _num(c.reference),
                          "current": _num(c.current), "delta": _num(c.delta), "allowed": _num(c.allowed),
                          "verdict": c.verdict} for c in checks],
                        columns=["task", "method", "metric", "reference", "current", "delta", "allowed", "verdict"])


def junit_xml(checks: list[Check], suite: str, seconds: float) -> str:
    """JUnit XML: one test case per checked metric, a failure element per regression or missing metric."""
    bad = [c for c in checks if c.verdict in ("REGRESSION", "missing")]
    root = ET.Element("testsuites", name="r3mem-bench regress", tests=str(len(checks)), failures=str(len(bad)))
    ts = ET.SubElement(root, "testsuite", name=f"regress.{suite}", tests=str(len(checks)), failures=str(len(bad)),
                       errors="0", skipped="0", time=f"{seconds:.3f}")
    for c in checks:
        tc = ET.SubElement(ts, "testcase", classname=f"{suite}.{c.task}.{c.method}", name=c.metric, time="0")
        if c.verdict in ("REGRESSION", "missing"):
            msg = (f"{c.metric}: {_num(c.current)} vs reference {_num(c.reference)} (delta {_num(c.delta)}, "
                   f"allowed {_num(c.allowed)})") if c.verdict == "REGRESSION" else f"{c.metric}: missing in the run"
            ET.SubElement(tc, "failure", message=msg, type=c.verdict).text = msg
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


def summary_markdown(checks: list[Check], suite: str, reference: str) -> str:
    """A Markdown summary for a CI step summary."""
    bad = [c for c in checks if c.verdict in ("REGRESSION", "missing")]
    head = (f"## r3mem-bench regress: {suite}\n\n"
            + (f"**{len(bad)} regression(s)** among {len(checks)} checks" if bad else f"All {len(checks)} checks hold")
            + f" against `{reference}`.\n\n")
    return head + checks_frame(checks).to_markdown(index=False, disable_numparse=True) + "\n"


def reference_diff(old: dict | None, new: dict, metrics: list[str] | None = None) -> pd.DataFrame:
    """Checked metrics whose reference value changes (or appear/disappear) with an update."""
    def values(ref: dict) -> dict:
        return {(*_key(e), m): e["metrics"][m]["value"] for e in ref.get("cells", []) for m in checked_metrics(e, metrics)}

    olds, news = values(old or {}), values(new)  # keyed by (model, task, method, metric)
    rows = []
    for k in sorted(set(olds) | set(news)):
        a, b = olds.get(k), news.get(k)
        if a != b:
            rows.append({"task": k[1], "method": k[2], "metric": k[3], "old": _num(a), "new": _num(b)})
    return pd.DataFrame(rows, columns=["task", "method", "metric", "old", "new"])


def load_reference(path: Path) -> dict:
    """A reference file written by ``--update-reference``."""
    if not path.is_file():
        raise UserError(f"--reference {path}: not found; fix: create it with `r3mem-bench regress --suite NAME "
                        f"--reference {path} --update-reference`")
    try:
        ref = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"--reference {path}: not valid JSON; fix: regenerate it with --update-reference") from None
    if not isinstance(ref, dict) or ref.get("format") != FORMAT or not isinstance(ref.get("cells"), list):
        raise UserError(f"--reference {path}: not an r3mem-bench reference ({FORMAT}); fix: regenerate it with "
                        "--update-reference")
    return ref


def fresh_output(out: Path, echo) -> None:
    """Empty ``out`` of an earlier suite run so the check measures this code, not stored results."""
    from r3mem_bench.suite import SUITE_FILE

    if not out.exists() or not any(out.iterdir()):
        return
    if not (out / SUITE_FILE).is_file():
        raise UserError(f"--output {out}: not empty and not a suite run; fix: give an empty or new directory")
    for name in ("runs", ".suite", "report", "plots", SUITE_FILE):
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    echo(f"regress: cleared the earlier run in {out} (use --resume to keep finished cells)")


def run_regress(suite_name: str, reference_path: str, output: str | None = None, use_ci: bool = False,
                junit: str | None = None, summary: str | None = None, update: bool = False, force: bool = False,
                executor: str = "local", resume: bool = False, echo=None) -> list[Check]:
    """Run the suite and compare it with the reference (see the module docstring); returns the checks."""
    from r3mem_bench.provenance import git_commit, library_versions
    from r3mem_bench.store import atomic_write_text
    from r3mem_bench.suite import load_suite, run_suite

    echo = echo or (lambda msg: print(msg, file=sys.stderr))
    suite = load_suite(suite_name)
    ref_path = Path(reference_path)
    old = load_reference(ref_path) if not update else (load_reference(ref_path) if ref_path.is_file() else None)
    tmp = None if output else tempfile.mkdtemp(prefix=f"r3mem-regress-{suite.name}-")
    out = output or tmp
    if output and not resume:
        fresh_output(Path(output), echo)
    t0 = time.perf_counter()
    try:
        result = run_suite(suite, out, executor, quiet=True, echo=echo)
        if result["failed"]:
            raise UserError(f"regress: {len(result['failed'])} cell(s) of suite {suite.name} failed (first: "
                            f"{result['failed'][0][1]}); fix: make the suite run with `r3mem-bench suite`")
        opts = suite.report
        report = build_report(collect([str(Path(out) / "runs")]), ReportOptions(
            n_resamples=int(opts.get("n_resamples", 1000)), seed=int(opts.get("seed", 0)),
            ci_unit=str(opts.get("ci_unit", "auto"))))
        current = snapshot(report)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    seconds = time.perf_counter() - t0
    if update:
        new = {"format": FORMAT, "suite": suite.name, "suite_digest": suite.digest,
               "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "git_commit": git_commit(),
               "versions": library_versions(), "bootstrap": {"n_resamples": report.options.n_resamples,
                                                             "seed": report.options.seed, "unit": report.options.ci_unit},
               "tolerances": (old or {}).get("tolerances", {}), "cells": current}
        atomic_write_text(ref_path, json.dumps(new, indent=2, sort_keys=True) + "\n")
        diff = reference_diff(old, new, suite.regress.get("metrics"))
        echo(f"reference {ref_path} written ({len(current)} cells, suite run {seconds:.1f} s); "
             + ("new reference." if old is None else "changes:" if len(diff) else "no checked metric changed."))
        if old is not None and len(diff):
            echo(diff.to_markdown(index=False, disable_numparse=True))
        return []
    problems = setup_mismatches(old, current)
    if problems and not force:
        raise UserError(f"regress: the reference {ref_path} was made with a different setup: {'; '.join(problems[:5])}"
                        f"{' ...' if len(problems) > 5 else ''}; fix: --update-reference to accept the new setup, "
                        "or --force to compare anyway")
    for p in problems:
        echo(f"warning (--force): {p}")
    checks = compare(old, current, suite.regress.get("tolerances") or {}, suite.regress.get("metrics"), use_ci)
    if not checks:
        raise UserError(f"regress: no metric of {ref_path} could be checked; fix: regenerate it with --update-reference "
                        "or list metrics in the suite's regress.metrics")
    if junit:
        atomic_write_text(Path(junit), junit_xml(checks, suite.name, seconds))
    if summary:
        atomic_write_text(Path(summary), summary_markdown(checks, suite.name, str(ref_path)))
    return checks


def register(app: typer.Typer) -> None:
    """Add the ``regress`` command to the CLI."""

    @app.command("regress")
    def regress_cmd(
        suite: str = typer.Option("ci", "--suite", help="Suite name (configs/NAME.yaml) or suite YAML file."),
        reference: str = typer.Option(..., "--reference", help="Reference JSON (written by --update-reference)."),
        output: Optional[str] = typer.Option(None, "--output", "-o", help="Keep the run here (default: a temporary directory)."),
        use_ci: bool = typer.Option(False, "--use-ci", help="Allow the reference's bootstrap interval instead of fixed tolerances."),
        junit: Optional[str] = typer.Option(None, "--junit", help="Write JUnit XML here."),
        summary: Optional[str] = typer.Option(None, "--summary", help="Write a Markdown summary here (CI step summary)."),
        update_reference: bool = typer.Option(False, "--update-reference", help="Write the current numbers as the reference."),
        force: bool = typer.Option(False, "--force", help="Compare even when model, data or config differ."),
        executor: str = typer.Option("local", "--executor", help="local or ray."),
        resume: bool = typer.Option(False, "--resume", help="Keep finished cells found in --output (else rerun all)."),
        method_path: list[str] = typer.Option([], "--method-path", help="Plugin method .py file or folder (repeatable)."),
    ) -> None:
        """Run a suite and compare its quality metrics with a reference; exit 1 on a regression."""
        from r3mem_bench.methods import load_method_paths

        load_method_paths(method_path)
        checks = run_regress(suite, reference, output, use_ci, junit, summary, update_reference, force, executor,
                             resume)
        if update_reference:
            return
        typer.echo(checks_frame(checks).to_markdown(index=False, disable_numparse=True))
        bad = [c for c in checks if c.verdict in ("REGRESSION", "missing")]
        if bad:
            names = ", ".join(f"{c.task}/{c.method}/{c.metric}" for c in bad[:8])
            raise CheckFailed(f"{len(bad)} regression(s): {names}{' ...' if len(bad) > 8 else ''}")
        typer.echo(f"regress {suite}: all {len(checks)} checks hold")
