"""Throughput against the machine's GEMM ceiling: LM scoring tokens/s (``no_memory``'s ``batch_size``) and QA
questions/s (``HFGenerator``'s ``batch_size``) at batch sizes 1, 4 and 16 next to lm-eval's ``hf`` model on the
same text, QA prefill tokens/s, and training tokens/s of R3Mem and RMT in fp32 one sample per pass against bf16
micro-batches at the same effective batch (RMT also compiled, ``train --compile``).

The ceiling is measured in the same run: fp32 matrix products of the model's own shapes (a forward pass's rows x
each linear layer's in x out, and the output head), timed at the thread count of the run; the forward pass's
FLOPs per token (2 x in x out per linear layer and the head, plus attention over the average context) divided by
those rates gives the tokens/s a GEMM-bound forward pass would reach. Scoring and prefill report their fraction of
it; training reports its fraction of a third of it (forward + backward ~ 3 forward passes of GEMMs).

LM: ``no_memory`` scores each segment of ``--segment-len`` tokens on its own (prefix token + segment), so the
lm-eval contender is a ``loglikelihood_rolling`` task over the same documents with ``max_length`` = segment
length: disjoint windows that each predict that many tokens in one forward pass of the same length, with the same
``batch_size``. QA: greedy answers to the seeded needle questions, prompt = the task's template over the gold
passages, generated through ``HFGenerator.generate`` with the given batch size (the QA protocol generates a
cell's questions in batches of the generator's ``batch_size``, 8 by default).

    nice -n 10 python benchmarks/throughput.py                       # SmolLM2-135M
    nice -n 10 python benchmarks/throughput.py --model tiny-random --out /tmp/t.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RMT_TRAINING, ROOT, LmEvalRolling, lm_docs, lm_task, plot, setup, write_result

BATCHES = (1, 4, 16)


def lm_throughput(lm, task, docs: list[dict], batch: int) -> tuple[float, int]:
    """(seconds, tokens scored) of ``no_memory`` with ``batch_size`` over the documents."""
    from r3mem_bench.families import get_family
    from r3mem_bench.methods import get_method_class

    rows: list[dict] = []
    t0 = time.perf_counter()
    get_family("lm").evaluate(task, get_method_class("no_memory")(lm, {"batch_size": batch}), docs, rows.append)
    return time.perf_counter() - t0, sum(sum(r["segment_tokens"]) for r in rows)


def qa_prompts(lm, n: int) -> list[str]:
    """``n`` needle questions rendered with the task's shared prompt over their gold passages."""
    from r3mem_bench.families import get_family
    from r3mem_bench.generation import make_prompt
    from r3mem_bench.task import TaskRegistry

    task = TaskRegistry().resolve("needle", {"n_corpora": max(1, n // 4 + 1)})[0]
    questions = get_family("rag").examples(task, None, lm.tokenizer)[:n]
    prompt = make_prompt(task.params)
    items = {it.id: it.text for items in task.data["corpora"].values() for it in items}
    return [prompt.render(question=q["question"], context="\n".join(items[i] for i in q["gold_ids"]))
            for q in questions]


def gemm_ceiling(lm, rows: int, context: int, repeats: int = 5, head: bool = True, dtype: str = "fp32") -> dict:
    """Tokens/s of a forward pass whose matrix products all run at the measured GEMM rate of their shape in
    ``dtype`` (fp32 or bf16; ``head=False``: without the output head, as a prefill that only needs the last
    position's logits)."""
    import torch

    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    cfg = lm.model.config
    d, ff, L, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    heads = cfg.num_attention_heads
    kv = (getattr(cfg, "num_key_value_heads", None) or heads) * (d // heads)
    shapes = {"q,o": (d, d, 2 * L), "k,v": (d, kv, 2 * L), "gate,up": (d, ff, 2 * L), "down": (ff, d, L),
              "head": (d, V, 1 if head else 0)}
    rates, seconds_per_token = {}, 0.0
    for name, (k, n, count) in shapes.items():
        a, b = torch.randn(rows, k, dtype=dt), torch.randn(k, n, dtype=dt)
        a @ b
        t0 = time.perf_counter()
        for _ in range(repeats):
            a @ b
        rate = 2 * rows * k * n * repeats / (time.perf_counter() - t0)
        rates[name] = rate / 1e9
        seconds_per_token += 2 * k * n * count / rate
    attention = 4 * L * d * context  # scores and weighted values over `context` keys, per token
    seconds_per_token += attention / (1e9 * min(rates.values()))
    flops = sum(2 * k * n * c for k, n, c in shapes.values()) + attention
    return {"rows": rows, "context": context, "dtype": dtype, "gflops_by_shape": rates, "flops_per_token": flops,
            "tokens_per_s_limit": 1.0 / seconds_per_token}


def prefill_throughput(lm, prompts: list[str], batch: int) -> tuple[float, int]:
    """(seconds, tokens) of forward passes over the chat-formatted prompts, ``batch`` at a time (no generation)."""
    import torch

    from r3mem_bench.generation import HFGenerator

    gen = HFGenerator(lm, batch_size=batch)
    ids = [gen.encode(p) for p in prompts]
    t0, tokens = time.perf_counter(), 0
    for start in range(0, len(ids), batch):
        chunk = ids[start: start + batch]
        width = max(len(x) for x in chunk)
        x = torch.full((len(chunk), width), lm.tokenizer.pad_token_id)
        mask = torch.zeros_like(x)
        for i, row in enumerate(chunk):
            x[i, width - len(row):], mask[i, width - len(row):] = torch.tensor(row), 1
        with torch.no_grad():
            lm.model.get_decoder()(input_ids=x, attention_mask=mask)
        tokens += sum(len(r) for r in chunk)
    return time.perf_counter() - t0, tokens


STAGE2 = {"lora_r": 16, "lora_alpha": 32, "level_probs": [1.0, 0.0, 0.0], "train_memory_sizes": [16],
          "train_memory_probs": [1.0]}
TRAINING = [  # (label, method, segments, method options, precision, micro_batch, grad_accum[, compile])
    ("rmt", "rmt", 4, RMT_TRAINING, "fp32", 1, 4),
    ("rmt", "rmt", 4, RMT_TRAINING, "fp32", 4, 1),
    ("rmt", "rmt", 4, RMT_TRAINING, "bf16", 4, 1),
    ("rmt", "rmt", 4, RMT_TRAINING, "bf16", 4, 1, True),  # train --compile
    ("r3mem stage 1", "r3mem", 1, {"recon_warmup_steps": 1000, "w_cycle": 0, "lora_r": 16, "lora_alpha": 32}, "fp32", 1, 4),
    ("r3mem stage 1", "r3mem", 1, {"recon_warmup_steps": 1000, "w_cycle": 0, "lora_r": 16, "lora_alpha": 32}, "fp32", 4, 1),
    ("r3mem stage 1", "r3mem", 1, {"recon_warmup_steps": 1000, "w_cycle": 0, "lora_r": 16, "lora_alpha": 32}, "bf16", 4, 1),
    # stage 2 at document level with M = 16, so every step costs the same (levels and sizes are drawn per sample)
    ("r3mem stage 2", "r3mem", 3, STAGE2, "fp32", 1, 4),
    ("r3mem stage 2", "r3mem", 3, STAGE2, "bf16", 1, 4),
    ("r3mem stage 2", "r3mem", 3, STAGE2, "fp32", 4, 1),
    ("r3mem stage 2", "r3mem", 3, STAGE2, "bf16", 4, 1),
]


def training_throughput(model: str, threads: int, steps: int, rows=None) -> list[dict]:
    """Tokens/s of training steps (the first step is a warm-up and not counted: it compiles, with ``compile``) for
    each row of ``TRAINING`` (or ``rows``), with the ``r3mem_bench`` that is imported (the baseline run imports an
    older one)."""
    import dataclasses
    import json
    import tempfile

    from r3mem_bench.train import TrainConfig, train

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    out = []
    for label, method, segments, opts, precision, micro, accum, *flags in rows or TRAINING:
        compiled = bool(flags and flags[0])
        with tempfile.TemporaryDirectory() as tmp:
            given = dict(method=method, model=model, steps=steps + 1, output=tmp, segment_len=128,
                         segments=segments, grad_accum=accum, micro_batch=micro, precision=precision,
                         compile=compiled, warmup=1, checkpoint_every=steps + 1, threads=threads,
                         method_options=dict(opts))
            # code without micro-batches or precision (the baseline) trains one fp32 sample per pass anyway
            cfg = TrainConfig(**{k: v for k, v in given.items() if k in fields})
            train(cfg, quiet=True)
            log = [json.loads(line) for line in (Path(tmp) / "train_log.jsonl").read_text().splitlines()]
        first, log = log[0], log[1:]
        seconds = sum(r["seconds"] for r in log)
        tokens = len(log) * micro * accum * segments * 128
        out.append({"label": label, "method": method, "precision": precision, "micro_batch": micro,
                    "grad_accum": accum, "compile": compiled, "segments": segments, "steps": len(log),
                    "seconds": seconds, "first_step_seconds": first["seconds"], "text_tokens_per_s": tokens / seconds,
                    "losses": [first["loss"]] + [r["loss"] for r in log]})
        print(f"train {label} {precision} mb{micro} x{accum}{' compiled' if compiled else ''}: "
              f"{tokens / seconds:,.0f} text tok/s (first step {first['seconds']:.0f} s)", flush=True)
    return out


def combine(repeats: list[list[dict]], baselines: list[list[dict]]) -> list[dict]:
    """One row per configuration over interleaved repeats: the median tokens/s, and each speed-up as the median of
    its ratios within a repeat (against the fp32 one-sample-per-pass row of the same code, and against the
    baseline commit's row timed just before), so a drift of the machine's speed between repeats cancels."""
    import statistics

    out = []
    for i, row in enumerate(repeats[0]):
        runs = [rep[i] for rep in repeats]
        ratio, old = [], []
        for r, rep in enumerate(repeats):
            base = next(x for x in rep if x["label"] == row["label"] and x["precision"] == "fp32" and x["micro_batch"] == 1)
            ratio.append(rep[i]["text_tokens_per_s"] / base["text_tokens_per_s"])
            before = next((x for x in (baselines[r] if r < len(baselines) else []) if x["label"] == row["label"]), None)
            if before:
                old.append(rep[i]["text_tokens_per_s"] / before["text_tokens_per_s"])
        out.append({**row, "seconds": [x["seconds"] for x in runs], "losses": [x["losses"] for x in runs],
                    "text_tokens_per_s": statistics.median(x["text_tokens_per_s"] for x in runs),
                    "text_tokens_per_s_each": [x["text_tokens_per_s"] for x in runs],
                    "speedup_vs_fp32_mb1": statistics.median(ratio),
                    **({"speedup_vs_baseline_commit": statistics.median(old),
                        "speedup_vs_baseline_commit_each": old} if old else {})})
    return out


def baseline_training(commit: str, model: str, threads: int, steps: int, label: str | None = None) -> list[dict]:
    """The one-sample-per-pass fp32 rows of ``TRAINING`` (those of ``label``, or all) timed on the code of
    ``commit``, in a child process on a temporary git worktree (its package layout rebuilt from its pyproject), on
    this machine in this run."""
    import json
    import subprocess
    import tempfile
    import tomllib

    with tempfile.TemporaryDirectory() as tmp:
        code = Path(tmp) / "code"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-f", str(code), commit], check=True,
                       capture_output=True)
        try:
            dirs = tomllib.loads((code / "pyproject.toml").read_text())["tool"]["setuptools"].get("package-dir", {})
            for package, folder in dirs.items():  # "r3mem_bench.baselines" = "baselines": link it into the package
                link = code / package.replace(".", "/")
                if not link.exists():
                    link.symlink_to(code / folder, target_is_directory=True)
            out = Path(tmp) / "rows.json"
            here = str(Path(__file__).resolve().parent)
            child = (f"import sys, json; sys.path.insert(0, {here!r}); import throughput as t; t.setup({threads}); "
                     f"rows = [r for r in t.TRAINING if r[4] == 'fp32' and r[5] == 1 and {label!r} in (None, r[0])]; "
                     f"json.dump(t.training_throughput({model!r}, {threads}, {steps}, rows), open({str(out)!r}, 'w'))")
            env = {**os.environ, "PYTHONPATH": str(code)}
            subprocess.run([sys.executable, "-c", child], check=True, cwd=tmp, env=env)
            rows = json.loads(out.read_text())
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(code)], capture_output=True)
    for row in rows:
        row["commit"] = commit
    return rows


def scoring_and_generation(lm, args) -> dict:
    """LM scoring and QA prefill against the GEMM ceiling, and QA generation, at each batch size."""
    from r3mem_bench.generation import HFGenerator

    task = lm_task(args.tokens, segment_len=args.segment_len, min_tokens=args.tokens)
    docs = lm_docs(task, lm.tokenizer, args.documents)
    lm_throughput(lm, task, docs[:1], 4)  # warm-up
    ceilings = {b: gemm_ceiling(lm, b * (args.segment_len + 1), args.segment_len // 2) for b in BATCHES}
    lm_rows = []
    for batch in BATCHES:
        seconds, tokens = lm_throughput(lm, task, docs, batch)
        row = {"batch_size": batch, "seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
               "gemm_limit_tokens_per_s": ceilings[batch]["tokens_per_s_limit"],
               "fraction_of_ceiling": tokens / seconds / ceilings[batch]["tokens_per_s_limit"]}
        if not args.no_lm_eval:
            import copy

            windowed = copy.copy(lm)
            windowed.max_length = args.segment_len
            contender = LmEvalRolling(windowed, task, args.documents, batch_size=batch)
            contender.run()  # warm-up: builds the dataset cache
            le_seconds, _ = contender.run()
            row.update({"lm_eval_seconds": le_seconds, "lm_eval_tokens_per_s": tokens / le_seconds,
                        "ratio_vs_lm_eval": (tokens / seconds) / (tokens / le_seconds)})
        lm_rows.append(row)
        print(f"LM batch {batch}: {tokens / seconds:,.0f} tok/s = {row['fraction_of_ceiling']:.0%} of the GEMM "
              f"limit ({row['gemm_limit_tokens_per_s']:,.0f})", flush=True)
    prompts = qa_prompts(lm, args.questions)
    prefill = []
    for batch in (1, 4):
        seconds, tokens = prefill_throughput(lm, prompts, batch)
        width = max(len(HFGenerator(lm).encode(p)) for p in prompts)
        limit = gemm_ceiling(lm, batch * width, width // 2, head=False)["tokens_per_s_limit"]
        prefill.append({"batch_size": batch, "seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
                        "gemm_limit_tokens_per_s": limit, "fraction_of_ceiling": tokens / seconds / limit})
        print(f"QA prefill batch {batch}: {tokens / seconds:,.0f} tok/s = {tokens / seconds / limit:.0%}", flush=True)
    qa_rows = []
    for batch in BATCHES:
        gen = HFGenerator(lm, max_new_tokens=args.max_new_tokens, batch_size=batch)
        gen.generate(prompts[:1])
        t0 = time.perf_counter()
        outs = gen.generate(prompts)
        seconds = time.perf_counter() - t0
        qa_rows.append({"batch_size": batch, "seconds": seconds, "questions": len(prompts),
                        "questions_per_s": len(prompts) / seconds,
                        "prompt_tokens": sum(o.prompt_tokens for o in outs), "new_tokens": sum(o.new_tokens for o in outs),
                        "answers": [o.text for o in outs]})
        print(f"QA batch {batch}: {len(prompts) / seconds:.2f} questions/s", flush=True)
    same = all(r["answers"] == qa_rows[0]["answers"] for r in qa_rows)
    return {"documents": len(docs), "tokens_per_document": args.tokens, "segment_len": args.segment_len,
            "gemm_ceiling": ceilings, "lm": lm_rows, "qa_prefill": prefill, "qa": qa_rows,
            "qa_answers_identical_across_batch_sizes": same}


def main(argv: list[str] | None = None) -> int:
    """Measure and write results/benchmarks/throughput.json (+ throughput.png)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--documents", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=2048, help="tokens per document")
    ap.add_argument("--segment-len", type=int, default=256)
    ap.add_argument("--questions", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--train-steps", type=int, default=3, help="timed training steps per configuration (0: skip)")
    ap.add_argument("--no-lm-eval", action="store_true", help="skip the lm-eval contender")
    ap.add_argument("--baseline-commit", default=None,
                    help="also time the one-sample-per-pass fp32 training rows on this commit's code (the 'before')")
    ap.add_argument("--repeats", type=int, default=1, help="interleaved repeats of the training rows (medians)")
    ap.add_argument("--training-only", action="store_true",
                    help="only the training rows, written to throughput_training.json")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    setup(args.threads)
    from r3mem_bench.models import load_model

    lm = load_model(args.model, threads=args.threads)
    payload: dict = {"model": args.model, "threads": args.threads}
    if not args.training_only:
        payload.update(scoring_and_generation(lm, args))
    baselines, repeats = [], []
    labels = list(dict.fromkeys(row[0] for row in TRAINING))
    for _ in range(args.repeats if args.train_steps else 0):  # per label: the baseline code, then the current one
        base, current = [], []
        for label in labels:
            if args.baseline_commit:
                base += baseline_training(args.baseline_commit, args.model, args.threads, args.train_steps, label)
            current += training_throughput(args.model, args.threads, args.train_steps,
                                           [row for row in TRAINING if row[0] == label])
        baselines += [base] if args.baseline_commit else []
        repeats.append(current)
    training = combine(repeats, baselines) if repeats else []
    baseline = combine(baselines, []) if baselines else []
    for row in baseline:
        row.pop("speedup_vs_fp32_mb1", None)
    # forward + backward ~ 3 forward passes of GEMMs; rows x context of a 4-sample micro-batch of 128 + 2 x 16
    limits = {dt: gemm_ceiling(lm, 4 * 161, 80, dtype=dt)["tokens_per_s_limit"] / 3 for dt in ("fp32", "bf16")}
    for row in baseline + training:
        row["fraction_of_training_ceiling"] = row["text_tokens_per_s"] / limits[row["precision"]]
    payload.update({"training_baseline": baseline, "training": training,
                    "training_limit_text_tokens_per_s": limits,
                    "notes": "lm-eval: loglikelihood_rolling with max_length = segment_len and the same batch size, "
                             "same model object and prefix token; seconds of the second simple_evaluate call. "
                             "Training: text tokens (segments x 128 x samples) per second of optimizer steps; the "
                             "first step is not timed; its ceiling counts forward + backward as 3 forward passes of "
                             "GEMMs at the rate measured in the row's precision. training_baseline: the fp32 "
                             "one-sample-per-pass rows on the code of --baseline-commit, same machine and run, "
                             "timed just before the current code's rows of the same step kind in each repeat; "
                             "tokens/s are medians over repeats, speed-ups medians of the ratios within a repeat.",
                    "baseline_commit": args.baseline_commit, "repeats": args.repeats})
    path = write_result("throughput_training" if args.training_only else "throughput", payload, args.out)
    print(f"wrote {path}")
    if args.training_only:
        return 0
    lm_rows, qa_rows = payload["lm"], payload["qa"]
    plot(path.with_suffix(".png"), f"Throughput ({args.model}, {args.threads} threads)", "batch size",
         "tokens/s (LM) | questions/s x100 (QA)",
         {"LM no_memory": (list(BATCHES), [r["tokens_per_s"] for r in lm_rows]),
          "GEMM limit": (list(BATCHES), [r["gemm_limit_tokens_per_s"] for r in lm_rows]),
          **({"LM lm-eval": (list(BATCHES), [r["lm_eval_tokens_per_s"] for r in lm_rows])}
             if not args.no_lm_eval else {}),
          "QA HFGenerator x100": (list(BATCHES), [100 * r["questions_per_s"] for r in qa_rows])}, logx=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
