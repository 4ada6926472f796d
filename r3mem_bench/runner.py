"""The one evaluation path: tasks x methods on one base model, written to the resumable store."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from r3mem_bench.errors import UserError
from r3mem_bench.families import get_family
from r3mem_bench.methods import get_method_class
from r3mem_bench.models import load_model
from r3mem_bench.provenance import git_commit, library_versions, machine
from r3mem_bench.store import RunStore
from r3mem_bench.task import Task, TaskRegistry, config_hash


@dataclass
class RunConfig:
    """Everything ``r3mem-bench run`` was asked to do."""

    tasks: list[str]
    methods: list[str]
    model: str = "smollm2-135m"
    limit: int | None = None
    seed: int = 0
    output: str = "runs"
    include_paths: list[str] = field(default_factory=list)
    data: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    method_options: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None
    backend: str = "hf"
    threads: int | None = None
    quiet: bool = False


def _file_hash(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def plan(cfg: RunConfig) -> list[tuple[Task, str]]:
    """The (task, method) cells of a run, after validating every name; methods that do not apply are skipped."""
    if cfg.limit is not None and cfg.limit <= 0:
        raise UserError(f"--limit {cfg.limit}: must be a positive number of examples; fix: omit it or use --limit 1 or more")
    if cfg.data is not None and not Path(cfg.data).is_file():
        raise UserError(f"--data {cfg.data}: file not found; fix: give an existing file")
    registry = TaskRegistry(cfg.include_paths)
    classes = {m: get_method_class(m) for m in cfg.methods}
    cells = []
    for name in cfg.tasks:
        for task in registry.resolve(name, cfg.overrides):
            for m, cls in classes.items():
                if task.family in cls.families:
                    cells.append((task, m))
    if not cells:
        raise UserError(f"none of the methods {cfg.methods} applies to tasks {cfg.tasks}; fix: see `r3mem-bench list`")
    return cells


def cell_dir(output: str, task: Task, method: str) -> Path:
    """Directory of one (task, method) result."""
    safe = task.name.replace("/", "_").replace("@", "__").replace(",", "_").replace("=", "-")
    return Path(output) / safe / method


def build_method(cfg: RunConfig, task: Task, method_name: str, lm):
    """Instantiate a method with the task's shared generator and prompt (QA) and the run's options."""
    cls = get_method_class(method_name)
    options = dict(cfg.method_options)
    if cfg.checkpoint:
        options["checkpoint"] = cfg.checkpoint
    budget = task.params.get("memory_budget")
    if budget:
        options.setdefault("memory_budget", budget)
    generator = prompt = None
    if task.family != "lm":
        from r3mem_bench.generation import make_generator, make_prompt

        generator = make_generator(lm, task.params, cfg.backend)
        prompt = make_prompt(task.params)
    method = cls(lm, options, generator=generator, prompt=prompt)
    method.seed = cfg.seed
    return method


def run(cfg: RunConfig) -> list[Path]:
    """Run every cell, resuming finished examples; returns the result directories."""
    cells = plan(cfg)
    _make_output(cfg.output)
    lm = load_model(cfg.model, threads=cfg.threads)
    versions, commit, host = library_versions(), git_commit(), machine()
    data_id = {"path": cfg.data, "sha256": _file_hash(cfg.data)} if cfg.data else None
    dirs = []
    examples_cache: dict[str, list[dict]] = {}
    for task, method_name in cells:
        family = get_family(task.family)
        if task.name not in examples_cache:
            examples = family.examples(task, cfg.data, lm.tokenizer)
            examples_cache[task.name] = examples[: cfg.limit] if cfg.limit else examples
        examples = examples_cache[task.name]
        method = build_method(cfg, task, method_name, lm)
        config = {"task": task.config(), "method": method.config(), "model": cfg.model, "seed": cfg.seed,
                  "data": data_id, "model_info": {k: v for k, v in lm.info.items() if k != "device"}}
        manifest = {"config": config, "config_hash": config_hash(config), "task": task.name, "family": task.family,
                    "method": method_name, "model": cfg.model, "seed": cfg.seed, "versions": versions,
                    "git_commit": commit, "machine": host, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        root = cell_dir(cfg.output, task, method_name)
        with RunStore(root, manifest) as store:
            todo = [ex for ex in examples if ex["id"] not in store.done_ids]
            if todo:
                _evaluate_cell(cfg, family, task, method, todo, store)
        dirs.append(root)
    return dirs


def _make_output(output: str) -> None:
    try:
        Path(output).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--output {output}: cannot create it ({exc.strerror}); fix: choose a writable directory") from None


def _evaluate_cell(cfg: RunConfig, family, task: Task, method, todo: list[dict], store: RunStore) -> None:
    """Run one cell's remaining examples with a progress bar; each finished row is stored at once."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    stats = {"tokens": 0, "t0": time.perf_counter()}

    def emit(row: dict) -> None:
        row["method"], row["task"] = method.name, task.name
        store.append(row)
        bar.update(job, advance=1)

    def tokens(n: int) -> None:
        stats["tokens"] += n
        rate = stats["tokens"] / max(1e-9, time.perf_counter() - stats["t0"])
        bar.update(job, tps=f"{rate:,.0f} tok/s")

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[tps]}"),
                  TimeElapsedColumn(), disable=cfg.quiet, transient=False) as bar:
        job = bar.add_task(f"{task.name} · {method.name}", total=len(todo), tps="")
        family.evaluate(task, method, todo, emit, progress=tokens)
