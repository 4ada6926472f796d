"""Crash safety of the ``suite`` and ``train`` commands: SIGKILL at random points, then a rerun gives the same
outputs as an uninterrupted run (result rows bit for bit without timings; checkpoint tensors bit for bit)."""

from __future__ import annotations

import importlib.util
import os
import random
import signal
import time
from pathlib import Path

from reliability_helpers import all_rows, fork_cli, prepare_fork

KILLS = 5


def _need(module: str) -> None:
    assert importlib.util.find_spec(f"r3mem_bench.{module}") is not None, f"r3mem_bench/{module}.py is missing"


def _kill_repeatedly(argv: list[str], env: dict, seed: int, span: float, check) -> None:
    rng = random.Random(seed)
    for _ in range(KILLS):
        proc = fork_cli(argv, env)
        time.sleep(rng.uniform(0.0, span))
        if proc.is_alive():
            os.kill(proc.pid, signal.SIGKILL)
        proc.join(30)
        check()


def _finish(argv: list[str]) -> float:
    t0 = time.perf_counter()
    proc = fork_cli(argv)
    proc.join(300)
    assert proc.exitcode == 0, f"{argv[0]} exited {proc.exitcode}"
    return time.perf_counter() - t0


def test_suite_survives_sigkill(tmp_path):
    _need("suite")
    prepare_fork()
    import lm_eval.tasks.wikitext.preprocess_wikitext  # noqa: F401  (loaded once, before the forks)

    spec = tmp_path / "relsuite.yaml"
    spec.write_text("suite: relsuite\nmodel: tiny-random\nseeds: [0]\nthreads: 1\nreference: no_memory\n"
                    "tasks:\n  - task: wikitext2\n    limit: 3\n    params: {segment_len: 48, max_tokens: 96}\n"
                    "methods: [no_memory, full_context]\n")
    ref, out = tmp_path / "ref", tmp_path / "killed"
    span = _finish(["suite", str(spec), "--output", str(ref), "--no-plots", "--quiet"])
    want = all_rows(ref)
    assert sum(len(v) for v in want.values()) == 6

    def check() -> None:
        for cell, rows in all_rows(out).items():
            for ident, row in rows.items():
                assert row == want[cell][ident]

    argv = ["suite", str(spec), "--output", str(out), "--no-plots", "--quiet"]
    _kill_repeatedly(argv, {"R3MEM_BENCH_TEST_DELAY": "0.1"}, 3, span, check)
    _finish(argv)
    assert all_rows(out) == want


def _tensors(root: Path) -> dict[str, bytes]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(root.rglob("*.safetensors")):
        if "resume" in f.relative_to(root).parts:
            continue
        for name, t in load_file(str(f)).items():
            out[f"{f.relative_to(root)}:{name}"] = t.numpy().tobytes()
    return out


def test_train_survives_sigkill(tmp_path):
    _need("train")
    from r3mem_bench.methods import all_methods

    assert "rmt" in all_methods(), "the trainable method 'rmt' is not registered"
    prepare_fork()
    args = ["train", "--method", "rmt", "--model", "tiny-random", "--steps", "6", "--checkpoint-every", "2",
            "--segment-len", "32", "--segments", "2", "--warmup", "1", "--threads", "1", "--quiet"]
    ref, out = tmp_path / "ref", tmp_path / "killed"
    span = _finish([*args, "--output", str(ref)])
    want = _tensors(ref)
    assert want
    _kill_repeatedly([*args, "--output", str(out)], {}, 5, span, lambda: None)
    _finish([*args, "--output", str(out)])
    got = _tensors(out)
    assert got.keys() == want.keys()
    assert [k for k in want if got[k] != want[k]] == []
