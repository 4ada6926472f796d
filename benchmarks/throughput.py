"""Throughput with batching: LM scoring tokens/s (``no_memory``'s ``batch_size``) and QA questions/s
(``HFGenerator``'s ``batch_size``) at batch sizes 1, 4 and 16, next to lm-eval's ``hf`` model on the same text.

LM: ``no_memory`` scores each segment of ``--segment-len`` tokens on its own (prefix token + segment), so the
lm-eval contender is a ``loglikelihood_rolling`` task over the same documents with ``max_length`` = segment
length: disjoint windows that each predict that many tokens in one forward pass of the same length, with the same
``batch_size``. QA: greedy answers to the seeded needle questions, prompt = the task's template over the gold
passages, generated through ``HFGenerator.generate`` with the given batch size (the QA protocol itself calls the
generator one question at a time; this measures what batching would buy).

    nice -n 10 python benchmarks/throughput.py                       # SmolLM2-135M
    nice -n 10 python benchmarks/throughput.py --model tiny-random --out /tmp/t.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import LmEvalRolling, lm_docs, lm_task, plot, setup, write_result

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
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    setup(args.threads)
    from r3mem_bench.generation import HFGenerator
    from r3mem_bench.models import load_model

    lm = load_model(args.model, threads=args.threads)
    task = lm_task(args.tokens, segment_len=args.segment_len, min_tokens=args.tokens)
    docs = lm_docs(task, lm.tokenizer, args.documents)
    lm_throughput(lm, task, docs[:1], 4)  # warm-up
    lm_rows = []
    for batch in BATCHES:
        seconds, tokens = lm_throughput(lm, task, docs, batch)
        import copy

        windowed = copy.copy(lm)
        windowed.max_length = args.segment_len
        contender = LmEvalRolling(windowed, task, args.documents, batch_size=batch)
        contender.run()  # warm-up: builds the dataset cache
        le_seconds, _ = contender.run()
        lm_rows.append({"batch_size": batch, "seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
                        "lm_eval_seconds": le_seconds, "lm_eval_tokens_per_s": tokens / le_seconds,
                        "ratio_vs_lm_eval": (tokens / seconds) / (tokens / le_seconds)})
        print(f"LM batch {batch}: {tokens / seconds:,.0f} tok/s (lm-eval {tokens / le_seconds:,.0f} tok/s)", flush=True)
    prompts = qa_prompts(lm, args.questions)
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
    payload = {"model": args.model, "threads": args.threads, "documents": len(docs), "tokens_per_document": args.tokens,
               "segment_len": args.segment_len, "lm": lm_rows, "qa": qa_rows,
               "qa_answers_identical_across_batch_sizes": same,
               "notes": "lm-eval: loglikelihood_rolling with max_length = segment_len and the same batch size, "
                        "same model object and prefix token; seconds of the second simple_evaluate call."}
    path = write_result("throughput", payload, args.out)
    plot(path.with_suffix(".png"), f"Throughput ({args.model}, {args.threads} threads)", "batch size",
         "tokens/s (LM) | questions/s x100 (QA)",
         {"LM no_memory": (list(BATCHES), [r["tokens_per_s"] for r in lm_rows]),
          "LM lm-eval": (list(BATCHES), [r["lm_eval_tokens_per_s"] for r in lm_rows]),
          "QA HFGenerator x100": (list(BATCHES), [100 * r["questions_per_s"] for r in qa_rows])}, logx=True)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
