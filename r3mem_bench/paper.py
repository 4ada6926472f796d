"""``report --paper/--tables/--plots``: the paper's tables and figures from finished runs, with the cells a suite
expected (from ``--suite`` or the ``suite.yaml`` a suite run left) listed when they are missing."""

from __future__ import annotations

from pathlib import Path

from r3mem_bench.errors import UserError
from r3mem_bench.report import (ExpectedCell, ReportOptions, build_report, reconstruction_table, report_markdown,
                                table_csv, table_latex, table_markdown, write_tables)


def _expected_for(dirs: list[str], suite: str | None) -> tuple[list[ExpectedCell] | None, list]:
    """Expected cells from ``--suite`` or from the ``suite.yaml`` a suite run left in ``dirs``; and the suites."""
    from r3mem_bench.suite import expected_cells, load_suite, saved_suite

    expected: list[ExpectedCell] = []
    suites = []
    for d in dirs:
        s = load_suite(suite) if suite else saved_suite(d)
        if s is not None:
            suites.append(s)
            expected += expected_cells(s, d)
    return (expected if suites else None), suites


def paper_report(records: list[dict], dirs: list[str], paper: bool = False, tables: str | None = None,
                 plots: str | None = None, reference: str | None = None, suite: str | None = None,
                 resamples: int = 1000, seed: int = 0, ci_unit: str = "auto", r3mem_results: str | None = None,
                 echo=print) -> str:
    """What ``report --paper/--tables/--plots`` does: write tables and figures; returns the Markdown report."""
    if ci_unit not in ("auto", "document", "segment"):
        raise UserError(f"--ci-unit {ci_unit}: unknown; fix: use auto, document or segment")
    if resamples < 10:
        raise UserError(f"--resamples {resamples}: too few; fix: use 1000 or more")
    expected, suites = _expected_for(dirs, suite)
    suite_ref = next((s.reference for s in suites if s.reference), None)
    order = [m["method"] for s in suites for m in s.methods]
    rep = build_report(records, ReportOptions(reference=reference or suite_ref, n_resamples=resamples, seed=seed,
                                              ci_unit=ci_unit, method_order=order), expected)
    if reference and reference not in rep.methods:
        raise UserError(f"--reference {reference}: no results for that method; fix: use one of {', '.join(rep.methods)}")
    missing = rep.missing()
    if missing:
        echo(f"report: {len(missing)} expected cell(s) missing or unfinished: " + "; ".join(
            f"{m.task} · {m.method} (seed {m.seed}): {m.note}" for m in missing[:10]))
    if tables:
        write_tables(rep, Path(tables))
        recon = reconstruction_table(Path(r3mem_results)) if r3mem_results else None
        if recon is not None:
            from r3mem_bench.store import atomic_write_text

            for ext, fn in (("md", table_markdown), ("csv", table_csv), ("tex", table_latex)):
                atomic_write_text(Path(tables) / f"{recon.name}.{ext}", fn(recon))
    if plots:
        from r3mem_bench.plots import plot_all

        _, messages = plot_all(rep, Path(plots), Path(r3mem_results) if r3mem_results else None)
        for m in messages:
            echo(m)
    return report_markdown(rep)
