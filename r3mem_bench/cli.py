"""The ``r3mem-bench`` command line: run, list, report, and the commands other modules add."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import typer
from rich.console import Console

from r3mem_bench.errors import CheckFailed, UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="r3mem-bench: evaluate memory modules of language models side by side.")
console = Console(stderr=True)


def _split(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _parse_options(pairs: list[str]) -> dict:
    """``key=value`` pairs, values parsed as YAML scalars (safe loader)."""
    import yaml

    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise UserError(f"--method-arg {pair!r}: expected key=value")
        key, value = pair.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


@app.command()
def run(
    task: str = typer.Option("lm", "--task", "-t", help="Task names or family names, comma separated."),
    method: str = typer.Option("full_context,no_memory", "--method", "-m", help="Methods, comma separated."),
    model: str = typer.Option("smollm2-135m", "--model", help="smollm2-135m, tiny-random, a local dir or hub id."),
    limit: Optional[int] = typer.Option(None, "--limit", "-n", help="First N examples of each task."),
    seed: int = typer.Option(0, "--seed"),
    output: str = typer.Option("runs", "--output", "-o", help="Results directory (resumable)."),
    include_path: list[str] = typer.Option([], "--include-path", help="Extra folder of task YAMLs."),
    data: Optional[str] = typer.Option(None, "--data", help="Local data file replacing the task's dataset."),
    segment_len: Optional[int] = typer.Option(None, "--segment-len", help="LM: tokens per segment."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="LM: truncate each document to N tokens."),
    memory_budget: Optional[int] = typer.Option(None, "--memory-budget", help="Memory tokens / retrieved tokens."),
    param: list[str] = typer.Option([], "--param", help="Task parameter override key=value (repeatable)."),
    method_arg: list[str] = typer.Option([], "--method-arg", help="Method option key=value (repeatable)."),
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint", help="Trained adapter directory (r3mem, rmt)."),
    backend: str = typer.Option("auto", "--backend", help="Generation backend: auto (vLLM where it can serve the model, else hf), hf or vllm."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    method_path: list[str] = typer.Option([], "--method-path", help="Plugin method .py file or folder (repeatable)."),
    max_ingest_minutes: Optional[float] = typer.Option(
        None, "--max-ingest-minutes", help="QA: refuse, before anything runs, a cell whose ingest is estimated to "
                                           "take longer (the estimate is printed for every cell)."),
) -> None:
    """Evaluate methods on tasks; finished examples are kept and skipped on rerun."""
    from r3mem_bench.methods import load_method_paths
    from r3mem_bench.report import collect, render
    from r3mem_bench.runner import RunConfig
    from r3mem_bench.runner import run as do_run

    load_method_paths(method_path)
    overrides = _parse_options(param)
    if segment_len is not None:
        overrides["segment_len"] = segment_len
    if max_tokens is not None:
        overrides["max_tokens"] = max_tokens
    if memory_budget is not None:
        overrides["memory_budget"] = memory_budget
    cfg = RunConfig(tasks=_split(task), methods=_split(method), model=model, limit=limit, seed=seed, output=output,
                    include_paths=include_path, data=data, overrides=overrides,
                    method_options=_parse_options(method_arg), checkpoint=checkpoint, backend=backend,
                    threads=threads, quiet=quiet, max_ingest_minutes=max_ingest_minutes)
    if max_ingest_minutes is not None and not max_ingest_minutes > 0:
        raise UserError(f"--max-ingest-minutes {max_ingest_minutes:g}: not a positive number of minutes; fix: e.g. 5")
    dirs = do_run(cfg)
    typer.echo(render(collect([str(d) for d in dirs]), "md"))


@app.command("list")
def list_cmd(include_path: list[str] = typer.Option([], "--include-path"),
             method_path: list[str] = typer.Option([], "--method-path", help="Plugin method .py file or folder.")) -> None:
    """Tasks by family, methods (and the families they apply to) and models."""
    from r3mem_bench.methods import all_methods
    from r3mem_bench.models import BUILTIN_MODELS
    from r3mem_bench.methods import load_method_paths
    from r3mem_bench.task import TaskRegistry

    load_method_paths(method_path)
    reg = TaskRegistry(include_path)
    typer.echo("Tasks")
    for fam, specs in sorted(reg.families().items()):
        typer.echo(f"  {fam}:")
        for s in sorted(specs, key=lambda s: s.name):
            typer.echo(f"    {s.name}{' (default)' if s.default else ''}  {s.description}")
    typer.echo("Methods (families they apply to)")
    for name, cls in all_methods().items():
        typer.echo(f"  {name}  [{', '.join(cls.families)}]  {cls.description}")
    typer.echo("Models")
    for name, desc in BUILTIN_MODELS.items():
        typer.echo(f"  {name}  {desc}")
    typer.echo("  <local dir> | <owner/name>  any Hugging Face causal LM")


@app.command()
def report(
    dirs: list[str] = typer.Argument(..., help="Run output directories."),
    fmt: str = typer.Option("md", "--format", "-f", help="md, csv, latex or json."),
    out: Optional[str] = typer.Option(None, "--out", help="Write to this file instead of stdout."),
    paper: bool = typer.Option(False, "--paper", help="Print the paper report (main, family, position tables) as Markdown."),
    tables: Optional[str] = typer.Option(None, "--tables", help="Write every paper table as .md, .csv and .tex here."),
    plots: Optional[str] = typer.Option(None, "--plots", help="Write the figures (PNG and PDF) here."),
    reference: Optional[str] = typer.Option(None, "--reference", help="Method the paired tests compare against."),
    suite: Optional[str] = typer.Option(None, "--suite", help="Suite name/file: list its cells that are missing."),
    resamples: int = typer.Option(1000, "--resamples", help="Bootstrap and permutation resamples."),
    bootstrap_seed: int = typer.Option(0, "--bootstrap-seed", help="Seed of the resampling."),
    ci_unit: str = typer.Option("auto", "--ci-unit", help="LM resampling unit: auto, document or segment."),
    r3mem_results: str = typer.Option("results/r3mem", "--r3mem-results", help="R3Mem reconstruction JSONs to plot."),
) -> None:
    """Aggregate finished runs into one table, or into the paper's tables and figures."""

    from r3mem_bench.report import collect, render
    from r3mem_bench.store import atomic_write_text

    records = collect(dirs)
    if paper or tables or plots or reference or suite:
        from r3mem_bench.paper import paper_report

        text = paper_report(records, dirs, paper=paper, tables=tables, plots=plots, reference=reference,
                            suite=suite, resamples=resamples, seed=bootstrap_seed, ci_unit=ci_unit,
                            r3mem_results=r3mem_results, echo=lambda m: console.print(m, highlight=False, soft_wrap=True))
        if not paper:
            text = render(records, fmt)
    else:
        text = render(records, fmt)
    if out:
        atomic_write_text(Path(out), text)
    else:
        typer.echo(text, nl=False)


