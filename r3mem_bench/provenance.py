"""What every output records about where its numbers came from: versions, git commit, seeds."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import random
import subprocess
import zlib
from pathlib import Path

import numpy as np
import torch

LIBRARIES = ["r3mem-bench", "torch", "transformers", "peft", "datasets", "sentence-transformers", "faiss-cpu",
             "lm_eval", "numpy", "pandas"]


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries that affect the numbers."""
    out = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def git_commit() -> str:
    """The git commit of the source tree (or of the working directory), with ``-dirty`` when modified."""
    for where in (Path(__file__).resolve().parent.parent, Path.cwd()):
        try:
            head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=5)
            if head.returncode == 0:
                dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                                       capture_output=True, text=True, timeout=5).stdout.strip()
                return head.stdout.strip() + ("-dirty" if dirty else "")
        except (OSError, subprocess.SubprocessError):
            continue
    return "unknown"


def seed_everything(seed: int, key: str = "") -> None:
    """Seed Python, NumPy and torch from ``seed`` and a per-example ``key`` (stable across resumes)."""
    value = (seed * 1_000_003 + zlib.crc32(key.encode())) % (2**31 - 1)
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)


def machine() -> dict:
    """A short description of the machine the numbers came from."""
    return {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
