"""MemoryBank: forgetting curve values, recall update, seeded forgetting, recall@k, JSON round trip, QA protocol."""

from __future__ import annotations

import json
import math

import pytest
from fixtures.baselines.helpers import dialogue_fixture, qa_parts, retrieval_fixture, run_qa

from r3mem_bench.baselines.memorybank import DAY, day_of, retention
from r3mem_bench.errors import UserError
from r3mem_bench.methods import get_method_class


def make(lm, **opts):
    return get_method_class("memorybank")(lm, {"summaries": "off", **opts}, **qa_parts(lm))


def test_forgetting_curve_values():
    assert retention(0, 1) == 1.0
    assert retention(1, 1) == pytest.approx(math.exp(-1))
    assert retention(1, 1) == pytest.approx(0.36787944117144233)
    assert retention(2, 4) == pytest.approx(0.6065306597126334)  # exp(-1/2)
    assert retention(3, 2, "official") == pytest.approx(0.30119421191220214)  # exp(-3 * 2 / 5)
    assert retention(5, 1, "official") == retention(1, 1, "paper")
    assert retention(10, 1, "none") == 1.0
    assert retention(-3, 1) == 1.0  # a memory from the future is not decayed
    assert retention(1, 2) > retention(1, 1)  # paper: stronger memories fade slower
    assert retention(1, 2, "official") < retention(1, 1, "official")  # the official formula's precedence
    with pytest.raises(UserError):
        retention(1, 1, "weibull")
    assert day_of(1683504000) == "2023-05-08"


def test_recall_strengthens_and_resets_time(tiny_lm):
    items, _ = dialogue_fixture()
    m = make(tiny_lm)
    m.begin("conv")
    m.reset()
    m.ingest(items)
    now = items[-1].timestamp + 2 * DAY
    m.recall(["d1:1"], now)
    mem = {x["id"]: x for x in m.bank["memories"]}
    assert mem["d1:1"]["strength"] == 2.0 and mem["d1:1"]["last_recall"] == now
    assert mem["d2:1"]["strength"] == 1.0 and mem["d2:1"]["last_recall"] == items[2].timestamp
    context, ids = m.retrieve("What is the name of Ana's cat?", now=now)
    assert "d1:1" in ids and "Miso" in context and "2023-05-08" in context
    assert {x["id"]: x for x in m.bank["memories"]}["d1:1"]["strength"] == 3.0


def _forgotten(lm, seed: int, now_days: float = 3.0) -> list[str]:
    items, _ = dialogue_fixture()
    m = make(lm)
    m.seed = seed
    m.begin("conv")
    m.reset()
    m.ingest(items)
    return m.forget(items[-1].timestamp + now_days * DAY)


def test_seeded_forgetting_is_reproducible(tiny_lm):
    runs = {seed: _forgotten(tiny_lm, seed) for seed in range(6)}
    assert _forgotten(tiny_lm, 3) == runs[3]
    assert len({tuple(v) for v in runs.values()}) > 1  # the seed matters
    assert all(v for v in runs.values())  # after 3+ days with S = 1 something is forgotten
    assert _forgotten(tiny_lm, 0, now_days=-10) == []  # before the memories were learned: R = 1


def test_forgetting_once_per_day_and_static_corpus_never_forgets(tiny_lm):
    items, questions = dialogue_fixture()
    m = make(tiny_lm, forgetting="paper")
    rows = run_qa(m, items, [{**q, "now": items[-1].timestamp + 30 * DAY} for q in questions])
    gone = [x for x in m.bank["memories"] if x["forgotten"]]
    assert gone and m.bank["last_forget_day"] == int((items[-1].timestamp + 30 * DAY) // DAY)
    assert all(set(r["retrieved_ids"]).isdisjoint({g["id"] for g in gone}) for r in rows)
    passages, pq = retrieval_fixture()
    static = make(tiny_lm)
    run_qa(static, passages, [{**q, "now": 1e10} for q in pq])
    assert not any(x["forgotten"] for x in static.bank["memories"])


def test_recall_at_k_on_the_handmade_corpus(tiny_lm):
    items, questions = retrieval_fixture()
    rows = run_qa(make(tiny_lm, top_k=1), items, questions)
    assert [r["metrics"]["recall"] for r in rows] == [1.0] * len(questions)


def test_summaries_are_written_and_counted(tiny_lm, tmp_path):
    items, questions = dialogue_fixture()
    m = get_method_class("memorybank")(tiny_lm, {"summary_tokens": 3}, **qa_parts(tiny_lm))
    rows = run_qa(m, items, questions[:1])
    assert sorted(m.bank["days"]) == ["2023-05-08", "2023-05-11", "2023-05-14"]
    assert all({"summary", "personality"} <= set(e) for e in m.bank["days"].values())
    assert rows[0]["ingest_tokens"] > 0  # 3 days x 2 prompts + 2 overall prompts, with outputs
    assert rows[0]["state_bytes"] > len(json.dumps(m.bank)) - 64


def test_save_load_round_trip(tiny_lm, tmp_path):
    items, questions = dialogue_fixture()
    m = make(tiny_lm)
    m.begin("conv")
    m.reset()
    m.ingest(items)
    m.recall(["d2:1"], items[-1].timestamp)
    m.forget(items[-1].timestamp + 1 * DAY)
    path = tmp_path / "bank.json"
    m.save(path)
    other = make(tiny_lm)
    other.load(path)
    assert other.bank == m.bank and [d["id"] for d in other.docs] == [d["id"] for d in m.docs]
    q = questions[1]["question"]
    assert other.retrieve(q) == m.retrieve(q)
    path.write_text("[1, 2]")
    with pytest.raises(UserError):
        other.load(path)


def test_bad_forgetting_option(tiny_lm):
    with pytest.raises(UserError):
        make(tiny_lm, forgetting="sometimes")


@pytest.mark.parametrize("widen, expected", [(0, ["d1:1"]), (100, ["d1:1"]), (200, ["d1:1", "d1:2"]),
                                             (5000, ["d1:1", "d1:2"])])
def test_hits_widen_with_same_day_neighbours_within_the_budget(tiny_lm, widen, expected):
    """Official widening: the hit's same-date neighbours join while the text fits in ``widen_chars`` characters
    (hit and neighbour here are 80 and 90 characters with their date prefix); other days never join."""
    items, _ = dialogue_fixture()
    m = make(tiny_lm, top_k=1, widen_chars=widen)
    m.begin("conv")
    m.reset()
    m.ingest(items)
    context, ids = m.retrieve("What is the name of Ana's cat?", now=None)
    assert ids == expected
    assert ("lovely name" in context) == ("d1:2" in expected)
    strength = {x["id"]: x["strength"] for x in m.bank["memories"]}
    assert [i for i, s in strength.items() if s > 1] == expected  # every retrieved memory is recalled
    with pytest.raises(UserError, match="widen_chars"):
        make(tiny_lm, widen_chars=-1)