@app.command("new-method")
def new_method(
    name: str = typer.Argument(..., help="Method name: a Python identifier not used by another method."),
    trainable: bool = typer.Option(False, "--trainable", help="Add the interface of `r3mem-bench train`."),
    out: str = typer.Option(".", "--out", help="Folder for NAME.py, test_NAME.py and NAME_suite.yaml."),
) -> None:
    """Write a small working memory method, its pytest file and a suite config comparing it with the references."""
    from r3mem_bench.scaffold import write_scaffold

    for path in write_scaffold(name, out, trainable=trainable):
        typer.echo(f"wrote {path}")
    typer.echo(f"next: r3mem-bench check-method {name} --method-path {out}")


@app.command("check-method")
def check_method(
    name: str = typer.Argument(..., help="Registered method name (built-in or plugin)."),
    method_path: list[str] = typer.Option([], "--method-path", help="Plugin method .py file or folder (repeatable)."),
    model: str = typer.Option("tiny-random", "--model", help="Base model of the checks."),
    method_arg: list[str] = typer.Option([], "--method-arg", help="Method option key=value (repeatable)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads."),
    processes: str = typer.Option("fresh", "--processes", help="Runs of the SIGKILL-resume check: fresh "
                                  "interpreters, or fork (forks of this process: faster, same str hash seed)."),
) -> None:
    """Check a method against the MemoryMethod contract on tiny inputs; exit 1 if any check fails."""
    from r3mem_bench.conformance import run_checks
    from r3mem_bench.methods import get_method_class
    from r3mem_bench.models import load_model
    from r3mem_bench.methods import load_method_paths

    from r3mem_bench.conformance import PROCESSES

    load_method_paths(method_path)
    get_method_class(name)  # an unknown name is a usage error before the model loads
    if processes not in PROCESSES:
        raise UserError(f"--processes {processes}: unknown; fix: use one of {', '.join(PROCESSES)}")
    options = _parse_options(method_arg)
    results = run_checks(name, load_model(model, threads=threads), options, processes=processes)
    for r in results:
        typer.echo(r.line())
    failed = [r.name for r in results if not r.ok]
    ran = [r for r in results if not r.skipped]
    if failed:
        raise CheckFailed(f"check-method {name}: {len(failed)} of {len(ran)} checks failed: {'; '.join(failed)}")
    skipped = len(results) - len(ran)
    typer.echo(f"check-method {name}: all {len(ran)} checks pass" + (f" ({skipped} not applicable)" if skipped else ""))


