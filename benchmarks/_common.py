"""Shared helpers of the performance benchmarks: set-up, the text they score, lm-eval runs and result files."""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results" / "benchmarks"
# RMT's training step in the benchmarks: LoRA rank 16, every sample at the full 4 segments (no curriculum stages)
RMT_TRAINING = {"curriculum": "4", "lora_r": 16, "lora_alpha": 32}


def model_parser(doc: str):
    """An argument parser (description: the first line of ``doc``) with the options of a benchmark of one model:
    ``--model``, ``--threads``, ``--out``."""
    import argparse

    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    return ap


def setup(threads: int) -> None:
    """Fix torch's CPU threads (the same for every contender of a benchmark)."""
    import torch

    torch.set_num_threads(threads)


def lm_task(max_tokens: int, segment_len: int = 512, name: str = "wikitext2", min_tokens: int = 0):
    """A bundled LM task with documents truncated to ``max_tokens`` (0: whole documents)."""
    from r3mem_bench.task import TaskRegistry

    return TaskRegistry().resolve(name, {"max_tokens": max_tokens, "segment_len": segment_len,
                                         "min_tokens": min_tokens})[0]


def lm_docs(task, tokenizer, n: int) -> list[dict]:
    """The first ``n`` documents of an LM task."""
    from r3mem_bench.families import get_family

    return get_family("lm").examples(task, None, tokenizer)[:n]


def scored_tokens(tokenizer, docs: list[dict], max_tokens: int) -> int:
    """Tokens a full-context pass scores over ``docs`` (each truncated to ``max_tokens``)."""
    total = 0
    for d in docs:
        n = len(tokenizer(d["text"], add_special_tokens=False)["input_ids"])
        total += min(n, max_tokens) if max_tokens else n
    return total


class LmEvalRolling:
    """lm-eval's ``hf`` model (HFLM) on the same loaded model object, over a task exported as
    ``loglikelihood_rolling`` by :func:`r3mem_bench.lm_eval_export.export_task` (same text, same prefix token)."""

    def __init__(self, lm, task, limit: int, batch_size: int = 1):
        from lm_eval.models.huggingface import HFLM

        from r3mem_bench.lm_eval_export import export_task

        self.dir = Path(tempfile.mkdtemp(prefix="r3mem-bench-lm-eval-"))
        self.summary = export_task(task, lm.tokenizer, self.dir, limit=limit)
        self.hflm = HFLM(pretrained=lm.model, tokenizer=lm.tokenizer, prefix_token_id=lm.prefix_token_id,
                         max_length=lm.max_length, batch_size=batch_size, device=str(lm.device))

    def run(self) -> tuple[float, float]:
        """(seconds of one ``simple_evaluate``, its bits per byte)."""
        import lm_eval
        from lm_eval.tasks import TaskManager

        t0 = time.perf_counter()
        manager = TaskManager(include_path=str(self.dir), include_defaults=False)
        res = lm_eval.simple_evaluate(model=self.hflm, tasks=[self.summary["lm_eval_task"]], task_manager=manager,
                                      log_samples=False)
        seconds = time.perf_counter() - t0
        return seconds, float(res["results"][self.summary["lm_eval_task"]]["bits_per_byte,none"])


def median(xs: list[float]) -> float:
    """Median of a non-empty list."""
    return float(statistics.median(xs))


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over xs (0 with fewer than two points)."""
    import numpy as np

    if len(xs) < 2:
        return 0.0
    return float(np.polyfit(np.asarray(xs, dtype=float), np.asarray(ys, dtype=float), 1)[0])


def write_result(name: str, payload: dict, out: str | None = None) -> Path:
    """Write ``results/benchmarks/<name>.json`` with the command, machine, load and library versions."""
    from r3mem_bench.provenance import git_commit, library_versions, machine
    from r3mem_bench.store import atomic_write_text

    path = Path(out) if out else RESULTS / f"{name}.json"
    body = {"benchmark": name, "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine(),
            "load_average": os.getloadavg(), "git_commit": git_commit(), "versions": library_versions(), **payload}
    atomic_write_text(path, json.dumps(body, indent=2, sort_keys=False) + "\n")
    return path


def plot(path: Path, title: str, xlabel: str, ylabel: str, series: dict[str, tuple[list, list]],
         logx: bool = False, logy: bool = False) -> Path:
    """A line plot of ``{label: (xs, ys)}`` saved as PNG next to the JSON."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", label=label)
    if logx:
        ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def wait_child(proc, timeout: float) -> tuple[int, object, bool]:
    """Wait for ``proc`` (a ``subprocess.Popen``) at most ``timeout`` seconds, killing it after that: its wait
    status, its resource usage (``ru_maxrss`` is the child's peak RSS in KiB) and whether it timed out."""
    deadline = time.time() + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            return status, usage, False
        if time.time() > deadline:
            proc.kill()
            _, status, usage = os.wait4(proc.pid, 0)
            return status, usage, True
        time.sleep(0.2)
