"""Harness overhead: full-context scoring of the same text through r3mem-bench vs a bare transformers loop.

One process, one loaded model, the same torch threads, interleaved repeats (order rotating). The harness path
is the LM family's protocol with the ``full_context`` method in-process (tokenize, segment, score, per-segment
bookkeeping, row building); the bare loop tokenizes the same text, prepends the same prefix token and takes
``cross_entropy`` of one forward pass. Also times lm-eval's ``hf`` model (``loglikelihood_rolling``, same model
object and prefix token) on the same text. Target: ``overhead_ratio`` <= 1.05.

    nice -n 10 python benchmarks/harness_overhead.py                  # SmolLM2-135M, 1 article x 1024 tokens
    nice -n 10 python benchmarks/harness_overhead.py --model tiny-random --repeats 3 --out /tmp/h.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import LmEvalRolling, lm_docs, lm_task, median, setup, write_result


def bare_loop(lm, texts: list[str], max_tokens: int) -> float:
    """Summed NLL (nats) of the texts with one plain forward pass each (no harness code)."""
    import torch
    import torch.nn.functional as F

    total = 0.0
    for text in texts:
        ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
        x = torch.tensor([[lm.prefix_token_id, *ids]])
        with torch.no_grad():
            logits = lm.model(input_ids=x).logits[0, :-1]
        total += float(F.cross_entropy(logits.float(), x[0, 1:], reduction="sum"))
    return total


def harness(lm, task, docs: list[dict]) -> float:
    """Summed NLL (nats) of the documents through the LM family protocol and ``full_context``."""
    from r3mem_bench.families import get_family
    from r3mem_bench.methods import get_method_class

    rows: list[dict] = []
    get_family("lm").evaluate(task, get_method_class("full_context")(lm, {}), docs, rows.append)
    return sum(sum(r["segment_nll_sum"]) for r in rows)


def main(argv: list[str] | None = None) -> int:
    """Time both paths and lm-eval; write results/benchmarks/harness_overhead.json."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=1024, help="tokens per document")
    ap.add_argument("--documents", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    setup(args.threads)
    from r3mem_bench.models import load_model

    lm = load_model(args.model, threads=args.threads)
    task = lm_task(args.tokens, min_tokens=args.tokens)
    docs = lm_docs(task, lm.tokenizer, args.documents)
    texts = [d["text"] for d in docs]
    tokens = sum(min(len(lm.tokenizer(t, add_special_tokens=False)["input_ids"]), args.tokens) for t in texts)
    nll_h, nll_b = harness(lm, task, docs), bare_loop(lm, texts, args.tokens)  # warm-up, and the same numbers?
    lm_eval = LmEvalRolling(lm, task, args.documents)
    _, bpb = lm_eval.run()  # warm-up: builds lm-eval's dataset cache
    times: dict[str, list[float]] = {"harness": [], "bare": [], "lm_eval": []}
    contenders = ("harness", "bare", "lm_eval")
    for r in range(args.repeats):  # interleaved, the order rotating each repeat
        for which in contenders[r % 3:] + contenders[: r % 3]:
            t0 = time.perf_counter()
            if which == "harness":
                harness(lm, task, docs)
            elif which == "bare":
                bare_loop(lm, texts, args.tokens)
            else:
                lm_eval.run()
            times[which].append(time.perf_counter() - t0)
    lm_eval_times = times["lm_eval"]
    h, b, e = median(times["harness"]), median(times["bare"]), median(lm_eval_times)
    payload = {
        "model": args.model, "threads": args.threads, "documents": len(docs), "tokens": tokens,
        "repeats": args.repeats,
        "overhead_ratio": h / b, "target_overhead_ratio": 1.05,
        "harness_tokens_per_s": tokens / h, "bare_tokens_per_s": tokens / b, "lm_eval_tokens_per_s": tokens / e,
        "throughput_ratio_vs_lm_eval": (tokens / h) / (tokens / e),
        "seconds": times,
        "nll_sum": {"harness": nll_h, "bare": nll_b, "relative_difference": abs(nll_h - nll_b) / abs(nll_b)},
        "lm_eval_bits_per_byte": bpb,
        "notes": "all three contenders interleaved in each repeat (rotating order), medians reported; lm-eval "
                 "seconds are whole simple_evaluate calls (task building, dataset loading from its cache, requests) "
                 "on the same loaded model object; a warm-up call before the repeats builds the dataset cache.",
    }
    path = write_result("harness_overhead", payload, args.out)
    print(f"overhead_ratio {h / b:.3f} (harness {h:.2f} s, bare {b:.2f} s median of {args.repeats}); "
          f"throughput_ratio_vs_lm_eval {payload['throughput_ratio_vs_lm_eval']:.2f} (lm-eval {e:.2f} s); "
          f"NLL rel. diff {payload['nll_sum']['relative_difference']:.2e}; wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
