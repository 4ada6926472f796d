"""The seeded needle-QA generator: answers live in gold passages, determinism per seed, kinds, corpus size."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from r3mem_bench.errors import UserError
from r3mem_bench.generators.needle import KINDS, generate


@pytest.fixture(scope="module")
def default_data():
    """The default task's data (seed 0, 8 corpora of 12 passages, 4 questions each)."""
    return generate(seed=0)


def test_gold_answer_is_in_a_gold_passage_and_nowhere_else(default_data):
    questions, corpora = default_data
    assert len(questions) == 32 and len(corpora) == 8
    for q in questions:
        items = {it.id: it.text for it in corpora[q["corpus_id"]]}
        (value,) = q["answers"]
        assert re.fullmatch(r"\d{4}", value)
        assert q["gold_ids"] and all(g in items for g in q["gold_ids"])
        holders = [pid for pid, text in items.items() if value in text]
        assert len(holders) == 1 and holders[0] in q["gold_ids"]  # literally present, once, in a gold passage
        assert re.search(rf"The secret code of the [a-z]+ [a-z]+ is {value}\.", items[holders[0]])


def test_kinds_are_what_they_claim(default_data):
    questions, corpora = default_data
    assert Counter(q["category"] for q in questions) == Counter({"single": 11, "multikey": 11, "multihop": 10})
    for q in questions:
        key = re.fullmatch(r"What is the secret code of the (\w+ \w+)\?", q["question"]).group(1)
        text = " ".join(it.text for it in corpora[q["corpus_id"]])
        obj = key.split()[1]
        same_object_facts = re.findall(rf"The secret code of the \w+ {obj} is \d{{4}}\.", text)
        if q["category"] == "multihop":
            assert len(q["gold_ids"]) == 2
            target = re.search(rf"The {key} has the same secret code as the (\w+ \w+)\.", text).group(1)
            assert f"The secret code of the {target} is {q['answers'][0]}." in text
            assert f"The secret code of the {key} is" not in text  # never stated directly
        elif q["category"] == "multikey":
            assert len(same_object_facts) == 3  # the asked fact + 2 near-miss distractors (other colours)
        else:
            assert same_object_facts == [f"The secret code of the {key} is {q['answers'][0]}."]


def test_deterministic_per_seed():
    a_q, a_c = generate(seed=3, n_corpora=2)
    b_q, b_c = generate(seed=3, n_corpora=2)
    assert a_q == b_q
    assert {k: [(i.id, i.text) for i in v] for k, v in a_c.items()} == {k: [(i.id, i.text) for i in v] for k, v in b_c.items()}
    c_q, c_c = generate(seed=4, n_corpora=2)
    assert [q["question"] for q in c_q] != [q["question"] for q in a_q]
    assert [i.text for i in c_c["needle-s4-c000"]] != [i.text for i in a_c["needle-s3-c000"]]


def test_corpus_length_is_the_difficulty_knob(tiny_lm):
    tok = tiny_lm.tokenizer
    _, corpora = generate(seed=0, n_corpora=3)
    sizes = [sum(len(tok(i.text, add_special_tokens=False)["input_ids"]) for i in items) for items in corpora.values()]
    assert all(1500 <= s <= 3000 for s in sizes), sizes  # the default: ~1.5K-3K tokens per corpus
    _, long = generate(seed=0, n_corpora=1, n_passages=48)
    assert len(long["needle-s0-c000"]) == 48
    words = sum(len(i.text.split()) for i in long["needle-s0-c000"])
    assert words >= 48 * 100


def test_single_kind_and_pydoc_filler():
    qs, corpora = generate(seed=1, n_corpora=2, kinds=("single",), filler="pydoc")
    assert {q["category"] for q in qs} == {"single"}
    assert all(q["answers"][0] in next(i.text for i in corpora[q["corpus_id"]] if i.id == q["gold_ids"][0]) for q in qs)


@pytest.mark.parametrize("kwargs, msg", [
    ({"kinds": ("single", "riddle")}, "unknown kind"),
    ({"n_passages": 1}, "n_passages=1"),
    ({"questions_per_corpus": 20}, "questions per corpus"),
    ({"filler": "nope"}, "needle filler"),
])
def test_bad_parameters_are_user_errors(kwargs, msg):
    with pytest.raises(UserError, match=msg):
        generate(**{"n_corpora": 1, **kwargs})
