"""Answer likelihood: seconds per question of the QA likelihood pass, packed and prefix-reusing vs one pass each.

The prompts and candidate answers are those the QA family scores on the needle task (``full_context``,
``vector_rag`` and ``no_memory`` after ingesting each corpus; the gold answer and the corpus's other codes as
candidates). Both contenders score the same token ids with the same loaded model and threads, interleaved per
question: ``packed`` is :func:`r3mem_bench.generation.continuation_nll` as the methods call it (the candidates
packed into one pass after the prompt, the prompt's leading blocks reused from the previous question's through a
``PromptCache``); ``separate`` runs the prompt once and then each candidate in a pass of its own on its cache, with no
reuse across questions. Also reports the largest absolute NLL difference between the two.

    nice -n 10 python benchmarks/answer_likelihood.py                   # SmolLM2-135M, 2 corpora x 10 questions
    nice -n 10 python benchmarks/answer_likelihood.py --model tiny-random --corpora 1 --out /tmp/a.json
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import model_parser, setup, write_result

METHODS = ("no_memory", "vector_rag", "full_context")


def one_pass_each(model, prompt: list[int], conts: list[list[int]]) -> list[tuple[float, int]]:
    """The prompt in one pass, then each continuation in a pass of its own on its cache (cropped back after each):
    scoring without packing or reuse."""
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        out = model(input_ids=torch.tensor([prompt]), use_cache=True, logits_to_keep=1)
        cache, last, scores = out.cache, out.logits[:, -1:], []
        for ids in conts:
            logits = last
            if len(ids) > 1:
                step = model(input_ids=torch.tensor([ids[:-1]]), cache=cache, use_cache=True)
                logits = torch.cat([last, step.logits], dim=1)
                cache.crop(-(cache.get_seq_length() - len(prompt)))  # negative: drop that many
            scores.append((float(F.cross_entropy(logits[0].float(), torch.tensor(ids), reduction="sum")) / len(ids),
                           len(ids)))
    return scores


def main(argv: list[str] | None = None) -> int:
    """Time both contenders per method; write results/benchmarks/answer_likelihood.json."""
    ap = model_parser(__doc__)
    ap.add_argument("--corpora", type=int, default=2)
    ap.add_argument("--questions", type=int, default=10, help="questions per corpus")
    args = ap.parse_args(argv)
    setup(args.threads)
    from r3mem_bench.backends import make_generator
    from r3mem_bench.families import get_family
    from r3mem_bench.generation import PromptCache, continuation_nll, make_prompt
    from r3mem_bench.methods import get_method_class
    from r3mem_bench.models import load_model
    from r3mem_bench.task import TaskRegistry

    lm = load_model(args.model)
    task = TaskRegistry().resolve("needle", {"n_corpora": args.corpora, "questions_per_corpus": args.questions})[0]
    questions = get_family("rag").examples(task)
    gen, prompt = make_generator(lm, task.params), make_prompt(task.params)
    out = {}
    for name in METHODS:
        method = get_method_class(name)(lm, {}, generator=gen, prompt=prompt)
        enc = method._encoder()
        cache, seconds, worst, corpus = PromptCache(), {"packed": 0.0, "separate": 0.0}, 0.0, None
        for q in questions:
            if q["corpus_id"] != corpus:
                corpus = q["corpus_id"]
                method.reset()
                method.ingest(task.data["corpora"][corpus])
            context, _ = method.retrieve(q["question"])
            ids = enc.encode(prompt.render(question=q["question"], context=context))
            conts = [enc.continuation_ids(t) for t in [q["answers"][0]] + [c for c in q["candidates"]
                                                                          if c != q["answers"][0]]]
            t = time.perf_counter()
            packed = continuation_nll(lm.model, conts, prompt_ids=ids, prompt_cache=cache)
            seconds["packed"] += time.perf_counter() - t
            t = time.perf_counter()
            separate = one_pass_each(lm.model, ids, conts)
            seconds["separate"] += time.perf_counter() - t
            worst = max(worst, max(abs(a[0] - b[0]) for a, b in zip(packed, separate)))
        n = len(questions)
        out[name] = {"questions": n, "prompt_tokens_last": len(ids), "candidates_last": len(conts),
                     "packed_s_per_question": seconds["packed"] / n,
                     "separate_s_per_question": seconds["separate"] / n,
                     "speedup": seconds["separate"] / seconds["packed"], "max_abs_nll_difference": worst}
        print(f"{name:14s} packed {out[name]['packed_s_per_question']:.3f} s/q  separate "
              f"{out[name]['separate_s_per_question']:.3f} s/q  x{out[name]['speedup']:.2f}  "
              f"max |dNLL| {worst:.2e}", flush=True)
    path = write_result("answer_likelihood", {"model": args.model, "threads": args.threads, "task": "needle",
                                              "corpora": args.corpora, "questions_per_corpus": args.questions,
                                              "methods": out}, args.out)
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
