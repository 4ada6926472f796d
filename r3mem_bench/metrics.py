"""QA metrics with SQuAD-style normalisation: exact match, token F1, answer containment, retrieval recall.

Normalisation follows the official SQuAD v1.1 evaluation script (lower-case, drop punctuation and the articles
a/an/the, collapse white space; punctuation is deleted, not replaced by a space, so "U.S." matches "US") with
one deliberate extension: punctuation is ASCII ``string.punctuation`` plus any Unicode punctuation character
(category P*), so curly quotes and dashes do not break matches. Text is NFKC-normalised first.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter

_ASCII_PUNCT = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", flags=re.UNICODE)
ABSTAIN_PHRASES = ("not mentioned", "no information", "not available", "unanswerable", "cannot be answered",
                   "can't be answered", "unknown", "i don't know", "i do not know", "not specified", "no answer")


def _is_punct(ch: str) -> bool:
    """ASCII ``string.punctuation`` (what the SQuAD script deletes) or any Unicode punctuation (category P*)."""
    return ch in _ASCII_PUNCT or unicodedata.category(ch).startswith("P")


def normalize_answer(text: str) -> str:
    """Lower-case, delete punctuation (ASCII and Unicode), drop articles, collapse white space."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(ch for ch in text if not _is_punct(ch))
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> float:
    """1.0 when the normalised strings are equal."""
    return float(normalize_answer(prediction) == normalize_answer(gold))


def token_f1(prediction: str, gold: str) -> float:
    """Token-level F1 between normalised prediction and gold (SQuAD definition)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred or not ref:
        return float(pred == ref)
    common = Counter(pred) & Counter(ref)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def contains(prediction: str, gold: str) -> float:
    """1.0 when the normalised gold answer appears in the normalised prediction."""
    g = normalize_answer(gold)
    return float(bool(g) and f" {g} " in f" {normalize_answer(prediction)} ")


def best_over(metric, prediction: str, golds: list[str]) -> float:
    """The best score of ``metric`` over all gold answers (0 when there are none)."""
    return max((metric(prediction, g) for g in golds), default=0.0)


def retrieval_recall(retrieved: list[str], gold: list[str]) -> float | None:
    """Share of gold evidence ids among the retrieved ids (None when there is no gold evidence)."""
    if not gold:
        return None
    got = set(retrieved)
    return sum(1 for g in set(gold) if g in got) / len(set(gold))


def is_abstention(prediction: str) -> bool:
    """Whether an answer declines to answer (for unanswerable / adversarial questions)."""
    p = normalize_answer(prediction)
    return any(normalize_answer(ph) in p for ph in ABSTAIN_PHRASES) if p else True