def _register_extensions() -> None:
    """Commands defined next to the code they drive (training, suites, regression, exports)."""
    import importlib

    for mod in ("r3mem_bench.train", "r3mem_bench.suite", "r3mem_bench.regress", "r3mem_bench.lm_eval_export"):
        try:
            module = importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name == mod:
                continue
            raise
        module.register(app)


def main() -> None:
    """Entry point: one-line errors for user mistakes (exit 2), exit 1 for failed checks, exit 3 (one line naming
    the log file with the traceback) for an unexpected internal error."""
    _register_extensions()
    try:
        app(standalone_mode=False)
    except (UserError, CheckFailed) as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        console.print("interrupted: finished examples are saved; rerun the same command to resume")
        sys.exit(130)
    except Exception as exc:  # click usage errors come here in non-standalone mode
        kinds = _click_exceptions()
        if isinstance(exc, kinds["Exit"]):
            sys.exit(exc.exit_code)
        if isinstance(exc, kinds["ClickException"]):
            exc.show()
            sys.exit(2)
        if isinstance(exc, kinds["Abort"]):
            sys.exit(130)
        log = _write_crash_log(exc)
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        console.print(f"[bold red]internal error:[/] {type(exc).__name__}: {first}; the traceback is in {log} "
                      "(please report it with that file)", highlight=False, soft_wrap=True)
        sys.exit(3)


def _click_exceptions() -> dict[str, tuple[type, ...]]:
    """click's ``Exit``, ``ClickException`` and ``Abort`` classes, from click and from the copy of click that typer
    may vendor (``typer._click``, which raises its own usage errors), as tuples for ``isinstance``."""
    import click

    mods = [click.exceptions]
    try:
        from typer._click import exceptions as vendored
    except ImportError:
        pass
    else:
        mods.append(vendored)
    return {name: tuple(getattr(m, name) for m in mods if hasattr(m, name)) for name in ("Exit", "ClickException", "Abort")}


def _write_crash_log(exc: BaseException) -> Path:
    """Write the traceback of an unexpected error to ``<cache dir>/crash-<time>-<pid>.log``; returns its path."""
    import os
    import time
    import traceback

    from r3mem_bench.models import cache_dir

    folder = cache_dir() / "crash-logs"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"crash-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}.log"
    path.write_text(f"r3mem-bench {' '.join(sys.argv[1:])}\n\n" + "".join(traceback.format_exception(exc)),
                    encoding="utf-8")
    return path


if __name__ == "__main__":
    main()
