"""QA metrics: exact match, token F1, answer containment, retrieval recall, with two answer normalisations.

* ``official`` (the QA families' default, task param ``normalization``): exactly the official SQuAD v1.1
  evaluation script (evaluate-v1.1.py): lower-case, delete ASCII ``string.punctuation``, replace the articles
  a/an/the by a space, collapse white space; F1 over the token multisets (``Counter``), 0 when nothing is shared
  (so two answers that both normalise to nothing score 0); EM and F1 are maxima over the gold answers. The script
  prints 100 x the mean; the families report the mean in [0, 1]. Functions: :func:`normalize_official`,
  :func:`exact_match_official`, :func:`f1_official`.
* ``extended``: the same steps after NFKC normalisation, deleting any Unicode punctuation (category P*) as well,
  so curly quotes and dashes do not break matches; F1 of two empty answers is 1. Functions:
  :func:`normalize_answer`, :func:`exact_match`, :func:`token_f1` (also used for abstention detection and
  TriviaQA evidence labels).

:func:`squad_scorers` returns the (EM, F1, containment) functions of a normalisation by name.
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
    """Extended normalisation: NFKC, lower-case, delete punctuation (ASCII and Unicode), drop articles, collapse
    white space, repeated until nothing changes (deleting a character can let NFKC compose its neighbours, as in
    ``"c:\u0327"``), so normalising a normalised answer changes nothing."""
    for _ in range(8):
        once = _normalize_step(text)
        if once == text:
            break
        text = once
    return text


def _normalize_step(text: str) -> str:
    """One pass of :func:`normalize_answer`."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(ch for ch in text if not _is_punct(ch))
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def normalize_official(s: str) -> str:
    """The official SQuAD v1.1 ``normalize_answer``: lower, remove ASCII punctuation, articles, extra white space."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _ASCII_PUNCT)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match_official(prediction: str, gold: str) -> float:
    """Official SQuAD v1.1 ``exact_match_score``."""
    return float(normalize_official(prediction) == normalize_official(gold))


def overlap_f1(pred: list[str], ref: list[str]) -> float:
    """Token F1 of two token lists: harmonic mean of the shared-token precision and recall (0 when none shared)."""
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def f1_official(prediction: str, gold: str) -> float:
    """Official SQuAD v1.1 ``f1_score`` (0 when no token is shared, even if both are empty)."""
    return overlap_f1(normalize_official(prediction).split(), normalize_official(gold).split())


def contains_official(prediction: str, gold: str) -> float:
    """1.0 when the officially normalised gold answer appears in the officially normalised prediction."""
    g = normalize_official(gold)
    return float(bool(g) and f" {g} " in f" {normalize_official(prediction)} ")


NORMALIZATIONS = ("official", "extended")


def squad_scorers(normalization: str = "official"):
    """(exact match, token F1, containment) functions of ``normalization`` (``official`` or ``extended``)."""
    if normalization == "official":
        return exact_match_official, f1_official, contains_official
    if normalization == "extended":
        return exact_match, token_f1, contains
    raise ValueError(f"unknown normalization {normalization!r}; use one of {NORMALIZATIONS}")


def exact_match(prediction: str, gold: str) -> float:
    """1.0 when the extended-normalised strings are equal."""
    return float(normalize_answer(prediction) == normalize_answer(gold))


def token_f1(prediction: str, gold: str) -> float:
    """Token-level F1 between extended-normalised prediction and gold (1.0 when both are empty)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred or not ref:
        return float(pred == ref)
    return overlap_f1(pred, ref)


def contains(prediction: str, gold: str) -> float:
    """1.0 when the extended-normalised gold answer appears in the extended-normalised prediction."""
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
