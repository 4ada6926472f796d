"""The paper report: tables with intervals, bold best and p-values; byte-identical regeneration of tables and
figures (in another process, with another hash seed); missing cells of a partial suite listed, not dropped."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from r3mem_bench.paper import paper_report
from r3mem_bench.report import ReportOptions, build_report, collect, render, write_tables
from r3mem_bench.suite import load_suite, report_suite, run_suite

SUITE = """
suite: rep
model: tiny-random
limit: 2
threads: 1
reference: no_memory
tasks:
  - {task: wikitext2, params: {segment_len: 48, max_tokens: 144}}
  - {task: needle, limit: 3, params: {n_corpora: 1, n_passages: 4, max_new_tokens: 2}}
  - {task: persona, limit: 3, params: {max_new_tokens: 2}}
methods: [no_memory, full_context]
"""


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_lm):
    """A finished tiny suite (LM, RAG and dialogue cells) and its written report."""
    root = tmp_path_factory.mktemp("report")
    (root / "rep.yaml").write_text(SUITE)
    suite = load_suite(str(root / "rep.yaml"))
    out = root / "out"
    run_suite(suite, str(out), echo=lambda m: None)
    report_suite(str(out), suite, plots=True, r3mem_dir=str(root / "no-r3mem"), echo=lambda m: None)
    return suite, out


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


def test_tables_and_figures_regenerate_byte_identically(finished, tmp_path):
    _, out = finished
    tables, plots = _files(out / "report"), _files(out / "plots")
    assert {"main.md", "main.csv", "main.tex", "lm.md", "lm_position.tex", "rag.csv", "dialogue_categories.md",
            "lm_frontier.md", "report.md"} <= set(tables)
    assert {"lm_position.png", "lm_position.pdf", "quality_vs_memory.png", "latency_vs_history.pdf",
            "dialogue_categories.png", "lm_frontier.png", "lm_frontier.pdf"} <= set(plots)
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    proc = subprocess.run([sys.executable, "-m", "r3mem_bench.cli", "report", str(out), "--tables", str(tmp_path / "t"),
                           "--plots", str(tmp_path / "p"), "--r3mem-results", str(tmp_path / "none")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "reconstruction plot skipped" in proc.stderr
    assert _files(tmp_path / "t") == tables
    assert _files(tmp_path / "p") == plots


def test_main_table_has_intervals_bold_best_and_p_values(finished):
    _, out = finished
    md = (out / "report" / "main.md").read_text()
    assert "wikitext2 ppl_after_first" in md and "needle f1" in md and "persona f1" in md
    fc = next(line for line in md.splitlines() if line.startswith("| full_context"))
    assert "±" in fc and "(p=" in fc
    nm = next(line for line in md.splitlines() if line.startswith("| no_memory"))
    assert "(p=" not in nm  # the reference is not tested against itself
    tex = (out / "report" / "main.tex").read_text()
    assert "\\toprule" in tex and "\\bottomrule" in tex and "$\\pm$" in tex and "\\textbf{" in tex
    assert "no\\_memory" in tex
    csv = (out / "report" / "main.csv").read_text().splitlines()
    assert "wikitext2 ppl_after_first_ci_low" in csv[0] and len(csv) == 3


def test_interval_values_match_the_runs(finished):
    _, out = finished
    records = collect([str(out)])
    rep = build_report(records, ReportOptions(reference="no_memory"))
    for r in records:
        if r["family"] != "lm":
            continue
        s = rep.stat(rep.cell(r["model"], r["task"], r["method"]), "ppl")
        assert s.value == r["metrics"]["ppl"] and s.lo <= s.value <= s.hi


def test_partial_run_lists_missing_cells(finished, tmp_path):
    _, out = finished
    part = tmp_path / "partial"
    shutil.copytree(out, part)
    runs = part / "runs" / "tiny-random" / "seed-0"
    shutil.rmtree(runs / "needle" / "full_context")  # never ran
    results = runs / "wikitext2" / "no_memory" / "results.jsonl"  # crashed after one example
    results.write_text(results.read_text().splitlines()[0] + "\n")
    for marker in (part / ".suite" / "done").glob("*"):
        if ".needle.full_context." in marker.name or ".wikitext2.no_memory." in marker.name:
            marker.unlink()
    saved = part / "suite.yaml"
    import yaml

    doc = yaml.safe_load(saved.read_text())
    doc["config"]["methods"].append("not_written_yet")
    saved.write_text(yaml.safe_dump(doc))
    messages = []
    text = paper_report(collect([str(part)]), [str(part)], tables=str(tmp_path / "t"), echo=messages.append)
    assert "Missing cells (5)" in text
    assert "incomplete: 1 examples stored" in text and "not run" in text
    assert "method 'not_written_yet' is not registered" in text
    assert messages and "missing or unfinished" in messages[0]
    missing = (tmp_path / "t" / "missing.csv").read_text()
    assert "needle,full_context" in missing and "wikitext2,no_memory" in missing
    assert "| no_memory" in (tmp_path / "t" / "main.md").read_text()  # partial numbers still shown


def test_json_render_keeps_its_format(finished):
    _, out = finished
    data = json.loads(render(collect([str(out)]), "json"))
    assert data and all(set(r) == {"task", "method", "n", "metrics"} for r in data)
    assert write_tables  # imported for the CLI path above


def test_r3mem_reconstruction_plot_reads_json_or_explains(tmp_path):
    from r3mem_bench.plots import plot_reconstruction

    files, message = plot_reconstruction(tmp_path / "absent", tmp_path / "p")
    assert files == [] and "no JSON" in message
    (tmp_path / "r3mem").mkdir()
    (tmp_path / "r3mem" / "bad.json").write_text(json.dumps({"points": [{"size": 1}]}))
    files, message = plot_reconstruction(tmp_path / "r3mem", tmp_path / "p")
    assert files == [] and "no records with a memory size" in message
    (tmp_path / "r3mem" / "probe.json").write_text(json.dumps(
        {"label": "r3mem", "points": [{"memory_tokens": m, "token_accuracy": a} for m, a in ((8, 0.3), (16, 0.4))]}))
    files, message = plot_reconstruction(tmp_path / "r3mem", tmp_path / "p")
    assert message == "" and {p.name for p in files} == {"r3mem_reconstruction.png", "r3mem_reconstruction.pdf"}


def test_memory_gain_table_and_reconstruction_table(finished, tmp_path):
    from r3mem_bench.report import Report, reconstruction_table, table_latex, table_markdown

    _, out = finished
    rep = Report(collect([str(out)]))
    gain = rep.memory_gain_table()
    rows = {labels[-1]: vals for labels, vals in gain.rows}
    assert set(rows) == {"no_memory", "full_context"}
    ppl, vs_none, vs_reset, vs_window, gap = rows["full_context"]
    assert vs_none.lo <= vs_none.value <= vs_none.hi and vs_reset is None and vs_window is None
    assert gap.value == pytest.approx(100.0)
    assert rows["no_memory"][1] is None and rows["no_memory"][4].value == 0.0
    assert "[" in table_markdown(gain) and r"$\Delta$" in table_latex(gain)
    assert reconstruction_table(tmp_path / "absent") is None
    (tmp_path / "reconstruct_M8.json").write_text(json.dumps(
        {"memory_tokens": 8, "token_accuracy": 0.6, "empty_memory_token_accuracy": 0.2, "rouge_l": 0.5,
         "empty_memory_rouge_l": 0.1}))
    recon = reconstruction_table(tmp_path)
    assert recon.columns == ["rouge_l", "rouge_l (empty memory)", "token_accuracy", "token_accuracy (empty memory)"]
    assert [v.value for v in recon.rows[0][1]] == [0.5, 0.1, 0.6, 0.2]


def test_frontier_table_orders_methods_by_state_bytes(finished):
    from r3mem_bench.plots import series_of
    from r3mem_bench.report import Report

    _, out = finished
    rep = Report(collect([str(out)]))
    table = rep.frontier_table()
    rows = [(labels[-1], vals[0].value) for labels, vals in table.rows]
    assert [m for m, _ in rows] == ["no_memory", "full_context"] and rows[0][1] == 0 < rows[1][1]
    assert series_of("window@r3mem") == series_of("no_memory:window=64") == "sliding window"
    assert series_of("r3mem:memory_tokens=4") == "r3mem" and series_of("rmt") == "rmt"
