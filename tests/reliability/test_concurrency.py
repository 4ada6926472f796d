"""Concurrency: two processes writing the same output directory are never interleaved.

The store takes a per-(task, method) file lock; a second writer of the same cell is refused with a one-line
message (exit 2) while the first holds it, and the first finishes with a complete, strictly valid file.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time

import pytest
from reliability_helpers import TINY, all_rows, fork_cli, prepare_fork, strict_rows, write_task


@pytest.fixture
def tasks(tmp_path):
    """A seeded 8-document task folder."""
    return write_task(tmp_path / "data", docs=8)


def test_second_writer_of_the_same_cell_is_refused(tasks, tmp_path):
    prepare_fork()  # before the first writer starts, so that the second one is ready in milliseconds
    out = tmp_path / "out"
    args = ["run", "--task", "reltask", "--method", "no_memory", "--include-path", str(tasks), *TINY,
            "--output", str(out)]
    first = subprocess.Popen([sys.executable, "-m", "r3mem_bench.cli", *args], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "R3MEM_BENCH_TEST_DELAY": "3"})  # holds the lock for ~24 s
    deadline = time.time() + 120
    results = out / "reltask" / "no_memory" / "results.jsonl"
    while time.time() < deadline and first.poll() is None and not (results.exists() and results.read_bytes()):
        time.sleep(0.02)
    assert first.poll() is None, "first writer finished before the second could start"
    second = fork_cli(args)  # a real second process that starts in milliseconds, while the first holds the lock
    second.join(60)
    assert second.exitcode == 2, "the second writer was not refused"
    assert first.poll() is None, "the first writer stopped"
    os.kill(first.pid, signal.SIGKILL)  # enough waiting: the first writer's rows so far must be intact
    first.wait(30)
    before = strict_rows(results)
    assert 1 <= len(before) < 8
    finish = fork_cli(args)
    finish.join(120)
    assert finish.exitcode == 0
    rows = strict_rows(results)
    assert [r["id"] for r in rows] == [f"doc{i}" for i in range(8)]
    assert rows[: len(before)] == before


def test_refusal_message_is_one_clear_line(tasks, tmp_path):
    """The refused process says who holds the directory and what to do, in one line, without a traceback."""
    from filelock import FileLock

    out = tmp_path / "out"
    cell = out / "reltask" / "no_memory"
    cell.mkdir(parents=True)
    holder = multiprocessing.get_context("fork")  # a real second process holds the lock
    ready, release = holder.Event(), holder.Event()

    def hold() -> None:
        with FileLock(str(cell / ".lock")):
            ready.set()
            release.wait(60)

    p = holder.Process(target=hold, daemon=True)
    p.start()
    assert ready.wait(30)
    try:
        proc = subprocess.run([sys.executable, "-m", "r3mem_bench.cli", "run", "--task", "reltask", "--method",
                               "no_memory", "--include-path", str(tasks), *TINY, "--output", str(out)],
                              capture_output=True, text=True, timeout=120)
    finally:
        release.set()
        p.join(30)
    assert proc.returncode == 2
    assert "another r3mem-bench process is writing" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (cell / "results.jsonl").exists() or not (cell / "results.jsonl").read_bytes()


def test_writers_of_different_cells_run_side_by_side(tasks, tmp_path):
    """Same output directory, different methods: both finish, each file complete and strictly valid."""
    out = tmp_path / "out"
    base = ["run", "--task", "reltask", "--include-path", str(tasks), *TINY, "--output", str(out)]
    procs = [fork_cli([*base, "--method", m], {"R3MEM_BENCH_TEST_DELAY": "0.05"}) for m in ("no_memory", "full_context")]
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    got = all_rows(out)
    assert sorted(got) == ["reltask/full_context", "reltask/no_memory"]
    assert all(len(rows) == 8 for rows in got.values())
