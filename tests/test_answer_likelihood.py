"""Answer likelihood of QA methods (``answer_nll``), candidate choice accuracy (``choice_acc``), ``generate: false``.

Expected NLLs are computed here by hand: the prompt string is written out (system text, template, chat
template), the answer tokenised, and the model run once over prompt + answer without a cache.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from r3mem_bench.errors import UserError
from r3mem_bench.families import get_family
from r3mem_bench.backends import make_generator
from r3mem_bench.generation import make_prompt
from r3mem_bench.method import Answer, AnswerNLL, MemoryItem, MemoryMethod
from r3mem_bench.methods import get_method_class
from r3mem_bench.report import metric_direction
from r3mem_bench.task import TaskRegistry

SYSTEM = "Answer the question with a short phrase, using the context when it helps."
ITEMS = [MemoryItem("p0", "Zorblat is a small fishing town on the northern coast. The mayor of Zorblat is Henrietta Quill."),
         MemoryItem("p1", "The secret code of the amber lantern is 7351."),
         MemoryItem("p2", "The river Quenby flows through the valley of Durnhold and ends in Lake Osterwick.")]
QUESTIONS = [("Who is the mayor of Zorblat?", "Henrietta Quill"),
             ("What is the secret code of the amber lantern?", "7351"),
             ("Which lake does the river Quenby end in?", "Lake Osterwick")]


def _methods(lm, max_new_tokens: int = 4):
    params = {"max_new_tokens": max_new_tokens}
    gen, prompt = make_generator(lm, params), make_prompt(params)
    out = {}
    for name in ("full_context", "no_memory"):
        m = get_method_class(name)(lm, {}, generator=gen, prompt=prompt)
        m.ingest(ITEMS)
        out[name] = m
    return out


def _chat_ids(tok, user: str) -> list[int]:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]
    return tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
               add_special_tokens=False)["input_ids"]


@torch.no_grad()
def _hand_nll(model, prompt_embeds: torch.Tensor, answer_embeds: torch.Tensor, answer_ids: list[int]) -> float:
    """Mean NLL of ``answer_ids`` from one cache-free forward pass over prompt + answer embeddings."""
    logits = model(inputs_embeds=torch.cat([prompt_embeds, answer_embeds], dim=1)).logits[0].float()
    p = prompt_embeds.shape[1]
    logp = torch.log_softmax(logits[p - 1: p - 1 + len(answer_ids)], dim=-1)
    return float(-logp[torch.arange(len(answer_ids)), torch.tensor(answer_ids)].mean())


def _hand_prompt_nll(lm, user: str, answer: str) -> float:
    tok, emb = lm.tokenizer, lm.model.get_input_embeddings()
    prompt = torch.tensor([_chat_ids(tok, user)])
    ans = tok(answer, add_special_tokens=False)["input_ids"]
    return _hand_nll(lm.model, emb(prompt), emb(torch.tensor([ans])), ans)


def test_prompt_path_equals_hand_computation_and_follows_the_context(tiny_lm):
    m = _methods(tiny_lm)
    context = "\n".join(it.text for it in ITEMS)
    q, gold = QUESTIONS[0]
    fc = m["full_context"].answer_nll(q, [gold, "Tobias Fenn"])
    nm = m["no_memory"].answer_nll(q, [gold])
    want_fc = _hand_prompt_nll(tiny_lm, f"Context:\n{context}\n\nQuestion: {q}\nAnswer:", gold)
    want_other = _hand_prompt_nll(tiny_lm, f"Context:\n{context}\n\nQuestion: {q}\nAnswer:", "Tobias Fenn")
    want_nm = _hand_prompt_nll(tiny_lm, f"Question: {q}\nAnswer:", gold)
    assert fc.nll[0] == pytest.approx(want_fc, abs=1e-4) and fc.nll[1] == pytest.approx(want_other, abs=1e-4)
    assert nm.nll[0] == pytest.approx(want_nm, abs=1e-4)
    assert abs(fc.nll[0] - nm.nll[0]) > 1e-3  # the context changes the likelihood
    assert fc.tokens == [len(tiny_lm.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in (gold, "Tobias Fenn")]
    assert fc.retrieved_ids == ["p0", "p1", "p2"] and nm.retrieved_ids == []
    # the context of a generated answer is reused (no second retrieval, no second count of the prompt)
    method = m["full_context"]
    ans = method.answer(q)
    before = method.tokens_processed
    again = method.answer_nll(q, [gold], given=ans)
    assert method.tokens_processed == before and again.nll[0] == pytest.approx(want_fc, abs=1e-4)
    assert method.answer_nll(q, [gold]).prompt_tokens == method.tokens_processed - before  # counted without `given`


def test_rmt_scores_after_its_memory_prefixed_prompt(tiny_lm):
    params = {"max_new_tokens": 4}
    rmt = get_method_class("rmt")(tiny_lm, {"untrained": True, "num_mem_tokens": 4, "segment_len": 32},
                                  generator=make_generator(tiny_lm, params), prompt=make_prompt(params))
    rmt.ingest(ITEMS)
    q, gold = QUESTIONS[1]
    tok = tiny_lm.tokenizer
    ids = torch.tensor([_chat_ids(tok, f"Question: {q}\nAnswer:")])  # the closed-book template
    ans = tok(gold, add_special_tokens=False)["input_ids"]

    def hand(memory):
        emb = rmt.body.get_input_embeddings()
        p = emb(ids)
        return _hand_nll(rmt.body, torch.cat([p[:, :1], memory, p[:, 1:]], dim=1), emb(torch.tensor([ans])), ans)

    got = rmt.answer_nll(q, [gold])
    assert got.nll[0] == pytest.approx(hand(rmt.state), abs=1e-4) and got.prompt_tokens == ids.shape[1] + 4
    rmt.reset()
    fresh = rmt.answer_nll(q, [gold])
    assert fresh.nll[0] == pytest.approx(hand(rmt.initial_memory(1)), abs=1e-4)
    assert abs(fresh.nll[0] - got.nll[0]) > 1e-4  # the carried memory changes the likelihood


class _Stub(MemoryMethod):
    """Answers 'x'; its answer likelihood follows a rule: ``forced`` (gold lowest), ``wrong`` or ``tied``."""

    name = "likelihood_stub"
    retrieves = True

    def __init__(self, lm, rule: str, gold_of: dict[str, str], generate_ok: bool = True):
        super().__init__(lm)
        self.rule, self.gold_of, self.generate_ok = rule, gold_of, generate_ok

    def ingest(self, items):
        self.ids = [it.id for it in items]

    def answer(self, question, now=None):
        assert self.generate_ok, "answer() called with generate: false"
        return Answer("x", self.ids[:1], prompt_tokens=3)

    def answer_nll(self, question, texts, now=None, given=None):
        gold = self.gold_of[question]
        if self.rule == "forced":
            nll = [0.5 if t == gold else 2.0 for t in texts]
        elif self.rule == "wrong":
            wrong = next(t for t in texts if t != gold)
            nll = [0.1 if t == wrong else 1.0 for t in texts]
        else:
            nll = [1.0 for _ in texts]
        return AnswerNLL(nll, [4] * len(texts), 11, self.ids[:2], "ctx")


def _needle(tiny_lm, **params):
    (task,) = TaskRegistry().resolve("needle", {"n_corpora": 2, **params})
    fam = get_family("rag")
    return task, fam, fam.examples(task, None, tiny_lm.tokenizer)


def test_needle_candidates_are_the_codes_planted_in_the_corpus(tiny_lm):
    task, _, examples = _needle(tiny_lm)
    for ex in examples:
        corpus = " ".join(it.text for it in task.data["corpora"][ex["corpus_id"]])
        planted = set(re.findall(r"The secret code of the [a-z]+ [a-z]+ is (\d{4})\.", corpus))
        assert set(ex["candidates"]) == planted and ex["answers"][0] in planted and len(planted) >= 4
        assert ex["candidates"] == sorted(ex["candidates"])
    again = _needle(tiny_lm)[2]
    assert [e["candidates"] for e in again] == [e["candidates"] for e in examples]  # deterministic


def test_persona_candidates_hold_gold_and_stale_values(tiny_lm):
    (task,) = TaskRegistry().resolve("persona", {"conversations": 3})
    examples = get_family("dialogue").examples(task, None, tiny_lm.tokenizer)
    for ex in examples:
        if not ex["answerable"]:
            assert "candidates" not in ex
            continue
        cands = ex["candidates"]
        assert ex["answers"][0] in cands and set(ex.get("stale") or []) <= set(cands)
        assert len(set(cands)) == len(cands) >= 4 and cands == sorted(cands)


@pytest.mark.parametrize("rule, expected", [("forced", 1.0), ("wrong", 0.0), ("tied", 0.0)])
def test_choice_acc_follows_the_gold_rank(tiny_lm, rule, expected):
    task, fam, examples = _needle(tiny_lm)
    gold_of = {ex["question"]: ex["answers"][0] for ex in examples}
    rows = []
    fam.evaluate(task, _Stub(tiny_lm, rule, gold_of), examples, rows.append)
    assert len(rows) == len(examples)
    for r, ex in zip(sorted(rows, key=lambda r: r["id"]), sorted(examples, key=lambda e: e["id"])):
        assert r["metrics"]["choice_acc"] == expected and r["candidates"] == ex["candidates"]
        if rule == "forced":
            assert r["metrics"]["answer_nll"] == 0.5
            assert r["candidate_nll"] == [0.5 if c == ex["answers"][0] else 2.0 for c in ex["candidates"]]
    agg = fam.aggregate(rows, task.params)
    assert agg["choice_acc"] == expected and agg["choice_acc/multikey"] == expected


def test_generate_false_scores_likelihood_only(tiny_lm):
    task, fam, examples = _needle(tiny_lm, generate=False)
    gold_of = {ex["question"]: ex["answers"][0] for ex in examples}
    rows = []
    fam.evaluate(task, _Stub(tiny_lm, "forced", gold_of, generate_ok=False), examples, rows.append)
    for r in rows:
        assert r["prediction"] == "" and r["prompt_tokens"] == 11
        assert set(r["metrics"]) == {"answer_nll", "choice_acc", "recall"}
    agg = fam.aggregate(rows, task.params)
    assert agg["choice_acc"] == 1.0 and "em" not in agg and "contains/single" not in agg

    class _AnswerOnly(MemoryMethod):  # no likelihood path: refused when generation is off
        name = "answer_only"

        def ingest(self, items):
            pass

        def answer(self, question, now=None):
            return Answer("x")

    with pytest.raises(UserError, match="generate: true"):
        fam.evaluate(task, _AnswerOnly(tiny_lm), examples, rows.append)


def test_generate_questions_generates_for_the_first_k_and_scores_likelihood_for_all(tiny_lm):
    task, fam, examples = _needle(tiny_lm, generate_questions=2)
    gold_of = {ex["question"]: ex["answers"][0] for ex in examples}
    rows = []
    stub = _Stub(tiny_lm, "forced", gold_of)
    asked = []
    stub.answer = lambda question, now=None: asked.append(question) or Answer("x", stub.ids[:1], prompt_tokens=3)
    fam.evaluate(task, stub, examples, rows.append)
    first = [ex["question"] for ex in task.data["questions"][:2]]
    assert asked == first and len(rows) == len(examples) > 2
    assert [r["question"] for r in rows if "em" in r["metrics"]] == first
    assert all("answer_nll" in r["metrics"] for r in rows)
    assert [r["prediction"] for r in rows].count("x") == 2
    resumed = []  # a resumed run (the first question done) still generates for the second only
    asked.clear()
    fam.evaluate(task, stub, examples[1:], resumed.append)
    assert asked == first[1:]


def test_bad_scoring_params_are_one_line_errors(tiny_lm):
    for params, needle in (({"normalization": "nfkc"}, "normalization"), ({"generate": False, "likelihood": False},
                                                                          "both false"),
                           ({"generate_questions": -1}, "generate_questions"),
                           ({"generate_questions": 4, "likelihood": False}, "generate_questions")):
        (task,) = TaskRegistry().resolve("needle", {"n_corpora": 1, **params})
        with pytest.raises(UserError, match=needle):
            get_family("rag").examples(task, None, tiny_lm.tokenizer)


def test_cli_generate_false_with_real_methods(cli, tmp_path):
    out = tmp_path / "runs"
    proc = cli("run", "--task", "needle", "--method", "no_memory,full_context", "--model", "tiny-random", "--limit", "3",
               "--param", "n_corpora=1", "--param", "generate=false", "--threads", "1", "--output", str(out), "-q")
    assert proc.returncode == 0, proc.stderr
    for method in ("no_memory", "full_context"):
        rows = [json.loads(x) for x in (out / "needle" / method / "results.jsonl").read_text().splitlines()]
        assert all(r["prediction"] == "" and r["metrics"]["answer_nll"] > 0 and "em" not in r["metrics"] for r in rows)
        assert all(len(r["candidate_nll"]) == len(r["candidates"]) for r in rows)
        assert all(r["tokens_processed"] == r["prompt_tokens"] for r in rows)  # the prompt it read, nothing generated
    bad = cli("run", "--task", "needle", "--method", "no_memory", "--model", "tiny-random", "--param", "normalization=x",
              "--output", str(tmp_path / "bad"))
    assert bad.returncode == 2 and "normalization" in bad.stderr + bad.stdout


def test_directions_and_regress_tolerance():
    from r3mem_bench.regress import checked_metrics, compare

    assert metric_direction("answer_nll") == "lower" and metric_direction("answer_nll/single") == "lower"
    assert metric_direction("choice_acc") == "higher" and metric_direction("choice_acc/temporal") == "higher"
    entry = {"model": "m", "task": "needle", "family": "rag", "method": "x",
             "metrics": {"answer_nll": {"value": 2.0}, "choice_acc": {"value": 0.5}}}
    assert checked_metrics(entry, None) == ["answer_nll", "choice_acc"]
    worse = [{**entry, "metrics": {"answer_nll": {"value": 2.1}, "choice_acc": {"value": 0.5}}}]
    better = [{**entry, "metrics": {"answer_nll": {"value": 1.5}, "choice_acc": {"value": 0.5}}}]
    ref = {"cells": [entry]}
    verdict = lambda cur, tol: {c.metric: c.verdict for c in compare(ref, cur, tol, None, False)}["answer_nll"]  # noqa: E731
    assert verdict(worse, {}) == "REGRESSION"  # higher NLL is worse
    assert verdict(worse, {"answer_nll": {"rel": 0.1}}) == "ok"  # 5% worse, inside a 10% tolerance
    assert verdict(better, {"answer_nll": {"abs": 0.01}}) == "improved"


@pytest.mark.slow
def test_smollm2_gold_passage_makes_the_gold_answer_likelier():
    from r3mem_bench.models import load_model

    lm = load_model("smollm2-135m", device="cpu")
    m = _methods(lm)
    for q, gold in QUESTIONS:
        with_passage = m["full_context"].answer_nll(q, [gold]).nll[0]
        closed_book = m["no_memory"].answer_nll(q, [gold]).nll[0]
        assert with_passage < closed_book - 1.0, (q, with_passage, closed_book)


def test_task_yaml_keys_and_params_that_nothing_reads_are_refused(tmp_path):
    (tmp_path / "t.yaml").write_text("task: my_needle\nfamily: rag\ndataset: {loader: needle}\nmetrics: [f1]\n")
    with pytest.raises(UserError, match="metrics"):
        TaskRegistry(include_paths=[str(tmp_path)]).resolve("my_needle")
    with pytest.raises(UserError, match="unknown parameter 'top_k'"):  # retrieval depth is a method option
        TaskRegistry().resolve("needle", {"top_k": 3})


@torch.no_grad()
def _separate_nll(model, prompt: list[int], cont: list[int]) -> float:
    """Mean NLL of ``cont`` from one cache-free pass over prompt + continuation."""
    logits = model(input_ids=torch.tensor([prompt + cont])).logits[0].float()
    logp = torch.log_softmax(logits[len(prompt) - 1: len(prompt) - 1 + len(cont)], dim=-1)
    return float(-logp[torch.arange(len(cont)), torch.tensor(cont)].mean())


def test_packed_continuations_and_reused_prompt_blocks_score_as_separate_passes(tiny_lm, monkeypatch):
    from r3mem_bench.generation import PromptCache, continuation_nll

    monkeypatch.setattr(PromptCache, "block", 8)
    model = tiny_lm.model
    prompt = [(17 * i) % 900 + 50 for i in range(29)]  # 3 whole blocks of 8 and a partial one
    conts = [[5, 6, 7, 8], [9], [], [10, 11, 12, 13, 14, 15], [9, 4]]
    plain = continuation_nll(model, conts, prompt_ids=prompt)
    assert [n for _, n in plain] == [4, 1, 0, 6, 2]
    assert plain[2][0] != plain[2][0]  # the empty continuation: nan
    for (nll, _), cont in zip(plain, conts):
        if cont:
            assert nll == pytest.approx(_separate_nll(model, prompt, cont), abs=1e-5)

    cache = PromptCache()
    other = prompt[:20] + [3, 3, 3]  # shares 20 tokens: two whole blocks
    continuation_nll(model, conts, prompt_ids=other, prompt_cache=cache)
    assert cache.reusable(prompt) == 16
    reused = continuation_nll(model, conts, prompt_ids=prompt, prompt_cache=cache)
    assert [r for r in reused if r[1]] == [p for p in plain if p[1]]  # bit-identical, not just close
    assert cache.ids == prompt
    assert cache.reusable(prompt) == 24  # the block holding the last token is always read again
    assert cache.reusable(prompt[:5]) == 0


def test_continuations_after_a_key_value_prompt_score_as_separate_passes(tiny_lm):
    from r3mem_bench.r3mem.layout import continuation_nll_after, kv_pass

    model = tiny_lm.model
    embed, head = model.get_input_embeddings(), model.lm_head
    decoder = model.model

    def step(past, x, pos):
        return kv_pass(decoder, past, x, pos)

    prompt = [(13 * i) % 700 + 40 for i in range(11)]
    with torch.no_grad():
        hidden, past = step(None, embed(torch.tensor([prompt])), 0)
        last = head(hidden[:, -1])
        conts = [[5, 6, 7], [], [9], [10, 11, 12, 13, 14]]
        scored = continuation_nll_after(step, embed, head, past, last, len(prompt), conts)
    assert [n for _, n in scored] == [3, 0, 1, 5]
    for (nll, _), cont in zip(scored, conts):
        if cont:
            assert nll == pytest.approx(_separate_nll(model, prompt, cont), abs=1e-5)
