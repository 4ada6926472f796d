"""Shared protocol of the QA families (RAG and dialogue): ingest a corpus or history, then answer questions.

Examples are questions: ``{"id", "question", "answers": [str], "corpus_id", "category" (optional),
"gold_ids": [item ids] (optional evidence), "answerable": bool, "now": float | None}``. The family's loader also
returns the corpora, ``{corpus_id: [MemoryItem, ...]}`` in time order, kept in ``task.data["corpora"]``.
For each corpus the method is reset and ingests it once, then answers that corpus's questions in time order
(``asking_order``: by ``now``, file order among equal times; undated questions first), so a method whose recall
changes its memory (MemoryBank's strength update) carries each question's update into the next. A resumed run
gets only the unanswered questions; before each one, a method with a ``replay(question, now)`` hook replays the
corpus's earlier questions that were answered in a previous run (``task.data["questions"]`` keeps every question
in asking order), so its numbers equal an uninterrupted run's.
Every row carries the prediction, per-question metrics and costs; ``aggregate`` averages them, per category too.
Retrieval ``recall`` is reported only for methods that retrieve item ids (``reports_recall``).

Per-question metrics, under the task params ``generate`` (default true), ``likelihood`` (default true) and
``normalization`` (``official``, default, or ``extended``; see :mod:`r3mem_bench.metrics`):

* with generation: ``em``, ``f1``, ``contains`` of the generated answer, max over the gold answers (SQuAD
  v1.1); an unanswerable question scores 1 on all three (and ``abstention``) when the answer abstains;
* with likelihood (``MemoryMethod.answer_nll``, one prompt forward pass per question): ``answer_nll``, the mean
  per-token NLL (nats) of the *first* gold answer after the method's prompt (lower is better; the first gold
  rather than the min over golds, so the number does not improve with the count of aliases), and, for questions
  whose data carry ``candidates`` (gold plus same-kind distractors, fixed by the data generator and copied into
  the row with their NLLs as ``candidate_nll``), ``choice_acc``: 1 when the first gold answer's mean per-token
  NLL is strictly below every other candidate's, else 0 (ties count as wrong). Unanswerable questions have
  neither; nor does a method without a likelihood path (one that overrides ``answer`` only);
* ``recall`` of the gold evidence ids among the ids the method put in its prompt.

``generate: false`` skips generation (prediction ``""``, no EM/F1): the row's prompt tokens, retrieved ids and
``answer_s`` then come from the likelihood pass, and ``tokens_processed`` counts the prompt it read.
``generate_questions: N`` (N > 0) generates only for the first N questions of the task in asking order (the same
questions for every method, and on resume) and scores the likelihood of all of them, so a suite can rank methods
by answer likelihood on hundreds of questions while generating for a subset its time budget allows; the report
states each metric's n.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from typing import Callable, Iterable

import numpy as np

from r3mem_bench.errors import UserError
from r3mem_bench.families.base import Family
from r3mem_bench.method import Answer, MemoryMethod
from r3mem_bench.metrics import NORMALIZATIONS, best_over, is_abstention, retrieval_recall, squad_scorers

QA_PARAMS = {"max_new_tokens": 32, "prompt_template": "", "closed_book_template": "", "system_prompt": "",
             "memory_budget": 0, "max_questions": 0, "seed": 0, "generate": True, "likelihood": True,
             "normalization": "official", "generate_questions": 0}


def asking_order(questions: list[dict]) -> list[dict]:
    """Each corpus's questions sorted by ``now`` (stable; undated first), in the list positions they held."""
    slots: dict[str, list[int]] = {}
    for i, q in enumerate(questions):
        slots.setdefault(q["corpus_id"], []).append(i)
    out = list(questions)
    for idx in slots.values():
        ordered = sorted((questions[i] for i in idx),
                         key=lambda q: -math.inf if q.get("now") is None else float(q["now"]))
        for i, q in zip(idx, ordered):
            out[i] = q
    return out


