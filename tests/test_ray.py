"""The Ray executor: cells run in a worker's private directory and come back to the driver (no shared disk); a
local 2-CPU cluster runs a suite whose worker dies mid-cell, Ray reruns the cell, and the results equal those of
the local executor. Finished cells are not redone."""

from __future__ import annotations

import json
import os
import textwrap


import ray

from r3mem_bench.executors import cell_files, land, run_cell, run_cell_detached
from r3mem_bench.suite import cells, parse_suite, run_suite

CRASHY = '''
"""Test-only method: no_memory whose worker process dies once, while scoring its second document."""
import os
from pathlib import Path

from r3mem_bench.methods import all_methods, register_method
from r3mem_bench.methods.reference import NoMemory

all_methods()  # discover the shipped methods before adding this one


@register_method
class CrashOnce(NoMemory):
    name = "crash_once"
    description = "test only: dies once"

    def score_stream(self, segments):
        self.docs = getattr(self, "docs", 0) + 1
        marker = Path(os.environ["R3MEM_TEST_CRASH_MARKER"])
        if self.docs == 2 and not marker.exists():
            marker.write_text(str(os.getpid()))
            os._exit(1)
        return super().score_stream(segments)
'''

TIMING = {"latency_s", "seconds_per_segment"}


def _rows(out) -> dict:
    found = {}
    for p in sorted(out.rglob("results.jsonl")):
        found[p.parent.name] = [{k: v for k, v in json.loads(line).items() if k not in TIMING}
                                for line in p.read_text().splitlines()]
    return found


def test_ray_suite_survives_a_dead_worker(tmp_path, monkeypatch, tiny_lm):
    (tmp_path / "crashy_methods.py").write_text(textwrap.dedent(CRASHY))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    marker = tmp_path / "crashed"
    monkeypatch.setenv("R3MEM_TEST_CRASH_MARKER", str(marker))
    suite = parse_suite({"suite": "ray", "model": "tiny-random", "limit": 3, "threads": 1, "imports": ["crashy_methods"],
                         "tasks": [{"task": "wikitext2", "params": {"segment_len": 48, "max_tokens": 96}}],
                         "methods": ["no_memory", "crash_once"]}, str(tmp_path / "s.yaml"))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        result = run_suite(suite, str(tmp_path / "ray"), executor="ray", max_retries=2, echo=lambda m: None)
        assert marker.exists(), "the test method never killed its worker"
        assert result["ran"] == 2 and not result["failed"]
        again = run_suite(suite, str(tmp_path / "ray"), executor="ray", echo=lambda m: None)
        assert again["ran"] == 0 and again["skipped"] == 2
    finally:
        ray.shutdown()
    run_suite(suite, str(tmp_path / "local"), executor="local", echo=lambda m: None)  # marker exists: no crash
    ray_rows, local_rows = _rows(tmp_path / "ray"), _rows(tmp_path / "local")
    assert set(ray_rows) == {"no_memory", "crash_once"} and len(ray_rows["crash_once"]) == 3
    assert ray_rows == local_rows


def _cell(tmp_path, output):
    suite = parse_suite({"suite": "d", "model": "tiny-random", "limit": 3, "threads": 1,
                         "tasks": [{"task": "wikitext2", "params": {"segment_len": 48, "max_tokens": 96}}],
                         "methods": ["no_memory"]}, str(tmp_path / "s.yaml"))
    return cells(suite, str(output))[0]


def test_a_detached_cell_needs_no_disk_shared_with_the_driver(tmp_path, tiny_lm):
    """A worker runs the cell where the driver's directory does not even exist for it, and the driver lands the
    files it returns: the same rows as running the cell in place; a partial cell resumes from the rows shipped."""
    unreachable = tmp_path / "not-a-dir"
    unreachable.write_text("a file: nothing can be created under it")
    payload = run_cell_detached(_cell(tmp_path, unreachable / "driver"), {})
    assert not str(payload["where"]).startswith(str(unreachable))
    driver = _cell(tmp_path, tmp_path / "driver")
    result = land(driver, payload)
    local = _cell(tmp_path, tmp_path / "local")
    run_cell(local)
    assert _rows(tmp_path / "driver") == _rows(tmp_path / "local") and len(_rows(tmp_path / "driver")["no_memory"]) == 3
    assert all(str(d).startswith(str(tmp_path / "driver")) for d in result["dirs"])
    # resume: the driver ships the first row it holds; the worker keeps it byte for byte and adds the rest
    files = cell_files(driver)
    name = next(k for k in files if k.endswith("results.jsonl"))
    first = files[name].splitlines(keepends=True)[0]
    again = run_cell_detached(driver, {**files, name: first})
    assert again["files"][name].splitlines(keepends=True)[0] == first
    assert _strip(again["files"][name]) == _strip(files[name])


def _strip(data: bytes) -> list[dict]:
    return [{k: v for k, v in json.loads(x).items() if k not in TIMING} for x in data.decode().splitlines()]


def test_cluster_runtime_env_ships_the_package_with_its_tasks(tmp_path):
    import zipfile

    from r3mem_bench.executors import RayExecutor

    assert "py_modules" not in RayExecutor().runtime_env(str(tmp_path))  # local cluster: same machine
    env = RayExecutor(address="ray://head:10001").runtime_env(str(tmp_path))
    names = zipfile.ZipFile(env["py_modules"][0]).namelist()
    assert "r3mem_bench/executors.py" in names and "r3mem_bench/tasks/rag/needle.yaml" in names
