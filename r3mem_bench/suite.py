"""Suites: one YAML names the models, tasks (with parameter overrides), methods and seeds of an experiment.

``r3mem-bench suite ci`` (a name in ``configs/``) or ``r3mem-bench suite my.yaml`` runs every
task x method x seed cell through :func:`r3mem_bench.runner.run` (resumable: rerunning skips finished cells and
finished examples), then writes the report (tables in ``<output>/report``, figures in ``<output>/plots``). ::

    suite: ci
    description: what it is for
    model: smollm2-135m          # or models: [a, b]
    seeds: [0]
    limit: 2                     # first N examples of each task (a task entry may override it)
    threads: 1                   # torch CPU threads per cell
    reference: no_memory         # paired tests in the report compare against it
    include_paths: []            # extra task folders, relative to this file
    imports: []                  # modules to import first (they may register your own methods)
    method_path: [my_methods/]   # plugin .py files or folders of them, relative to this file (r3mem_bench.plugins)
    resources: {num_cpus: 1, num_gpus: 0}   # per cell, for --executor ray
    tasks:
      - wikitext2                                  # a task or family name
      - {task: needle, limit: 8, params: {max_new_tokens: 16}}
      - {task: locomo, data: data/locomo10.json}  # a local data file (relative to this file)
      - {task: persona, limit: 200, methods: [no_memory, vector_rag]}   # only these of the suite's methods
    methods:
      - no_memory
      - {method: full_context, args: {max_context: 2048}}
      - {method: rmt, checkpoint: runs/train/rmt}
    regress:                     # used by `r3mem-bench regress` (see r3mem_bench.regress)
      metrics: [ppl_after_first, f1]
      tolerances: {ppl_after_first: {rel: 0.002}, f1: {abs: 0.02}}

A method that does not apply to a task's family is skipped for that task, as in ``run``; a task entry's
``methods`` (names from the suite's ``methods``) runs only those on it, so one suite can score many questions
with the methods a QA comparison needs and every control on the cheaper tasks.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import typer
import yaml

from r3mem_bench.errors import CheckFailed, UserError

SUITE_KEYS = {"suite", "description", "model", "models", "seeds", "seed", "limit", "threads", "backend", "reference",
              "include_paths", "imports", "method_path", "resources", "tasks", "methods", "regress", "report"}
TASK_KEYS = {"task", "params", "limit", "data", "methods"}
METHOD_KEYS = {"method", "args", "checkpoint"}
SUITE_FILE = "suite.yaml"


def config_dirs() -> list[Path]:
    """Folders searched for suite names: the shipped ``configs/`` (source checkout or installed package)."""
    out = [Path(__file__).resolve().parent.parent / "configs"]
    try:
        from importlib import resources

        out.append(Path(str(resources.files("r3mem_bench.configs"))))
    except ModuleNotFoundError:
        pass
    return [d for d in out if d.is_dir()]


@dataclass
class Suite:
    """A parsed suite config."""

    name: str
    source: str
    raw: dict
    models: list[str]
    seeds: list[int]
    tasks: list[dict]
    methods: list[dict]
    limit: Optional[int] = None
    threads: Optional[int] = None
    backend: str = "auto"
    reference: Optional[str] = None
    include_paths: list[str] = field(default_factory=list)
    imports: list[str] = field(default_factory=list)
    method_path: list[str] = field(default_factory=list)
    resources: dict = field(default_factory=dict)
    regress: dict = field(default_factory=dict)
    report: dict = field(default_factory=dict)

    @property
    def digest(self) -> str:
        """Hash of everything that defines the suite's numbers (the regress section excluded)."""
        core = {k: v for k, v in self.raw.items() if k not in ("regress", "description", "report")}
        return hashlib.sha256(json.dumps(core, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _err(where: str, what: str, fix: str) -> UserError:
    return UserError(f"suite {where}: {what}; fix: {fix}")


def _records(items: Any, key: str, allowed: set, where: str) -> list[dict]:
    if not isinstance(items, list) or not items:
        raise _err(where, f"'{key}s' must be a non-empty list", f"list at least one {key}")
    out = []
    for item in items:
        rec = {key: item} if isinstance(item, str) else dict(item) if isinstance(item, dict) else item
        if not isinstance(rec, dict) or not isinstance(rec.get(key), str):
            raise _err(where, f"{key} entry {item!r} has no '{key}' name", f"write a name or {{{key}: NAME, ...}}")
        unknown = set(rec) - allowed
        if unknown:
            raise _err(where, f"{key} '{rec[key]}' has unknown field '{sorted(unknown)[0]}'", f"use only {sorted(allowed)}")
        for sub in ("params", "args"):
            if sub in rec and not isinstance(rec[sub], dict):
                raise _err(where, f"{key} '{rec[key]}': '{sub}' must be a mapping", f"write {sub}: {{name: value}}")
        out.append(rec)
    names = [r[key] for r in out]
    if key == "method" and len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise _err(where, f"method '{dup}' is listed twice", "register variants as their own method names")
    return out


def parse_suite(raw: Any, source: str) -> Suite:
    """Validate a suite mapping (from YAML) into a :class:`Suite`."""
    where = source
    if not isinstance(raw, dict):
        raise _err(where, "expected a mapping", "see `r3mem-bench suite --help` for the format")
    unknown = set(raw) - SUITE_KEYS
    if unknown:
        raise _err(where, f"unknown field '{sorted(unknown)[0]}'", f"use only {sorted(SUITE_KEYS)}")
    models = raw.get("models") or ([raw["model"]] if raw.get("model") else ["smollm2-135m"])
    if isinstance(models, str):
        models = [models]
    seeds = raw.get("seeds", [raw.get("seed", 0)])
    if not isinstance(seeds, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds) or not seeds:
        raise _err(where, f"'seeds' must be a list of integers, got {seeds!r}", "write seeds: [0, 1]")
    limit = raw.get("limit")
    if limit is not None and (not isinstance(limit, int) or limit <= 0):
        raise _err(where, f"'limit' must be a positive integer, got {limit!r}", "write limit: 10 or drop it")
    base = Path(source).parent
    include = [str((base / p).resolve()) for p in raw.get("include_paths") or []]
    method_path = raw.get("method_path") or []
    method_path = [method_path] if isinstance(method_path, str) else method_path
    if not isinstance(method_path, list) or not all(isinstance(p, str) for p in method_path):
        raise _err(where, f"'method_path' must be a path or a list of paths, got {raw.get('method_path')!r}",
                   "write method_path: my_methods/ (relative to the suite file)")
    tasks = _records(raw.get("tasks"), "task", TASK_KEYS, where)
    methods = _records(raw.get("methods"), "method", METHOD_KEYS, where)
    listed = [m["method"] for m in methods]
    for t in tasks:
        if t.get("data"):
            t["data"] = str((base / str(t["data"])).resolve())
        if "methods" in t:
            chosen = t["methods"]
            if not isinstance(chosen, list) or not chosen or not all(isinstance(m, str) for m in chosen):
                raise _err(where, f"task '{t['task']}': 'methods' must be a non-empty list of method names",
                           "write methods: [no_memory, vector_rag] or drop it (every method)")
            unknown = [m for m in chosen if m not in listed]
            if unknown:
                raise _err(where, f"task '{t['task']}': method '{unknown[0]}' is not in the suite's methods",
                           "add it to the suite's methods or remove it from the task's")
    name = str(raw.get("suite") or Path(source).stem)
    return Suite(name=name, source=source, raw=raw, models=[str(m) for m in models], seeds=seeds,
                 tasks=tasks,
                 methods=methods, limit=limit,
                 threads=raw.get("threads"), backend=str(raw.get("backend", "auto")), reference=raw.get("reference"),
                 include_paths=include, imports=list(raw.get("imports") or []),
                 method_path=[str((base / p).resolve()) for p in method_path],
                 resources=dict(raw.get("resources") or {}),
                 regress=dict(raw.get("regress") or {}), report=dict(raw.get("report") or {}))


def load_suite(name_or_file: str) -> Suite:
    """A suite by file path or by name (``configs/<name>.yaml``)."""
    path = Path(name_or_file)
    if not path.is_file():
        candidates = [d / f"{name_or_file}.yaml" for d in config_dirs()]
        path = next((c for c in candidates if c.is_file()), None)
        if path is None:
            names = sorted({p.stem for d in config_dirs() for p in d.glob("*.yaml")})
            raise UserError(f"unknown suite '{name_or_file}'; fix: give a suite YAML file or one of {', '.join(names)}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise UserError(f"suite {path}: not valid YAML ({str(exc).splitlines()[0]}); fix the syntax") from None
    return parse_suite(raw, str(path))


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "x"


def cells(suite: Suite, output: str, strict: bool = True) -> list[dict]:
    """Every task-entry x method x seed x model cell as a JSON-able spec; validates every task and method.

    With ``strict=False`` (reports) a method that is not registered is kept for every task, noted in ``note``.
    """
    from r3mem_bench.methods import get_method_class
    from r3mem_bench.task import TaskRegistry

    _import(suite.imports)
    if suite.method_path:
        from r3mem_bench.methods import load_method_paths

        load_method_paths(suite.method_path, origin=f"suite {suite.source}: method_path")
    registry = TaskRegistry(suite.include_paths)
    out_root = Path(output).resolve()
    families = {}
    for t in suite.tasks:
        specs = registry.resolve(t["task"], t.get("params"))  # validates the task and its parameter overrides
        families[t["task"]] = specs[0].family
    classes = {}
    for m in suite.methods:
        try:
            classes[m["method"]] = get_method_class(m["method"]).families  # names an unknown method
        except UserError:
            if strict:
                raise
            classes[m["method"]] = None
    from r3mem_bench.backends import resolve_backend

    backends: dict[str, str] = {}
    weights_ids: dict[tuple[str, str], str | None] = {}  # (method, model) -> shipped weights' hash, read once
    specs = []
    for model in suite.models:
        for seed in suite.seeds:
            for t in suite.tasks:
                for m in suite.methods:
                    applies = classes[m["method"]]
                    if applies is not None and families[t["task"]] not in applies:
                        continue
                    if "methods" in t and m["method"] not in t["methods"]:
                        continue
                    cell = {"model": model, "seed": seed, "task": t["task"], "method": m["method"],
                            "params": dict(t.get("params") or {}), "args": dict(m.get("args") or {}),
                            "checkpoint": m.get("checkpoint"), "limit": t.get("limit", suite.limit),
                            "data": t.get("data"),
                            "include_paths": suite.include_paths, "imports": suite.imports,
                            "threads": suite.threads, "backend": suite.backend,
                            "resources": dict(suite.resources), "family": families[t["task"]],
                            "output": str(out_root / "runs" / _safe(model) / f"seed-{seed}"),
                            "suite_output": str(out_root)}
                    if suite.method_path:  # Ray workers load them through R3MEM_BENCH_METHOD_PATH
                        cell["method_path"] = list(suite.method_path)
                    ident = {k: v for k, v in cell.items()  # location-independent
                             if k not in ("resources", "suite_output", "output")}
                    if model not in backends:  # the backend that generates here (auto resolved): keys say what ran
                        backends[model] = resolve_backend(suite.backend, model)
                    ident["backend"] = backends[model]
                    if applies is not None and not cell["checkpoint"]:  # retrained shipped weights -> a new cell
                        if (m["method"], model) not in weights_ids:
                            weights_ids[m["method"], model] = get_method_class(m["method"]).shipped_weights_id(model)
                        weights = weights_ids[m["method"], model]
                        if weights:
                            ident["shipped_weights"] = weights
                    ident = json.dumps(ident, sort_keys=True, default=str)
                    digest = hashlib.sha256(ident.encode()).hexdigest()[:10]
                    cell["key"] = f"{_safe(model)}.s{seed}.{_safe(t['task'])}.{_safe(m['method'])}.{digest}"
                    if applies is None:
                        cell["note"] = f"method '{m['method']}' is not registered"
                    specs.append(cell)
    if not specs:
        raise UserError(f"suite {suite.name}: no method applies to any task; fix: check the methods' families")
    return specs


def _import(modules: list[str]) -> None:
    import importlib

    for mod in modules:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            raise UserError(f"suite imports '{mod}': cannot import it ({exc}); fix: put it on PYTHONPATH") from None


def expected_cells(suite: Suite, output: str):
    """The report's expected cells (one per task variant x method x seed x model) with their done state."""
    from r3mem_bench.executors import is_done
    from r3mem_bench.report import ExpectedCell
    from r3mem_bench.task import TaskRegistry

    registry = TaskRegistry(suite.include_paths)
    out = []
    for cell in cells(suite, output, strict=False):
        done = is_done(cell)
        for task in registry.resolve(cell["task"], cell["params"]):
            out.append(ExpectedCell(cell["model"], cell["seed"], task.name, cell["method"], done, cell.get("note", "")))
    return out


def saved_suite(output: str) -> Suite | None:
    """The suite a previous ``suite`` command ran into ``output`` (its ``suite.yaml``), if any."""
    path = Path(output) / SUITE_FILE
    if not path.is_file():
        return None
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    suite = parse_suite(raw.get("config"), raw.get("source", str(path)))
    suite.include_paths = list(raw.get("include_paths", suite.include_paths))
    return suite


def save_suite(suite: Suite, output: str) -> None:
    """Record the suite next to its results so ``report`` knows which cells to expect."""
    from r3mem_bench.store import atomic_write_text

    doc = {"source": suite.source, "include_paths": suite.include_paths, "config": suite.raw}
    atomic_write_text(Path(output) / SUITE_FILE, yaml.safe_dump(doc, sort_keys=True))


def preflight_suite(suite: Suite, specs: list[dict]) -> list[str]:
    """One line per missing piece that would make cells fail: a trained checkpoint (with the command that trains
    it), a data file, a hub model that cannot be fetched offline. Checked before any cell runs."""
    import os

    from r3mem_bench.methods import get_method_class
    from r3mem_bench.models import BUILTIN_MODELS

    lines: list[str] = []
    untrained: dict[tuple[str, str], list[str]] = {}  # (checkpoint owner, model) -> methods that need it
    for c in specs:
        try:
            cls = get_method_class(c["method"])
        except UserError:
            continue  # reported by the cell itself
        if (getattr(cls, "trainable", False) and not c.get("checkpoint") and not (c.get("args") or {}).get("untrained")
                and hasattr(cls, "shipped_checkpoint") and cls.shipped_checkpoint(c["model"]) is None):
            needing = untrained.setdefault((getattr(cls, "checkpoint_owner", None) or cls.name, c["model"]), [])
            if c["method"] not in needing:
                needing.append(c["method"])
        if c.get("data") and not Path(c["data"]).exists():
            line = (f"task {c['task']}: data file {c['data']} not found; fix: fetch it (the task's YAML names the "
                    "source and format) or correct `data:` in the suite")
            if line not in lines:
                lines.append(line)
    for (owner, model), methods in untrained.items():
        lines.append(f"{', '.join(methods)} on {model}: no trained checkpoint; fix: r3mem-bench train --method "
                     f"{owner} --model {model} --output results/checkpoints/{owner}-{model} (the README's training "
                     "recipe), or give the methods `checkpoint:` in the suite")
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        from huggingface_hub import try_to_load_from_cache

        for model in suite.models:
            if model in BUILTIN_MODELS or os.path.isdir(model):
                continue
            if not isinstance(try_to_load_from_cache(model, "config.json"), str):
                lines.append(f"model {model}: not in the local Hugging Face cache and HF_HUB_OFFLINE=1; fix: "
                             f"`huggingface-cli download {model}` with hub access, or name a local directory")
    return lines


def run_suite(suite: Suite, output: str, executor: str = "local", address: str | None = None,
              max_retries: int = 3, quiet: bool = True, echo=None) -> dict:
    """Run every cell not finished before; returns ``{"ran", "skipped", "failed", "seconds"}``.

    ``failed`` lists ``(key, message, is_user_error)`` of the cells that raised; the other cells still run.
    """
    from r3mem_bench.executors import is_done, make_executor

    echo = echo or (lambda msg: print(msg, file=sys.stderr))
    specs = cells(suite, output)
    todo = [c for c in specs if not is_done(c)]
    missing = preflight_suite(suite, todo)
    if missing:
        raise UserError(f"suite {suite.name} cannot run as written ({len(missing)} missing):\n  " + "\n  ".join(missing))
    Path(output).mkdir(parents=True, exist_ok=True)
    save_suite(suite, output)
    for c in todo:
        c["quiet"] = quiet
    echo(f"suite {suite.name}: {len(specs)} cells, {len(specs) - len(todo)} finished before, {len(todo)} to run "
         f"({executor})")
    failed: list[tuple[str, str]] = []
    t0 = time.perf_counter()
    count = {"n": 0}

    def on_done(cell: dict, result: dict | None, error: BaseException | None) -> None:
        count["n"] += 1
        what = f"[{count['n']}/{len(todo)}] {cell['model']} seed {cell['seed']} {cell['task']} · {cell['method']}"
        if error is not None:
            message = str(error) if isinstance(error, UserError) else f"{type(error).__name__}: {error}"
            failed.append((cell["key"], message, isinstance(error, UserError)))
            echo(f"{what}: FAILED: {message}")
        else:
            echo(f"{what}: done in {result['seconds']:.1f} s")

    if todo:
        make_executor(executor, address, max_retries).map(todo, on_done)
    return {"ran": len(todo) - len(failed), "skipped": len(specs) - len(todo), "failed": failed,
            "seconds": time.perf_counter() - t0}


def report_suite(output: str, suite: Suite, plots: bool = True, reference: str | None = None,
                 r3mem_dir: str | None = "results/r3mem", echo=None):
    """Write the suite's tables (``<output>/report``) and figures (``<output>/plots``); returns the Report."""
    from r3mem_bench.report import ReportOptions, build_report, collect, write_tables

    echo = echo or (lambda msg: print(msg, file=sys.stderr))
    options = ReportOptions(reference=reference or suite.reference, method_order=[m["method"] for m in suite.methods],
                            **{k: v for k, v in suite.report.items() if k in ("n_resamples", "seed", "ci_unit")})
    rep = build_report(collect([str(Path(output) / "runs")]) if (Path(output) / "runs").is_dir() else [],
                       options, expected_cells(suite, output))
    write_tables(rep, Path(output) / "report")
    if plots:
        from r3mem_bench.plots import plot_all

        _, messages = plot_all(rep, Path(output) / "plots", Path(r3mem_dir) if r3mem_dir else None)
        for m in messages:
            echo(m)
    return rep


def register(app: typer.Typer) -> None:
    """Add the ``suite`` command to the CLI."""

    @app.command("suite")
    def suite_cmd(
        name: str = typer.Argument(..., help="Suite name (configs/NAME.yaml: ci, quick, paper) or a suite YAML file."),
        output: Optional[str] = typer.Option(None, "--output", "-o", help="Results directory (default runs/suite-NAME)."),
        executor: str = typer.Option("local", "--executor", help="local (this process) or ray."),
        address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (default: start a local one)."),
        max_retries: int = typer.Option(3, "--max-retries", help="Ray: reruns of a cell whose worker died or that Ray failed."),
        reference: Optional[str] = typer.Option(None, "--reference", help="Method for the paired tests (default: the suite's)."),
        plots: bool = typer.Option(True, "--plots/--no-plots", help="Write figures to OUTPUT/plots."),
        dry_run: bool = typer.Option(False, "--dry-run", help="List the cells and exit."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No per-cell progress bars."),
        method_path: list[str] = typer.Option([], "--method-path", help="Plugin method .py file or folder (repeatable)."),
    ) -> None:
        """Run every task x method x seed cell of a suite (resumable), then write its report."""
        from r3mem_bench.methods import load_method_paths
        from r3mem_bench.report import missing_markdown, table_markdown

        load_method_paths(method_path)
        suite = load_suite(name)
        out = output or f"runs/suite-{suite.name}"
        if dry_run:
            for c in cells(suite, out):
                typer.echo(f"{c['model']}\tseed {c['seed']}\t{c['task']}\t{c['method']}")
            return
        result = run_suite(suite, out, executor, address, max_retries, quiet=quiet)
        rep = report_suite(out, suite, plots, reference)
        typer.echo(table_markdown(rep.main_table()))
        missing = rep.missing()
        if missing:
            typer.echo(missing_markdown(missing))
        typer.echo(f"suite {suite.name}: {result['ran']} cells run, {result['skipped']} reused, "
                   f"{len(result['failed'])} failed in {result['seconds']:.1f} s; report in {out}/report")
        if result["failed"]:
            first = result["failed"][0][1]
            error = UserError if all(f[2] for f in result["failed"]) else CheckFailed
            raise error(f"suite {suite.name}: {len(result['failed'])} cell(s) failed (first: {first}); fix: "
                        "correct them and rerun the same command, finished cells are kept")
