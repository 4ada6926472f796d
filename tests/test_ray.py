"""The Ray executor: a local 2-CPU cluster runs a suite whose worker dies mid-cell; Ray reruns the cell, the store
keeps the finished example, and the results equal those of the local executor. Finished cells are not redone."""

from __future__ import annotations

import json
import os
import textwrap

import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'r3mem-bench[dist]')")

from r3mem_bench.suite import parse_suite, run_suite  # noqa: E402

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
