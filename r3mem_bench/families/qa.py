"""Shared protocol of the QA families (RAG and dialogue): ingest a corpus or history, then answer questions.

Examples are questions: ``{"id", "question", "answers": [str], "corpus_id", "category" (optional),
"gold_ids": [item ids] (optional evidence), "answerable": bool, "now": float | None}``. The family's loader also
returns the corpora, ``{corpus_id: [MemoryItem, ...]}`` in time order, kept in ``task.data["corpora"]``.
For each corpus the method is reset and ingests it once, then answers that corpus's questions in file order.
Every row carries the prediction, per-question metrics and costs; ``aggregate`` averages them, per category too.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Callable, Iterable

import numpy as np

from r3mem_bench.errors import UserError
from r3mem_bench.families import Family
from r3mem_bench.metrics import best_over, contains, exact_match, is_abstention, retrieval_recall, token_f1

QA_PARAMS = {"max_new_tokens": 32, "prompt_template": "", "closed_book_template": "", "system_prompt": "",
             "top_k": 5, "memory_budget": 0, "max_questions": 0, "seed": 0}


class QAFamily(Family):
    """Base of the RAG and dialogue families."""

    default_params = QA_PARAMS
    row_fields = {"id": "str", "corpus_id": "str", "prediction": "str", "prompt_tokens": "count",
                  "tokens_processed": "count", "answer_s": "num", "ingest_s": "num", "ingest_tokens": "count",
                  "state_bytes": "count", "corpus_tokens": "count", "metrics": "dict[num]"}

    def load(self, task, data: str | None) -> tuple[list[dict], dict]:
        """(questions, corpora) of the task; ``--data`` replaces the dataset file."""
        cfg = dict(task.spec.dataset)
        loader = self.loaders[cfg["loader"]]
        return loader(cfg, data, task.params)

    def examples(self, task, data: str | None = None, tokenizer=None) -> list[dict]:
        """Questions in file order; corpora go to ``task.data``."""
        questions, corpora = self.load(task, data)
        missing = {q["corpus_id"] for q in questions} - set(corpora)
        if missing:
            raise UserError(f"task '{task.name}': questions refer to unknown corpus '{sorted(missing)[0]}'")
        if task.params.get("max_questions"):
            questions = questions[: task.params["max_questions"]]
        if not questions:
            raise UserError(f"task '{task.name}': no questions; fix: check the data file")
        ids = [q["id"] for q in questions]
        if len(set(ids)) != len(ids):
            raise UserError(f"task '{task.name}': duplicate question ids; fix: make ids unique")
        task.data["corpora"] = corpora
        if tokenizer is not None:
            task.data["corpus_tokens"] = {
                cid: sum(len(tokenizer(it.text, add_special_tokens=False)["input_ids"]) for it in items)
                for cid, items in corpora.items()}
        return questions

    def score(self, example: dict, answer) -> dict:
        """Per-question metrics (a family may extend it)."""
        golds = example.get("answers") or []
        out = {"em": best_over(exact_match, answer.text, golds), "f1": best_over(token_f1, answer.text, golds),
               "contains": best_over(contains, answer.text, golds)}
        if example.get("answerable", True) is False:
            abstained = float(is_abstention(answer.text))
            out = {"em": abstained, "f1": abstained, "contains": abstained, "abstention": abstained}
        rec = retrieval_recall(answer.retrieved_ids, example.get("gold_ids") or [])
        if rec is not None:
            out["recall"] = rec
        return out

    def _score(self, example: dict, answer, method) -> dict:
        """``score``, without retrieval recall for methods that do not retrieve (closed book)."""
        metrics = self.score(example, answer)
        if not getattr(method, "retrieves", True):
            metrics.pop("recall", None)
        return metrics

    def evaluate(self, task, method, examples: list[dict], emit: Callable[[dict], None], progress=None) -> None:
        """Per corpus: reset, ingest once, answer its questions; one row per question."""
        groups: OrderedDict[str, list[dict]] = OrderedDict()
        for ex in examples:
            groups.setdefault(ex["corpus_id"], []).append(ex)
        corpora = task.data["corpora"]
        for cid, questions in groups.items():
            method.begin(cid)
            method.reset()
            before = method.tokens_processed
            t0 = time.perf_counter()
            method.ingest(corpora[cid])
            ingest_s = time.perf_counter() - t0
            ingest_tokens = method.tokens_processed - before
            state = method.state_bytes()
            corpus_tokens = task.data.get("corpus_tokens", {}).get(cid, 0)
            for ex in questions:
                method.begin(ex["id"])
                before = method.tokens_processed
                t1 = time.perf_counter()
                ans = method.answer(ex["question"], now=ex.get("now"))
                emit({
                    "id": ex["id"], "corpus_id": cid, "category": ex.get("category"), "question": ex["question"],
                    "answers": ex.get("answers") or [], "prediction": ans.text, "retrieved_ids": ans.retrieved_ids,
                    "prompt_tokens": ans.prompt_tokens, "tokens_processed": method.tokens_processed - before,
                    "answer_s": time.perf_counter() - t1, "ingest_s": ingest_s, "ingest_tokens": ingest_tokens,
                    "state_bytes": state, "corpus_tokens": corpus_tokens,
                    "metrics": self._score(ex, ans, method),
                })
                if progress:
                    progress(ans.prompt_tokens)

    def aggregate(self, rows: Iterable[dict], params: dict) -> dict[str, float]:
        """Means over questions, per category as ``<metric>/<category>``, and cost columns."""
        rows = list(rows)
        out: dict[str, float] = {}
        names = sorted({k for r in rows for k in r["metrics"]})
        for name in names:
            vals = [r["metrics"][name] for r in rows if r["metrics"].get(name) is not None]
            if vals:
                out[name] = float(np.mean(vals))
        cats = sorted({r["category"] for r in rows if r.get("category")})
        for cat in cats:
            sub = [r for r in rows if r.get("category") == cat]
            for name in ("em", "f1"):
                out[f"{name}/{cat}"] = float(np.mean([r["metrics"][name] for r in sub]))
        corpora = {}
        for r in rows:
            corpora[r["corpus_id"]] = r
        out["prompt_tokens"] = float(np.mean([r["prompt_tokens"] for r in rows]))
        out["answer_s"] = float(np.mean([r["answer_s"] for r in rows]))
        out["ingest_s"] = float(np.mean([c["ingest_s"] for c in corpora.values()]))
        out["state_bytes"] = float(np.mean([c["state_bytes"] for c in corpora.values()]))
        ctoks = sum(c["corpus_tokens"] for c in corpora.values())
        if ctoks:
            out["bytes_per_1k_corpus_tokens"] = sum(c["state_bytes"] for c in corpora.values()) / ctoks * 1000
        out["tokens_processed"] = float(np.mean([r["tokens_processed"] + r["ingest_tokens"] / max(1, sum(
            1 for x in rows if x["corpus_id"] == r["corpus_id"])) for r in rows]))
        return out
