"""QA metrics against hand-computed cases (SQuAD normalisation, unicode, articles, punctuation) and properties."""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from r3mem_bench.metrics import (
    best_over,
    contains,
    exact_match,
    is_abstention,
    normalize_answer,
    retrieval_recall,
    token_f1,
)


@pytest.mark.parametrize("text, expected", [
    ("The Denver Broncos", "denver broncos"),           # article and case
    ("  a  Tale of Two   Cities. ", "tale of two cities"),  # leading article, spaces, final period
    ("An apple, the pear and a plum!", "apple pear and plum"),
    ("theory of everything", "theory of everything"),   # 'the' inside a word stays
    ("U.S.", "us"),                                     # punctuation deleted, as in the SQuAD script
    ("Levi's Stadium", "levis stadium"),
    ("“Curly” — quotes…", "curly quotes"),              # Unicode quotes, em dash, ellipsis (NFKC: '...')
    ("24–10", "2410"),                                  # en dash is punctuation, deleted like '-' would be
    ("$5 + 3%", "5 3"),                                 # ASCII string.punctuation symbols ($, +, %) deleted
    ("ÉCOLE Normale", "école normale"),                 # non-ASCII letters kept, lower-cased
    ("ﬁnal ﬂag", "final flag"),                         # NFKC ligatures
    ("Ｆｕｌｌｗｉｄｔｈ", "fullwidth"),                     # NFKC full-width forms
    ("", ""),
    ("the a an", ""),
])
def test_normalize_hand_cases(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match_and_f1_hand_cases():
    assert exact_match("The Denver Broncos!", "denver broncos") == 1.0
    assert exact_match("Denver", "Denver Broncos") == 0.0
    # pred tokens [denver, broncos, won], gold [denver, broncos]: P = 2/3, R = 1, F1 = 0.8
    assert token_f1("the Denver Broncos won", "Denver Broncos") == pytest.approx(0.8)
    # repeated tokens count per occurrence: pred [x, x, y] vs gold [x, y, y]: common = {x: 1, y: 1}, P = R = 2/3
    assert token_f1("x x y", "x y y") == pytest.approx(2 / 3)
    assert token_f1("Paris", "London") == 0.0
    assert token_f1("", "") == 1.0          # both normalise to nothing (SQuAD convention)
    assert token_f1("the", "Paris") == 0.0  # prediction is only an article
    assert token_f1("“Zürich”", "zürich") == 1.0


def test_contains_respects_token_boundaries():
    assert contains("The code is 4821.", "4821") == 1.0
    assert contains("The code is 48210.", "4821") == 0.0
    assert contains("It was the Denver Broncos, of course", "Denver Broncos") == 1.0
    assert contains("anything", "the") == 0.0  # a gold that normalises to nothing never matches


def test_best_over_and_recall():
    golds = ["Vistula River", "Vistula"]
    assert best_over(exact_match, "the vistula", golds) == 1.0
    assert best_over(token_f1, "river", golds) == pytest.approx(2 / 3)  # P = 1, R = 1/2 against 'Vistula River'
    assert best_over(exact_match, "x", []) == 0.0
    assert retrieval_recall(["a", "b", "c"], ["b", "d"]) == 0.5
    assert retrieval_recall(["a"], ["a", "a"]) == 1.0
    assert retrieval_recall([], ["a"]) == 0.0
    assert retrieval_recall(["a"], []) is None


def test_abstention():
    assert is_abstention("That is not mentioned in the conversation.")
    assert is_abstention("")
    assert not is_abstention("Paris")


@settings(max_examples=300, deadline=None)
@given(st.text())
@example("C:\u0327")  # deleting ':' lets NFKC compose c + cedilla on a second pass
def test_normalize_is_idempotent(text):
    once = normalize_answer(text)
    assert normalize_answer(once) == once


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(codec="ascii")))
def test_normalize_ignores_case(text):
    assert normalize_answer(text.upper()) == normalize_answer(text.lower()) == normalize_answer(text)


@settings(max_examples=200, deadline=None)
@given(st.text(), st.text())
def test_metric_ranges_and_self_match(pred, gold):
    for metric in (exact_match, token_f1, contains):
        assert 0.0 <= metric(pred, gold) <= 1.0
    if normalize_answer(gold):
        assert exact_match(gold, gold) == token_f1(gold, gold) == contains(gold, gold) == 1.0
