"""Uncertainty for the report: bootstrap 95% intervals and paired tests between methods, from per-example rows.

Every metric the report tests is a ratio of sums over resampling units, ``transform(sum(num) / sum(den))``:

* LM (``ppl``, ``ppl_after_first``, ``bits_per_byte``): a unit is a document (or one of its segments), ``num``
  its NLL sum in nats (bits for bits per byte) and ``den`` its token (byte) count; perplexity takes ``exp``. This
  is the corpus-level definition the LM family aggregates with (never a mean of per-document perplexities).
* QA (``em``, ``f1``, ``contains``, ``recall``, ``f1/<category>`` ...): a unit is a question, ``num`` its score
  and ``den`` 1, so the statistic is the mean.

Resampling uses ``scipy.stats.bootstrap`` (percentile method, paired over ``num``/``den``) and the paired test
``scipy.stats.permutation_test`` with ``permutation_type="samples"`` (swaps the two methods' values within each
shared unit: a sign-flip test), both with a seeded generator so reports are byte-identical when regenerated.
When a cell has several seeds, each unit's values are averaged over the seeds that share it.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
from scipy import stats as sstats

LN2 = math.log(2.0)
LM_RATIO_METRICS = ("ppl", "ppl_after_first", "bits_per_byte", "ppl_beyond_16", "ppl_beyond_64")
QA_SCORE_METRICS = ("em", "f1", "contains", "recall", "abstention", "abstention_acc", "answer_nll", "choice_acc")


@dataclass
class Sample:
    """Per-unit numerators and denominators of one metric of one cell; the metric is ``transform(Σnum / Σden)``."""

    ids: list[str]
    num: np.ndarray
    den: np.ndarray
    log_scale: bool = False  # perplexity: exp of the ratio

    def value(self) -> float:
        """The metric on all units."""
        return _finish(float(self.num.sum()) / float(self.den.sum()), self.log_scale) if self.den.sum() else math.nan


def _finish(ratio, log_scale: bool):
    return np.exp(ratio) if log_scale else ratio


def supports(family: str, metric: str) -> bool:
    """Whether ``metric`` of ``family`` can be resampled (quality metrics with per-example rows)."""
    if family == "lm":
        return metric in LM_RATIO_METRICS
    return metric.split("/", 1)[0] in QA_SCORE_METRICS


def lm_units(rows: Iterable[dict], metric: str, warmup: int = 0, unit: str = "document") -> Sample:
    """Units of an LM metric: per document or per segment, over the segments the metric scores."""
    beyond = metric.removeprefix("ppl_beyond_") if metric.startswith("ppl_beyond_") else None
    start = max(1, warmup) if metric == "ppl_after_first" or beyond else warmup
    ids, num, den = [], [], []
    for r in rows:
        if beyond is not None:  # tokens at in-segment offsets >= W (rows without the tail sums have no units)
            if beyond not in (r.get("segment_tail_tokens") or {}):
                continue
            nll, den_src = r["segment_tail_nll_sum"][beyond][start:], r["segment_tail_tokens"][beyond][start:]
        else:
            nll = r["segment_nll_sum"][start:]
            den_src = r["segment_bytes"][start:] if metric == "bits_per_byte" else r["segment_tokens"][start:]
        scale = 1 / LN2 if metric == "bits_per_byte" else 1.0
        if unit == "segment":
            for i, (s, d) in enumerate(zip(nll, den_src), start):
                ids.append(f"{r['id']}#{i}")
                num.append(s * scale)
                den.append(d)
        elif den_src:
            ids.append(r["id"])
            num.append(sum(nll) * scale)
            den.append(sum(den_src))
    return Sample(ids, np.asarray(num, float), np.asarray(den, float), log_scale=metric != "bits_per_byte")


def qa_units(rows: Iterable[dict], metric: str) -> Sample:
    """Units of a QA metric: one per question that has it; ``f1/<cat>`` keeps that category's questions."""
    name, _, category = metric.partition("/")
    ids, num = [], []
    for r in rows:
        if category and r.get("category") != category:
            continue
        v = r["metrics"].get(name)
        if v is not None:
            ids.append(r["id"])
            num.append(float(v))
    return Sample(ids, np.asarray(num, float), np.ones(len(num)))


def units(family: str, rows: list[dict], metric: str, params: dict, unit: str = "auto") -> Sample:
    """The resampling units of ``metric`` for one cell's rows (see :func:`lm_units`, :func:`qa_units`)."""
    if family == "lm":
        if unit == "auto":
            unit = "document" if len(rows) >= 10 else "segment"
        return lm_units(rows, metric, int(params.get("warmup_segments", 0) or 0), unit)
    return qa_units(rows, metric)