def reports_recall(method) -> bool:
    """Whether retrieval recall applies to ``method``: its ``retrieves`` flag when it sets one, else whether it
    implements ``retrieve`` (a method that answers from an internal state, such as RMT, names no item ids)."""
    flag = getattr(method, "retrieves", None)
    if flag is not None:
        return bool(flag)
    return getattr(type(method), "retrieve", MemoryMethod.retrieve) is not MemoryMethod.retrieve


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
        """Questions in asking order (``asking_order``), also kept as ``task.data["questions"]``; corpora go to
        ``task.data``."""
        questions, corpora = self.load(task, data)
        questions = asking_order(questions)
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
        self._check_scoring_params(task)
        for q in questions:
            cands = q.get("candidates")
            if cands is not None and not (isinstance(cands, list) and len(set(cands)) == len(cands) >= 2
                                          and all(isinstance(c, str) and c for c in cands)
                                          and (q.get("answers") or [None])[0] in cands):
                raise UserError(f"task '{task.name}': question '{q['id']}' field 'candidates' must list at least 2 "
                                "distinct non-empty strings including its first answer; fix the data")
        task.data["corpora"] = corpora
        task.data["questions"] = questions
        if tokenizer is not None:
            task.data["corpus_tokens"] = {
                cid: sum(len(tokenizer(it.text, add_special_tokens=False)["input_ids"]) for it in items)
                for cid, items in corpora.items()}
        return questions

    @staticmethod
    def _check_scoring_params(task) -> None:
        """``normalization`` is known, something is scored, and a judge has generated answers to judge."""
        p = task.params
        if p.get("normalization", "official") not in NORMALIZATIONS:
            raise UserError(f"task '{task.name}': parameter 'normalization' = {p['normalization']!r} is unknown; "
                            f"fix: use one of {list(NORMALIZATIONS)}")
        if not p.get("generate", True) and not p.get("likelihood", True):
            raise UserError(f"task '{task.name}': parameters 'generate' and 'likelihood' are both false, so nothing "
                            "is scored; fix: set one of them to true")
        if int(p.get("generate_questions") or 0) < 0:
            raise UserError(f"task '{task.name}': parameter 'generate_questions' must be >= 0 (0: every question); "
                            "fix: give a count such as 32")
        if p.get("generate_questions") and not p.get("likelihood", True):
            raise UserError(f"task '{task.name}': 'generate_questions' scores the other questions by likelihood only, "
                            "but 'likelihood' is false; fix: set likelihood: true or drop generate_questions")
        if p.get("judge") and not p.get("generate", True):
            raise UserError(f"task '{task.name}': parameter 'judge' needs generated answers but 'generate' is false; "
                            "fix: set generate: true or leave judge empty")

    def score(self, example: dict, answer, normalization: str = "official") -> dict:
        """Per-question metrics of a generated answer (a family may extend it)."""
        em, f1, has = squad_scorers(normalization)
        golds = example.get("answers") or []
        out = {"em": best_over(em, answer.text, golds), "f1": best_over(f1, answer.text, golds),
               "contains": best_over(has, answer.text, golds)}
        if example.get("answerable", True) is False:
            abstained = float(is_abstention(answer.text))
            out = {"em": abstained, "f1": abstained, "contains": abstained, "abstention": abstained}
        rec = retrieval_recall(answer.retrieved_ids, example.get("gold_ids") or [])
        if rec is not None:
            out["recall"] = rec
        return out

    def _score(self, example: dict, answer, method, params: dict | None = None, generated: bool = True) -> dict:
        """``score`` (only retrieval recall when nothing was generated), without retrieval recall for methods that
        do not retrieve (``reports_recall``)."""
        if generated:
            metrics = self.score(example, answer, normalization=(params or {}).get("normalization") or "official")
        else:
            rec = retrieval_recall(answer.retrieved_ids, example.get("gold_ids") or [])
            metrics = {} if rec is None else {"recall": rec}
        if not reports_recall(method):
            metrics.pop("recall", None)
        return metrics

    @staticmethod
    def _likelihood(example: dict, method, answer: Answer | None) -> tuple[dict, dict, object]:
        """(metrics, extra row fields, AnswerNLL or None) of the answer-likelihood pass for one question."""
        golds = example.get("answers") or []
        scorable = bool(golds) and example.get("answerable", True) is not False
        cands = list(example.get("candidates") or []) if scorable else []
        texts = ([golds[0]] + [c for c in cands if c != golds[0]]) if scorable else []
        lik = method.answer_nll(example["question"], texts, now=example.get("now"), given=answer)
        if lik is None or not texts or lik.nll[0] != lik.nll[0]:  # no likelihood path, nothing to score, nan
            return {}, {}, lik
        metrics = {"answer_nll": lik.nll[0]}
        extra = {"answer_nll_tokens": lik.tokens[0]}
        if cands:
            by_text = dict(zip(texts, lik.nll))
            metrics["choice_acc"] = float(all(lik.nll[0] < v for v in lik.nll[1:]))
            extra.update(candidates=cands, candidate_nll=[by_text[c] for c in cands])
        return metrics, extra, lik

    @staticmethod
    def ingest_corpora(task, examples: list[dict]) -> list:
        """The item lists ``evaluate`` will ingest for these examples, one per corpus, in order."""
        corpora = task.data["corpora"]
        return [corpora[cid] for cid in dict.fromkeys(ex["corpus_id"] for ex in asking_order(examples))]

    def evaluate(self, task, method, examples: list[dict], emit: Callable[[dict], None], progress=None) -> None:
        """Per corpus: reset, ingest once, answer its questions; one row per question (replays: module docstring)."""
        groups: OrderedDict[str, list[dict]] = OrderedDict()
        for ex in asking_order(examples):
            groups.setdefault(ex["corpus_id"], []).append(ex)
        corpora = task.data["corpora"]
        replay = getattr(method, "replay", None)
        todo = {ex["id"] for ex in examples}
        generate, likelihood = task.params.get("generate", True), task.params.get("likelihood", True)
        n_gen = int(task.params.get("generate_questions") or 0)
        generated = ({q["id"] for q in task.data.get("questions", examples)[:n_gen]} if generate and n_gen > 0
                     else None)  # None: every question generates (when ``generate``)
        batch = max(1, int(getattr(method.generator, "batch_size", 1) or 1)) if method.shared_prompt_answers() else 1
        pending: list[dict] = []  # questions retrieved, waiting for their batch's generation

        def finish(p: dict) -> None:
            """Likelihood pass and row of one question whose answer (if any) is generated."""
            ex, ans = p["ex"], p["answer"]
            method.begin(ex["id"])
            before = method.tokens_processed
            lik_metrics, lik_extra, lik = {}, {}, None
            if likelihood and not p["likelihood_done"]:
                t2 = time.perf_counter()
                lik_metrics, lik_extra, lik = self._likelihood(ex, method, ans)
                lik_extra["likelihood_s"] = time.perf_counter() - t2
            elif p["likelihood_done"]:
                lik_metrics, lik_extra, lik = p["likelihood"]
            tokens = p["tokens"] + method.tokens_processed - before
            answer_s = p["answer_s"]
            if ans is None:
                if lik is None:
                    raise UserError(f"method '{method.name}' has no answer-likelihood path (it answers through "
                                    "its own `answer`); fix: set the task parameter generate: true")
                ans = Answer("", lik.retrieved_ids, lik.prompt_tokens, lik.context)
                answer_s = lik_extra["likelihood_s"]
            emit({
                "id": ex["id"], "corpus_id": ex["corpus_id"], "category": ex.get("category"),
                "question": ex["question"], "answers": ex.get("answers") or [], "prediction": ans.text,
                "retrieved_ids": ans.retrieved_ids, "prompt_tokens": ans.prompt_tokens, "tokens_processed": tokens,
                "answer_s": answer_s, **p["corpus"], **lik_extra,
                "metrics": {**self._score(ex, ans, method, task.params, p["generate"]), **lik_metrics},
            })
            if progress:
                progress(ans.prompt_tokens)

        def flush() -> None:
            """Generate the pending questions' answers in one batch, then finish them in asking order."""
            waiting = [p for p in pending if p["batched"]]
            if waiting:
                t = time.perf_counter()
                answers = method.generate_answers([(p["ex"]["question"], p["context"], p["ids"]) for p in waiting])
                share = (time.perf_counter() - t) / len(waiting)  # a batch's time, split evenly
                for p, ans in zip(waiting, answers):
                    p["answer"] = ans
                    p["answer_s"] += share
                    p["tokens"] += ans.prompt_tokens + ans.new_tokens
            for p in pending:
                finish(p)
            pending.clear()

        for cid, questions in groups.items():
            asked = [q for q in task.data.get("questions", ()) if q["corpus_id"] == cid] if replay else []
            position = {q["id"]: i for i, q in enumerate(asked)}
            replayed = 0  # asked[:replayed] are behind us
            method.begin(cid)
            method.reset()
            before = method.tokens_processed
            t0 = time.perf_counter()
            method.ingest(corpora[cid])
            corpus = {"ingest_s": time.perf_counter() - t0, "ingest_tokens": method.tokens_processed - before,
                      "state_bytes": method.state_bytes(),
                      "corpus_tokens": task.data.get("corpus_tokens", {}).get(cid, 0)}
            for ex in questions:
                if ex["id"] in position:
                    for q in asked[replayed: position[ex["id"]]]:  # answered by an earlier run: redo its recall
                        if q["id"] not in todo:
                            method.begin(q["id"])
                            replay(q["question"], now=q.get("now"))
                    replayed = max(replayed, position[ex["id"]] + 1)
                # in asking order: everything that reads or changes the memory (recall, the likelihood pass of
                # a question that is not generated); generation itself waits for the batch
                method.begin(ex["id"])
                before = method.tokens_processed
                t1 = time.perf_counter()
                gen_this = generate and (generated is None or ex["id"] in generated)
                p = {"ex": ex, "corpus": corpus, "generate": gen_this, "answer": None, "batched": False,
                     "likelihood_done": False}
                if gen_this and batch > 1:
                    p["context"], p["ids"] = method.retrieve(ex["question"], now=ex.get("now"))
                    p["batched"] = True
                elif gen_this:
                    p["answer"] = method.answer(ex["question"], now=ex.get("now"))
                elif likelihood:
                    p["likelihood"] = self._likelihood(ex, method, None)
                    p["likelihood"][1]["likelihood_s"] = time.perf_counter() - t1
                    p["likelihood_done"] = True
                p["answer_s"] = time.perf_counter() - t1 if gen_this else 0.0
                p["tokens"] = method.tokens_processed - before
                pending.append(p)
                if len(pending) >= batch:
                    flush()
        flush()

    def aggregate(self, rows: Iterable[dict], params: dict) -> dict[str, float]:
        """Means over the questions that have each metric, per category as ``<metric>/<category>`` (EM, F1,
        answer NLL, choice accuracy), and cost columns."""
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
            for name in ("em", "f1", "answer_nll", "choice_acc"):
                vals = [r["metrics"][name] for r in sub if r["metrics"].get(name) is not None]
                if vals:
                    out[f"{name}/{cat}"] = float(np.mean(vals))
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
