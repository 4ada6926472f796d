"""Bootstrap intervals and paired tests of r3mem_bench.stats on synthetic rows with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from r3mem_bench import stats
from r3mem_bench.families.lm import LMFamily


def _lm_rows(n_docs: int, shift: float = 0.0, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for d in range(n_docs):
        toks = [64, 64, 32]
        nll = [float(t * (3.0 + shift + rng.normal(0, 0.2))) for t in toks]
        rows.append({"id": f"doc{d}", "segment_nll_sum": nll, "segment_tokens": toks, "segment_bytes": [250, 260, 120],
                     "tokens_processed": sum(toks), "state_bytes_peak": 0, "seconds_per_segment": 0.0})
    return rows


def _qa_rows(values: list[float], category: str | None = None) -> list[dict]:
    return [{"id": f"q{i}", "category": category, "metrics": {"f1": v}} for i, v in enumerate(values)]


def test_lm_units_reproduce_the_family_aggregate():
    rows = _lm_rows(12)
    agg = LMFamily().aggregate(rows, {"warmup_segments": 0})
    for metric in ("ppl", "ppl_after_first", "bits_per_byte"):
        for unit in ("document", "segment"):
            assert stats.units("lm", rows, metric, {}, unit).value() == pytest.approx(agg[metric], rel=1e-12)


def test_bootstrap_interval_is_seeded_and_brackets_the_value():
    sample = stats.units("lm", _lm_rows(20), "ppl", {}, "document")
    a = stats.bootstrap_ci(sample, 500, seed=3)
    assert a == stats.bootstrap_ci(sample, 500, seed=3)
    assert a != stats.bootstrap_ci(sample, 500, seed=4)
    assert a[0] < sample.value() < a[1]
    assert stats.bootstrap_ci(stats.units("lm", _lm_rows(1), "ppl", {}, "document")) is None


def test_bootstrap_interval_narrows_with_more_examples():
    small = stats.bootstrap_ci(stats.qa_units(_qa_rows([0.0, 1.0] * 5), "f1"), 1000, 0)
    large = stats.bootstrap_ci(stats.qa_units(_qa_rows([0.0, 1.0] * 200), "f1"), 1000, 0)
    assert (large[1] - large[0]) < (small[1] - small[0]) / 3


def test_paired_test_detects_a_consistent_shift_and_not_noise():
    base = stats.units("lm", _lm_rows(30, seed=1), "ppl", {}, "document")
    worse = stats.units("lm", _lm_rows(30, shift=0.3, seed=1), "ppl", {}, "document")
    res = stats.paired_test(worse, base, 2000, 0)
    assert res.n == 30 and res.p_value < 0.01 and res.value > res.reference
    noise = stats.units("lm", _lm_rows(30, seed=2), "ppl", {}, "document")
    assert stats.paired_test(noise, base, 2000, 0).p_value > 0.05
    assert stats.paired_test(base, base, 2000, 0).p_value == 1.0


def test_paired_test_uses_only_shared_examples():
    a = stats.qa_units(_qa_rows([1.0, 1.0, 1.0, 0.0]), "f1")
    b = stats.qa_units(_qa_rows([0.0, 0.0]), "f1")
    res = stats.paired_test(a, b, 100, 0)
    assert res.n == 2 and res.value == 1.0 and res.reference == 0.0


def test_category_units_and_seed_merging():
    rows = _qa_rows([1.0, 0.0], "temporal") + [{"id": "x", "category": "other", "metrics": {"f1": 0.5}}]
    assert stats.qa_units(rows, "f1/temporal").ids == ["q0", "q1"]
    s0, s1 = stats.qa_units(_qa_rows([1.0, 0.0, 1.0]), "f1"), stats.qa_units(_qa_rows([0.0, 0.0]), "f1")
    merged = stats.merge_seeds([s0, s1])
    assert merged.ids == ["q0", "q1"] and list(merged.num) == [0.5, 0.0]
    assert math.isclose(merged.value(), 0.25)


def test_paired_bootstrap_difference_excludes_zero_only_for_a_real_shift():
    base = stats.units("lm", _lm_rows(30, seed=1), "ppl_after_first", {}, "document")
    better = stats.units("lm", _lm_rows(30, shift=-0.2, seed=1), "ppl_after_first", {}, "document")
    diff, lo, hi = stats.paired_bootstrap_diff(better, base, 2000, 0)
    assert diff == pytest.approx(better.value() - base.value()) and lo <= diff <= hi < 0
    noise = stats.units("lm", _lm_rows(30, seed=2), "ppl_after_first", {}, "document")
    _, lo, hi = stats.paired_bootstrap_diff(noise, base, 2000, 0)
    assert lo < 0 < hi
    assert stats.paired_bootstrap_diff(base, base) == (0.0, 0.0, 0.0)
    assert stats.paired_bootstrap_diff(better, stats.units("lm", _lm_rows(1), "ppl", {}, "document")) is None
