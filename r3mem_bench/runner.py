"""The one evaluation path: tasks x methods on one base model, written to the resumable store."""

from __future__ import annotations

import hashlib
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from r3mem_bench.errors import UserError
from r3mem_bench.families import get_family
from r3mem_bench.ingest_cache import IngestCache
from r3mem_bench.methods import get_method_class
from r3mem_bench.models import load_model
from r3mem_bench.provenance import git_commit, library_versions, machine
from r3mem_bench.store import RESULTS, RunStore
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
    backend: str = "auto"
    threads: int | None = None
    quiet: bool = False
    max_ingest_minutes: float | None = None


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
        from r3mem_bench.backends import make_generator
        from r3mem_bench.generation import make_prompt

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
    examples_cache: dict[str, list[dict]] = {}
    prepared = []
    for task, method_name in cells:  # load and check everything before the first example is evaluated
        family = get_family(task.family)
        if task.name not in examples_cache:
            examples = family.examples(task, cfg.data, lm.tokenizer)
            examples_cache[task.name] = examples[: cfg.limit] if cfg.limit else examples
        examples = examples_cache[task.name]
        method = build_method(cfg, task, method_name, lm)
        method.ingest_cache = IngestCache.for_run(cfg.output, log=_stderr)  # shared by every cell of the run
        method.ingest_log = None if cfg.quiet else _stderr
        preflight(lm, task, method, examples)
        ingest_budget(cfg, family, task, method, examples)
        prepared.append((task, method_name, family, examples, method))
    dirs = []
    for task, method_name, family, examples, method in prepared:
        config = {"task": task.config(), "method": method.config(), "model": cfg.model, "seed": cfg.seed,
                  "data": data_id, "model_info": {k: v for k, v in lm.info.items() if k != "device"}}
        manifest = {"config": config, "config_hash": config_hash(config), "task": task.name, "family": task.family,
                    "method": method_name, "model": cfg.model, "seed": cfg.seed, "versions": versions,
                    "git_commit": commit, "machine": host, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        root = cell_dir(cfg.output, task, method_name)
        with RunStore(root, manifest) as store:
            family.check_rows(store.rows, str(root / RESULTS))
            todo = [ex for ex in examples if ex["id"] not in store.done_ids]
            if todo:
                _evaluate_cell(cfg, family, task, method, todo, store)
        dirs.append(root)
    return dirs


# ---- pre-flight resource check ------------------------------------------------------------------------------
def available_memory_bytes(device) -> int:
    """Memory a run can still use on ``device``: free GPU memory, or the OS's MemAvailable for the CPU."""
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    import psutil

    return int(psutil.virtual_memory().available)


def max_document_tokens(tokenizer, examples: list[dict], max_tokens: int = 0) -> int:
    """Token count of the longest document (capped at ``max_tokens``); tokenizes only documents that can matter."""
    best = 0
    by_size = sorted(examples, key=lambda d: len(d["text"].encode("utf-8")), reverse=True)
    for doc in by_size:
        if len(doc["text"].encode("utf-8")) + 1 <= best:  # byte-level BPE: never more tokens than bytes (+1)
            break
        best = max(best, len(tokenizer(doc["text"], add_special_tokens=False)["input_ids"]))
        if max_tokens and best >= max_tokens:
            return max_tokens
    return best


def lm_forward_plan(lm, task: Task, method, doc_tokens: int) -> tuple[int, int]:
    """(tokens per sequence, sequences per batch) of the largest forward pass an LM method makes."""
    from r3mem_bench.methods.reference import FullContext, NoMemory

    seg = min(task.params["segment_len"], max(1, doc_tokens))
    if isinstance(method, FullContext):
        return min(method.max_context, doc_tokens + 1), 1
    if isinstance(method, NoMemory):
        segments = max(1, -(-doc_tokens // task.params["segment_len"]))
        return min(1 + method.window + seg, doc_tokens + 1), min(method.batch_size, segments)
    return 1 + seg + int(task.params.get("memory_budget") or 0), 1


def estimate_forward_bytes(lm, tokens: int, batch: int = 1) -> int:
    """Peak extra bytes of one scoring forward pass: fp32 logits and their log-softmax, plus the KV cache.

    Logits exist only for the scored rows, at most ``scoring.HEAD_CHUNK`` at a time, where the model's logits are
    its head over the last hidden state (``scoring.scored_nll``); otherwise for every position of the batch.
    Measured on CPU (tiny-random, 1K-8K tokens): peak RSS grows by 2 x rows x vocab x 4 bytes, within 3%.
    """
    from r3mem_bench.scoring import HEAD_CHUNK, HEAD_ONLY_ARCHS, kv_bytes

    vocab = int(lm.model.config.vocab_size)
    rows = batch * tokens
    if type(lm.model).__name__ in HEAD_ONLY_ARCHS:
        rows = min(rows, HEAD_CHUNK)
    return 2 * rows * vocab * 4 + batch * kv_bytes(lm, tokens)


def preflight(lm, task: Task, method, examples: list[dict]) -> dict | None:
    """Refuse, before anything runs, an LM cell that exceeds the model's context or the free memory."""
    if task.family != "lm" or not examples:
        return None
    from r3mem_bench.methods.reference import FullContext

    where = f"{task.name} · {method.name}"
    if isinstance(method, FullContext) and method.max_context > lm.max_length:
        raise UserError(f"{where}: max_context={method.max_context} exceeds the model's context of {lm.max_length} "
                        f"tokens; fix: --method-arg max_context={lm.max_length} or less")
    doc_tokens = max_document_tokens(lm.tokenizer, examples, task.params.get("max_tokens") or 0)
    tokens, batch = lm_forward_plan(lm, task, method, doc_tokens)
    if tokens > lm.max_length and not isinstance(method, FullContext):
        raise UserError(f"{where}: a forward pass would need {tokens} tokens but the model's context is "
                        f"{lm.max_length}; fix: lower --segment-len (or the method's window / --memory-budget)")
    need = estimate_forward_bytes(lm, tokens, batch)
    have = available_memory_bytes(lm.device)
    if need > have:
        raise UserError(f"{where}: estimated peak {need / 2**30:.1f} GiB for a forward pass of {batch} x {tokens} "
                        f"tokens (longest document {doc_tokens} tokens) but only {have / 2**30:.1f} GiB is free; "
                        "fix: --max-tokens N or a smaller window (--method-arg max_context=N / batch_size=1)")
    return {"doc_tokens": doc_tokens, "tokens": tokens, "batch": batch, "bytes": need, "available": have}


def ingest_budget(cfg: RunConfig, family, task: Task, method, examples: list[dict]) -> float | None:
    """Print the method's estimate of its ingest time for this cell (``MemoryMethod.ingest_estimate``) and refuse,
    before anything runs, a cell whose estimate exceeds ``--max-ingest-minutes``; the estimate in seconds."""
    corpora_of = getattr(family, "ingest_corpora", None)
    if corpora_of is None or not examples or (cfg.quiet and cfg.max_ingest_minutes is None):
        return None
    corpora = corpora_of(task, examples)
    estimate = method.ingest_estimate(corpora)
    if estimate is None:
        return None
    seconds, how = estimate
    where = f"{task.name} · {method.name}"
    if not cfg.quiet:
        _stderr(f"{where}: ingest of {len(corpora)} {'corpus' if len(corpora) == 1 else 'corpora'} "
                f"({sum(len(c) for c in corpora):,} items) estimated at "
                f"{seconds / 60:.1f} min ({how})")
    if cfg.max_ingest_minutes is not None and seconds > 60 * cfg.max_ingest_minutes:
        raise UserError(f"{where}: ingest estimated at {seconds / 60:.1f} min, over --max-ingest-minutes "
                        f"{cfg.max_ingest_minutes:g}; fix: a smaller --limit (fewer corpora), a smaller --model, or a "
                        "larger --max-ingest-minutes")
    return seconds


def _stderr(message: str) -> None:
    """Progress and warnings of long steps (ingest), one line each, on stderr like the suite's cell lines."""
    print(message, file=sys.stderr, flush=True)


def _make_output(output: str) -> None:
    try:
        Path(output).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--output {output}: cannot create it ({exc.strerror}); fix: choose a writable directory") from None


TEST_DELAY_ENV = "R3MEM_BENCH_TEST_DELAY"


def example_delay_seconds() -> float:
    """Test-only hook: seconds to wait before storing each row (``R3MEM_BENCH_TEST_DELAY``, crash-safety tests)."""
    value = os.environ.get(TEST_DELAY_ENV, "")
    try:
        return max(0.0, float(value)) if value else 0.0
    except ValueError:
        raise UserError(f"{TEST_DELAY_ENV}={value!r}: not a number of seconds; fix: unset it") from None


KILL_AFTER_ENV = "R3MEM_BENCH_KILL_AFTER_ROWS"


def kill_after_rows() -> int:
    """Check-only hook: SIGKILL this process right after it stores row N of a cell (``R3MEM_BENCH_KILL_AFTER_ROWS``).

    Set only by ``check-method``'s SIGKILL-resume check (``r3mem_bench.conformance``): a cell that already had N
    rows when the process started never reaches the N-th row here, so each rerun gets past one more cell."""
    value = os.environ.get(KILL_AFTER_ENV, "")
    if value and not (value.isdigit() and int(value) > 0):
        raise UserError(f"{KILL_AFTER_ENV}={value!r}: not a positive number of rows; fix: unset it")
    return int(value) if value else 0


def _evaluate_cell(cfg: RunConfig, family, task: Task, method, todo: list[dict], store: RunStore) -> None:
    """Run one cell's remaining examples with a progress bar; each finished row is stored at once."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    stats = {"tokens": 0, "t0": time.perf_counter()}

    delay = example_delay_seconds()
    kill_after = kill_after_rows()

    def emit(row: dict) -> None:
        row["method"], row["task"] = method.name, task.name
        if delay:
            time.sleep(delay)
        store.append(row)
        if kill_after and len(store.rows) == kill_after:
            import signal

            os.kill(os.getpid(), signal.SIGKILL)
        bar.update(job, advance=1)

    def tokens(n: int) -> None:
        stats["tokens"] += n
        rate = stats["tokens"] / max(1e-9, time.perf_counter() - stats["t0"])
        bar.update(job, tps=f"{rate:,.0f} tok/s")

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[tps]}"),
                  TimeElapsedColumn(), disable=cfg.quiet, transient=False) as bar:
        job = bar.add_task(f"{task.name} · {method.name}", total=len(todo), tps="")
        family.evaluate(task, method, todo, emit, progress=tokens)
