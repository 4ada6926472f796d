"""Export LM tasks as lm-evaluation-harness tasks, and check full-context parity with lm-eval.

``r3mem-bench export-lm-eval --task T --out DIR`` writes, for each task (one per sweep cell), a JSONL with the
documents a run scores (same loader, ``min_tokens``/``max_documents`` filters and ``max_tokens`` truncation) and
an lm-eval YAML task over it (``dataset_path: json``, ``output_type: loglikelihood_rolling``, ``doc_to_text: ''``,
``doc_to_target: text``, metrics word_perplexity / byte_perplexity / bits_per_byte), so that full-context numbers
can be reproduced with lm-eval's ``hf`` model. Give lm-eval our document prefix token
(``--model_args pretrained=DIR,prefix_token_id=ID``): by default it prefixes windows with the tokenizer's BOS.

Bits per byte agree by construction when the document fits the model's window: lm-eval divides the summed NLL by
the UTF-8 bytes of the exported text, and our LM family counts the bytes of the scored segments, which add up to
the same text when ``warmup_segments`` is 0 (the exported text is already cut at ``max_tokens``). Longer
documents differ slightly: lm-eval scores disjoint windows (only its last window gets extra context), while
``full_context`` gives every token at least ``max_context - stride`` tokens of context.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Optional

import typer
import yaml

from r3mem_bench.errors import UserError

LM_EVAL_METRICS = ("word_perplexity", "byte_perplexity", "bits_per_byte")


def lm_eval_task_name(task) -> str:
    """The lm-eval task name of one of our tasks (sweep cells included): ``r3mem_<task>[_<cell>]``."""
    return "r3mem_" + re.sub(r"[^A-Za-z0-9]+", "_", task.name).strip("_")


def export_task(task, tokenizer, out_dir: Path, data: str | None = None, limit: int | None = None) -> dict:
    """Write ``<name>.jsonl`` (the documents as scored) and ``<name>.yaml`` (the lm-eval task); returns a summary."""
    from r3mem_bench.families import get_family
    from r3mem_bench.families.lm import truncate_text
    from r3mem_bench.store import atomic_write_text

    if task.family != "lm":
        raise UserError(f"export-lm-eval: task '{task.name}' is in family '{task.family}'; fix: give an LM task")
    if task.params.get("warmup_segments"):
        raise UserError(f"export-lm-eval: task '{task.name}' has warmup_segments={task.params['warmup_segments']}, "
                        "which lm-eval cannot skip; fix: --param warmup_segments=0")
    docs = get_family("lm").examples(task, data, tokenizer)
    docs = docs[:limit] if limit else docs
    name = lm_eval_task_name(task)
    jsonl = (out_dir / f"{name}.jsonl").resolve()
    rows = [{"id": d["id"], "text": truncate_text(d["text"], tokenizer, task.params["max_tokens"])} for d in docs]
    atomic_write_text(jsonl, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    spec = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(jsonl)}},
        "test_split": "test",
        "output_type": "loglikelihood_rolling",
        "doc_to_text": "",
        "doc_to_target": "text",
        "should_decontaminate": False,
        "metric_list": [{"metric": m} for m in LM_EVAL_METRICS],  # lm-eval's default aggregations
        "metadata": {"version": 1.0},
    }
    header = (f"# Exported by `r3mem-bench export-lm-eval` from task '{task.name}' ({len(rows)} documents, "
              f"max_tokens={task.params['max_tokens']}).\n")
    atomic_write_text(out_dir / f"{name}.yaml", header + yaml.safe_dump(spec, sort_keys=False))
    return {"task": task.name, "lm_eval_task": name, "documents": len(rows), "jsonl": str(jsonl),
            "bytes": sum(len(r["text"].encode("utf-8")) for r in rows)}


def lm_eval_command(model_dir: str, prefix_token_id: int, out_dir: Path, names: list[str]) -> str:
    """The offline lm-eval command line that reproduces full-context numbers on exported tasks."""
    return (f"HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 lm_eval --model hf --model_args "
            f"pretrained={model_dir},prefix_token_id={prefix_token_id},dtype=float32 --include_path {out_dir} "
            f"--tasks {','.join(names)} --batch_size 1")


def lm_eval_parity(lm, task, out_dir: Path, limit: int | None = None, batch_size: int = 1) -> dict:
    """Bits per byte of ``full_context`` through our LM protocol and of lm-eval's HFLM on the exported task.

    Both use the same loaded model object and document prefix token; returns both numbers and their relative
    difference (lm-eval's value as reference).
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from r3mem_bench.families import get_family
    from r3mem_bench.methods import get_method_class

    summary = export_task(task, lm.tokenizer, out_dir, limit=limit)
    fam = get_family("lm")
    docs = fam.examples(task, None, lm.tokenizer)
    docs = docs[:limit] if limit else docs
    method = get_method_class("full_context")(lm, {})
    rows: list[dict] = []
    t0 = time.perf_counter()
    fam.evaluate(task, method, docs, rows.append)
    ours_s = time.perf_counter() - t0
    ours = fam.aggregate(rows, task.params)

    hflm = HFLM(pretrained=lm.model, tokenizer=lm.tokenizer, prefix_token_id=lm.prefix_token_id,
                max_length=lm.max_length, batch_size=batch_size, device=str(lm.device))
    t0 = time.perf_counter()
    manager = TaskManager(include_path=str(out_dir), include_defaults=False)
    res = lm_eval.simple_evaluate(model=hflm, tasks=[summary["lm_eval_task"]], task_manager=manager,
                                  log_samples=False)
    theirs_s = time.perf_counter() - t0
    metrics = res["results"][summary["lm_eval_task"]]
    bpb = float(metrics["bits_per_byte,none"])
    return {
        "task": task.name, "model": lm.name, "prefix_token_id": lm.prefix_token_id, "max_length": lm.max_length,
        "documents": summary["documents"], "bytes": summary["bytes"], "tokens_scored": ours["tokens_scored"],
        "params": {k: task.params[k] for k in ("segment_len", "max_tokens", "min_tokens", "max_documents")},
        "ours_bits_per_byte": ours["bits_per_byte"], "lm_eval_bits_per_byte": bpb,
        "relative_difference": abs(ours["bits_per_byte"] - bpb) / bpb,
        "ours_ppl": ours["ppl"], "lm_eval_word_perplexity": float(metrics["word_perplexity,none"]),
        "lm_eval_byte_perplexity": float(metrics["byte_perplexity,none"]),
        "ours_seconds": ours_s, "lm_eval_seconds": theirs_s, "lm_eval_version": lm_eval.__version__,
    }


def register(app: typer.Typer) -> None:
    """Add ``export-lm-eval`` and ``lm-eval`` to the CLI."""

    @app.command("export-lm-eval")
    def export_lm_eval(
        task: str = typer.Option("lm", "--task", "-t", help="LM task names (comma separated); sweeps expand."),
        out: str = typer.Option(..., "--out", help="Folder for the lm-eval YAML tasks and JSONL documents."),
        model: str = typer.Option("smollm2-135m", "--model", help="Model whose tokenizer defines truncation."),
        include_path: list[str] = typer.Option([], "--include-path", help="Extra folder of task YAMLs."),
        data: Optional[str] = typer.Option(None, "--data", help="Local .txt/.jsonl replacing the task's dataset."),
        limit: Optional[int] = typer.Option(None, "--limit", "-n", help="First N documents of each task."),
        segment_len: Optional[int] = typer.Option(None, "--segment-len", help="LM: tokens per segment."),
        max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="LM: truncate each document to N tokens."),
        param: list[str] = typer.Option([], "--param", help="Task parameter override key=value (repeatable)."),
    ) -> None:
        """Write lm-evaluation-harness tasks (YAML + JSONL) that reproduce full-context LM numbers."""
        from r3mem_bench.cli import _parse_options, _split
        from r3mem_bench.models import load_model, resolve_model_path
        from r3mem_bench.task import TaskRegistry

        if limit is not None and limit <= 0:
            raise UserError(f"--limit {limit}: must be positive; fix: omit it or use --limit 1 or more")
        overrides = _parse_options(param)
        for key, value in (("segment_len", segment_len), ("max_tokens", max_tokens)):
            if value is not None:
                overrides[key] = value
        registry = TaskRegistry(include_path)
        tasks = [t for name in _split(task) for t in registry.resolve(name, overrides)]
        out_dir = Path(out)
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"--out {out}: cannot create it ({exc.strerror}); fix: choose a writable folder") from None
        lm = load_model(model)
        summaries = [export_task(t, lm.tokenizer, out_dir, data, limit) for t in tasks]
        for s in summaries:
            typer.echo(f"{s['lm_eval_task']}: {s['documents']} documents, {s['bytes']} bytes -> {s['jsonl']}")
        model_dir = resolve_model_path(model) if model != "tiny-random" else "<model dir>"
        typer.echo(lm_eval_command(model_dir, lm.prefix_token_id, out_dir.resolve(),
                                   [s["lm_eval_task"] for s in summaries]))

    @app.command("lm-eval", context_settings={"allow_extra_args": True, "ignore_unknown_options": True,
                                               "help_option_names": []})
    def lm_eval_cmd(ctx: typer.Context) -> None:
        """Run lm-evaluation-harness with the ``r3mem-bench`` model registered (all arguments go to lm_eval)."""
        import sys

        import r3mem_bench.lm_eval_adapter  # noqa: F401  (registers --model r3mem-bench)
        from lm_eval.__main__ import cli_evaluate

        sys.argv = ["lm_eval", *ctx.args]
        cli_evaluate()