def merge_seeds(samples: list[Sample]) -> Sample:
    """Average each unit over the seeds that have it (units missing from some seed are dropped)."""
    if len(samples) == 1:
        return samples[0]
    shared = set(samples[0].ids).intersection(*(s.ids for s in samples[1:]))
    order = [i for i in samples[0].ids if i in shared]
    num = np.mean([_pick(s, order, "num") for s in samples], axis=0)
    den = np.mean([_pick(s, order, "den") for s in samples], axis=0)
    return Sample(order, num, den, samples[0].log_scale)


def _pick(s: Sample, order: list[str], field: str) -> np.ndarray:
    pos = {u: k for k, u in enumerate(s.ids)}
    values = getattr(s, field)
    return np.asarray([values[pos[u]] for u in order], float)


def _ratio_stat(log_scale: bool) -> Callable:
    def stat(num, den, axis=-1):
        with np.errstate(divide="ignore", invalid="ignore"):
            return _finish(np.sum(num, axis=axis) / np.sum(den, axis=axis), log_scale)

    return stat


def bootstrap_ci(sample: Sample, n_resamples: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the metric over units; None with fewer than 2 units."""
    if len(sample.ids) < 2 or not sample.den.sum():
        return None
    if np.all(sample.num == sample.num[0]) and np.all(sample.den == sample.den[0]):
        v = sample.value()
        return (v, v)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = sstats.bootstrap((sample.num, sample.den), _ratio_stat(sample.log_scale), paired=True,
                               vectorized=True, n_resamples=n_resamples, method="percentile",
                               confidence_level=level, rng=np.random.default_rng(seed))
    lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    return None if math.isnan(lo) or math.isnan(hi) else (lo, hi)


@dataclass
class PairedResult:
    """A paired comparison of one metric between a method and the reference method on shared units."""

    n: int
    value: float
    reference: float
    p_value: float


def paired_test(sample: Sample, reference: Sample, n_resamples: int = 1000, seed: int = 0) -> PairedResult | None:
    """Two-sided paired permutation test of ``Σnum/Σden`` (method minus reference) over the units both share.

    Units are matched by id; the denominators of the method are used for both (they are the same token, byte or
    question counts when both ran on the same data). None when fewer than 2 units are shared.
    """
    shared = set(reference.ids)
    order = [u for u in sample.ids if u in shared]
    if len(order) < 2:
        return None
    a, b, den = _pick(sample, order, "num"), _pick(reference, order, "num"), _pick(sample, order, "den")
    total = den.sum()
    value = _finish(a.sum() / total, sample.log_scale)
    ref_value = _finish(b.sum() / total, sample.log_scale)
    if np.allclose(a, b, rtol=0, atol=1e-12):
        return PairedResult(len(order), float(value), float(ref_value), 1.0)

    def diff(x, y, axis=-1):
        return (np.sum(x, axis=axis) - np.sum(y, axis=axis)) / total

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = sstats.permutation_test((a, b), diff, permutation_type="samples", vectorized=True,
                                      n_resamples=n_resamples, rng=np.random.default_rng(seed))
    return PairedResult(len(order), float(value), float(ref_value), float(res.pvalue))


def paired_bootstrap_diff(sample: Sample, reference: Sample, n_resamples: int = 1000, seed: int = 0,
                          level: float = 0.95) -> tuple[float, float, float] | None:
    """Metric(method) - metric(reference) on shared units, with a paired percentile bootstrap interval.

    Units are resampled jointly for both methods (the denominators of the method serve both, as in
    :func:`paired_test`). None when fewer than 2 units are shared.
    """
    shared = set(reference.ids)
    order = [u for u in sample.ids if u in shared]
    if len(order) < 2:
        return None
    a, b, den = _pick(sample, order, "num"), _pick(reference, order, "num"), _pick(sample, order, "den")

    def diff(x, y, d, axis=-1):
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = lambda v: _finish(np.sum(v, axis=axis) / np.sum(d, axis=axis), sample.log_scale)  # noqa: E731
            return ratio(x) - ratio(y)

    value = float(diff(a, b, den))
    if np.allclose(a, b, rtol=0, atol=1e-12):
        return value, value, value
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = sstats.bootstrap((a, b, den), diff, paired=True, vectorized=True, n_resamples=n_resamples,
                               method="percentile", confidence_level=level, rng=np.random.default_rng(seed))
    return value, float(res.confidence_interval.low), float(res.confidence_interval.high)
