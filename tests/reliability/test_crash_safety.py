"""Crash safety: SIGKILL at random points of ``run`` never leaves a truncated, duplicated or wrong result, and a
rerun completes with numbers identical to an uninterrupted run.

Most kills hit forked runs (see ``reliability_helpers``), slowed by the test-only ``R3MEM_BENCH_TEST_DELAY`` so the
random kill points fall inside the evaluate loop as well as in start-up, manifest writing and between cells; fresh
``python -m r3mem_bench.cli`` processes are also killed at random points of their start-up and evaluation.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from reliability_helpers import TINY, all_rows, fork_cli, prepare_fork, strict_rows, write_task

DELAY = {"R3MEM_BENCH_TEST_DELAY": "0.12"}
KILLS = int(os.environ.get("R3MEM_RELIABILITY_KILLS", "20"))
BUDGET_S = 45.0  # on a busy machine stop killing after this long (at least MIN_KILLS kills are always done)
MIN_KILLS = 8


@pytest.fixture
def args(tmp_path) -> list[str]:
    """``run`` arguments: full_context and no_memory on a seeded 5-document task (10 result rows)."""
    tasks = write_task(tmp_path / "data")
    return ["run", "--task", "reltask", "--method", "full_context,no_memory", "--include-path", str(tasks), *TINY]


def _run_to_end(args: list[str], out: Path, env: dict | None = None) -> None:
    proc = fork_cli([*args, "--output", str(out)], env)
    proc.join(120)
    assert proc.exitcode == 0, f"run into {out} exited {proc.exitcode}"


def _check_consistent(got: dict, want: dict) -> int:
    """Every stored row equals the reference row (never a wrong number); returns how many rows exist."""
    n = 0
    for cell, rows in got.items():
        for ident, row in rows.items():
            assert row == want[cell][ident], f"{cell}/{ident} differs from the uninterrupted run"
            n += 1
    return n


def test_repeated_random_sigkill_then_resume_matches_uninterrupted(args, tmp_path):
    ref, out = tmp_path / "ref", tmp_path / "killed"
    prepare_fork()  # not part of the timed run: a forked run starts with everything loaded
    t0 = time.perf_counter()
    _run_to_end(args, ref, DELAY)
    full = time.perf_counter() - t0  # start-up to exit of one uninterrupted forked run
    want = all_rows(ref)
    assert sum(len(v) for v in want.values()) == 10 and len(want) == 2
    rng = random.Random(20261125)
    progress = []
    start = time.perf_counter()
    for k in range(KILLS):
        if k >= MIN_KILLS and time.perf_counter() - start > BUDGET_S:
            break
        proc = fork_cli([*args, "--output", str(out)], DELAY)
        time.sleep(rng.uniform(0.0, full))  # anywhere from start-up to the last row
        if proc.is_alive():
            os.kill(proc.pid, signal.SIGKILL)
        proc.join(30)
        progress.append(_check_consistent(all_rows(out), want))
        for manifest in out.rglob("manifest.json"):
            json.loads(manifest.read_text())  # never half a manifest
    assert progress[-1] > 0, f"kills never let a row through: {progress}"
    assert progress == sorted(progress), f"finished rows were lost: {progress}"
    _run_to_end(args, out)
    assert all_rows(out) == want
    from r3mem_bench.report import collect

    got = {(r["task"], r["method"]): r["metrics"] for r in collect([str(out)])}
    ref_metrics = {(r["task"], r["method"]): r["metrics"] for r in collect([str(ref)])}
    assert len(got) == 2
    for key, metrics in got.items():
        for name in ("ppl", "bits_per_byte", "tokens_scored", "tokens_processed", "state_bytes"):
            assert metrics[name] == ref_metrics[key][name], (key, name)


def test_sigkill_of_a_fresh_process_at_random_points(args, tmp_path):
    """Real ``python -m r3mem_bench.cli`` processes, killed during start-up or evaluation, then resumed."""
    ref, out = tmp_path / "ref", tmp_path / "killed"
    _run_to_end(args, ref)
    want = all_rows(ref)
    rng = random.Random(7)
    env = {**os.environ, **DELAY}
    for during_startup in (True, False):
        proc = subprocess.Popen([sys.executable, "-m", "r3mem_bench.cli", *args, "--output", str(out)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if during_startup:  # imports, model loading, task loading
            time.sleep(rng.uniform(0.3, 2.0))
        else:  # wait until the first manifest is written, then kill at a random point of the evaluation
            deadline = time.time() + 60
            while time.time() < deadline and not list(out.rglob("manifest.json")) and proc.poll() is None:
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 1.2))
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        _check_consistent(all_rows(out), want)
    _run_to_end(args, out)
    assert all_rows(out) == want


def test_partial_last_line_is_cut_and_redone(args, tmp_path):
    """What a kill inside ``write`` could leave: half a line without newline. It is dropped and redone."""
    _run_to_end(args, tmp_path / "out")
    want = all_rows(tmp_path / "out")
    results = next((tmp_path / "out").rglob("no_memory/results.jsonl"))
    lines = results.read_bytes().splitlines(keepends=True)
    results.write_bytes(b"".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])
    from r3mem_bench.report import collect

    assert [r["n"] for r in collect([str(tmp_path / "out")]) if r["method"] == "no_memory"] == [len(lines) - 1]
    _run_to_end(args, tmp_path / "out")
    assert all_rows(tmp_path / "out") == want
    assert len(strict_rows(results)) == len(lines)


def test_sigkill_during_ingest_then_rerun_matches_uninterrupted(tmp_path):
    """A dialogue run killed (SIGKILL) in the middle of MemoryBank's summaries, before any row: the rerun reads
    the finished summaries back from the run's ingest cache, writes the rest and ends with the rows of an
    uninterrupted run."""
    from r3mem_bench.ingest_cache import KILL_AFTER_WRITES_ENV

    argv = [sys.executable, "-m", "r3mem_bench.cli", "run", "--task", "persona", "--method", "memorybank", "--limit",
            "2", "--param", "generate=false", "--method-arg", "summary_tokens=6", *TINY]
    ref, out = tmp_path / "ref", tmp_path / "killed"
    done = subprocess.run([*argv, "--output", str(ref)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    summaries = ref / ".cache" / "ingest" / "memorybank-summaries"
    total = len(list(summaries.rglob("*.json")))
    assert total > 4
    killed = subprocess.run([*argv, "--output", str(out)], capture_output=True, text=True, timeout=300,
                            env={**os.environ, KILL_AFTER_WRITES_ENV: "3"})
    assert killed.returncode == -signal.SIGKILL
    assert len(list((out / ".cache" / "ingest" / "memorybank-summaries").rglob("*.json"))) == 3
    assert not any(p.read_text() for p in out.rglob("results.jsonl"))  # killed inside ingest, before any row
    again = subprocess.run([*argv, "--output", str(out)], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert all_rows(out) == all_rows(ref)
    assert len(list((out / ".cache" / "ingest" / "memorybank-summaries").rglob("*.json"))) == total
