"""End-to-end checks of the harness foundation on tiny-random: run, resume, kill/resume, report, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import run_cli

TINY = ["--model", "tiny-random", "--threads", "1", "--quiet"]


def _lm_run(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return run_cli("run", "--task", "lm", "--method", "full_context,no_memory", "--limit", "2",
                   "--max-tokens", "192", "--segment-len", "64", "--output", str(out), *TINY, *extra)


def _rows(out: Path, method: str) -> list[dict]:
    files = list(out.rglob(f"{method}/results.jsonl"))
    assert len(files) == 1, files
    return [json.loads(line) for line in files[0].read_text().splitlines()]


def test_list_shows_families_methods_models():
    proc = run_cli("list")
    assert proc.returncode == 0, proc.stderr
    for word in ("lm:", "wikitext2 (default)", "full_context", "no_memory", "smollm2-135m", "tiny-random"):
        assert word in proc.stdout


def test_run_writes_rows_manifest_and_report_json(tmp_path):
    proc = _lm_run(tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "full_context" in proc.stdout and "ppl" in proc.stdout
    rows = _rows(tmp_path, "full_context")
    assert len(rows) == 2 and all(r["tokens_processed"] > 0 for r in rows)
    manifest = json.loads(next(tmp_path.rglob("full_context/manifest.json")).read_text())
    for key in ("config_hash", "seed", "model", "versions", "git_commit"):
        assert key in manifest
    assert manifest["config"]["model_info"]["prefix_token_id"] == 1
    rep = run_cli("report", str(tmp_path), "--format", "json")
    assert rep.returncode == 0, rep.stderr
    records = json.loads(rep.stdout)
    assert {r["method"] for r in records} == {"full_context", "no_memory"}
    for r in records:
        assert r["n"] == 2 and r["metrics"]["ppl"] > 1 and r["metrics"]["bits_per_byte"] > 0
    for fmt, needle in (("md", "| task"), ("csv", "task,method"), ("latex", "\\begin{tabular}")):
        assert needle in run_cli("report", str(tmp_path), "--format", fmt).stdout


def test_rerun_resumes_without_redoing(tmp_path):
    assert _lm_run(tmp_path).returncode == 0
    before = _rows(tmp_path, "no_memory")
    proc = _lm_run(tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert _rows(tmp_path, "no_memory") == before  # nothing redone, nothing lost


def test_same_seed_same_numbers(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert _lm_run(a).returncode == 0 and _lm_run(b).returncode == 0
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("latency_s", "seconds_per_segment")} for r in rows]
    assert strip(_rows(a, "full_context")) == strip(_rows(b, "full_context"))


def test_sigkill_midway_then_rerun_matches_uninterrupted(tmp_path):
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    assert _lm_run(ref).returncode == 0
    cmd = [sys.executable, "-m", "r3mem_bench.cli", "run", "--task", "lm", "--method", "full_context,no_memory",
           "--limit", "2", "--max-tokens", "192", "--segment-len", "64", "--output", str(killed), *TINY]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list(killed.rglob("results.jsonl")):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert _lm_run(killed).returncode == 0
    for method in ("full_context", "no_memory"):
        got = {r["id"]: r["metrics"] for r in _rows(killed, method)}
        want = {r["id"]: r["metrics"] for r in _rows(ref, method)}
        assert got == want


@pytest.mark.parametrize("args, needle", [
    (["--task", "nope"], "unknown task 'nope'"),
    (["--method", "nope"], "unknown method 'nope'"),
    (["--model", "no_such_model"], "unknown model 'no_such_model'"),
    (["--limit", "0"], "--limit 0"),
    (["--limit", "-3"], "--limit -3"),
    (["--data", "/no/such/file.txt"], "--data /no/such/file.txt"),
])
def test_bad_input_one_line_exit_2(tmp_path, args, needle):
    base = {"--task": "lm", "--method": "no_memory", "--model": "tiny-random"}
    for i in range(0, len(args), 2):
        base[args[i]] = args[i + 1]
    flat = [x for kv in base.items() for x in kv]
    proc = run_cli("run", *flat, "--output", str(tmp_path), "--quiet")
    assert proc.returncode == 2
    assert needle in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args, needle", [(["report"], "Missing argument"), (["run", "--task"], "requires an argument"),
                                          (["run", "--no-such-option"], "No such option")])
def test_usage_errors_are_exit_2_not_internal_errors(args, needle):
    proc = run_cli(*args)
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr and "internal error" not in proc.stderr + proc.stdout


def test_bad_task_yaml_names_the_field(tmp_path):
    (tmp_path / "bad.yaml").write_text("task: mine\nfamily: lm\ndataset: {loader: pydoc}\nparamz: {}\n")
    proc = run_cli("list", "--include-path", str(tmp_path))
    assert proc.returncode == 2 and "unknown field 'paramz'" in proc.stderr
    (tmp_path / "bad.yaml").write_text("task: mine\nfamily: lm\ndataset: {loader: pydoc}\nparams: {segment_len: big}\n")
    proc = run_cli("list", "--include-path", str(tmp_path))
    assert proc.returncode == 2 and "segment_len" in proc.stderr


def test_user_task_via_include_path(tmp_path):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    text = tmp_path / "doc.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 30)
    (tasks / "mine.yaml").write_text(f"task: mine\nfamily: lm\ndataset: {{loader: text_file, path: {text}}}\n"
                                     "params: {segment_len: 32}\n")
    proc = run_cli("run", "--task", "mine", "--method", "no_memory", "--include-path", str(tasks),
                   "--output", str(tmp_path / "out"), *TINY)
    assert proc.returncode == 0, proc.stderr
    assert len(_rows(tmp_path / "out", "no_memory")) == 1


def test_corrupt_line_and_changed_config_are_refused_without_loss(tmp_path):
    assert _lm_run(tmp_path).returncode == 0
    results = next(tmp_path.rglob("no_memory/results.jsonl"))
    good = results.read_text()
    results.write_text("{not json\n" + good)
    proc = _lm_run(tmp_path)
    assert proc.returncode == 2 and "corrupt result line" in proc.stderr and "Traceback" not in proc.stderr
    assert results.read_text() == "{not json\n" + good  # nothing overwritten
    results.write_text(good)
    proc = _lm_run(tmp_path, "--seed", "7")
    assert proc.returncode == 2 and "different config" in proc.stderr
    assert results.read_text() == good


def test_non_writable_output(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    proc = _lm_run(blocker / "sub")  # cannot be created, even by root
    assert proc.returncode == 2 and "--output" in proc.stderr and "Traceback" not in proc.stderr


def test_an_unexpected_error_is_exit_3_with_one_line_naming_the_log(monkeypatch, capsys, tmp_path):
    from r3mem_bench import cli, runner

    def boom(*args, **kwargs):
        raise RuntimeError("something the code did not expect")

    monkeypatch.setenv("R3MEM_BENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(runner, "run", boom)
    monkeypatch.setattr(sys, "argv", ["r3mem-bench", "run", "--task", "wikitext2", "--method", "no_memory",
                                      "--model", "tiny-random", "--output", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 3
    out = capsys.readouterr()
    lines = [line for line in (out.out + out.err).splitlines() if line.strip()]
    assert len(lines) == 1 and "RuntimeError: something the code did not expect" in lines[0], lines
    logs = list((tmp_path / "cache" / "crash-logs").glob("crash-*.log"))
    assert len(logs) == 1 and str(logs[0]) in lines[0].replace("\n", "")
    assert "Traceback (most recent call last)" in logs[0].read_text() and "boom" in logs[0].read_text()
