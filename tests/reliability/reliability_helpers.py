"""Shared helpers of the reliability tests: strict result parsing and CLI runs in forked or fresh processes.

Forked runs (``fork_cli``) start from this test process, where torch, transformers and the tiny-random model are
already loaded, so one run costs well under a second instead of ~7 s of imports; each is still a separate OS
process that is killed with SIGKILL. Torch is limited to one thread before any fork (no OpenMP pool to inherit).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
from pathlib import Path

from r3mem_bench.conformance import TIMING_FIELDS  # wall-clock fields of a row (the rest is reproducible)

TINY = ["--model", "tiny-random", "--threads", "1", "--quiet"]
WORDS = ["memory", "river", "lantern", "quantum", "harbor", "velvet", "orbit", "meadow", "cipher", "granite", "echo", "prism", "tundra", "signal", "été", "naïve", "über", "中文", "日本語", "😀"]


def write_task(root: Path, docs: int = 5, words: int = 90, segment_len: int = 48, name: str = "reltask") -> Path:
    """A task folder with an LM task over a seeded JSONL of ``docs`` documents (no network, no heavy loaders)."""
    import random

    rng = random.Random(docs * 1000 + words)
    root.mkdir(parents=True, exist_ok=True)
    data = root / f"{name}.jsonl"
    with open(data, "w", encoding="utf-8") as fh:
        for i in range(docs):
            text = " ".join(rng.choice(WORDS) for _ in range(words)) + "."
            fh.write(json.dumps({"id": f"doc{i}", "text": text}) + "\n")
    tasks = root / "tasks"
    tasks.mkdir(exist_ok=True)
    (tasks / f"{name}.yaml").write_text(
        f"task: {name}\nfamily: lm\ndataset: {{loader: text_file, path: {json.dumps(str(data))}}}\n"
        f"params: {{segment_len: {segment_len}}}\n", encoding="utf-8")
    return tasks


def strict_rows(path: Path) -> list[dict]:
    """Rows of a results file, parsed strictly: complete lines only, each a JSON object, ids unique."""
    data = path.read_bytes()
    assert not data or data.endswith(b"\n"), f"{path}: truncated last line {data[-80:]!r}"
    rows = [json.loads(line) for line in data.decode("utf-8").splitlines()]
    assert all(isinstance(r, dict) and isinstance(r.get("id"), str) for r in rows), path
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)), f"{path}: duplicated result ids {ids}"
    return rows


def stable(row: dict) -> dict:
    """A row without its wall-clock fields (everything else must be reproducible bit for bit)."""
    return {k: v for k, v in row.items() if k not in TIMING_FIELDS}


def all_rows(out: Path) -> dict[str, dict[str, dict]]:
    """``{cell path: {id: stable row}}`` of every results file under ``out``, parsed strictly."""
    return {str(p.parent.relative_to(out)): {r["id"]: stable(r) for r in strict_rows(p)}
            for p in sorted(out.rglob("results.jsonl"))}


def _child(argv: list[str], env: dict[str, str]) -> None:
    os.environ.update(env)
    sys.argv = ["r3mem-bench", *argv]
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    from r3mem_bench.cli import main

    main()


def prepare_fork() -> None:
    """Load what a forked run needs once in this process (one torch thread, tiny-random, the CLI)."""
    import torch

    torch.set_num_threads(1)
    import r3mem_bench.cli  # noqa: F401
    from r3mem_bench.models import load_model

    load_model("tiny-random", device="cpu")


def fork_cli(argv: list[str], env: dict[str, str] | None = None) -> multiprocessing.Process:
    """Start ``r3mem-bench ARGV`` in a forked child process (stdout discarded); returns the started process."""
    prepare_fork()
    proc = multiprocessing.get_context("fork").Process(target=_child, args=(argv, dict(env or {})), daemon=True)
    proc.start()
    return proc
