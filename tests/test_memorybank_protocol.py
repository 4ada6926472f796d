"""MemoryBank's protocol: forgetting in the official time unit, recall strengthening before the next question,
the no-forgetting control, the summary and portrait in the prompt, time-ordered questions and exact resumption."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
from fixtures.baselines.helpers import dialogue_fixture, qa_parts

from r3mem_bench.baselines.memorybank import DAY, MemoryBank
from r3mem_bench.errors import UserError
from r3mem_bench.families.qa import QAFamily
from r3mem_bench.methods import get_method_class


class FixedDraws:
    """Stands in for the forgetting pass's generator: hands out the given u values in order."""

    def __init__(self, values):
        self.values = list(values)

    def random(self):
        return self.values.pop(0)


def make(lm, name: str = "memorybank", **opts):
    return get_method_class(name)(lm, {"summaries": "off", **opts}, **qa_parts(lm))


def ingested(lm, name: str = "memorybank", **opts):
    items, _ = dialogue_fixture()
    m = make(lm, name, **opts)
    m.begin("conv")
    m.reset()
    m.ingest(items)
    return m, items


def evaluate(method, items, questions, all_questions=None) -> list[dict]:
    """The QA protocol on one corpus; ``all_questions`` (asking order) enables the replay of answered ones."""
    data = {"corpora": {"conv": items}}
    if all_questions is not None:
        data["questions"] = all_questions
    rows: list[dict] = []
    QAFamily().evaluate(SimpleNamespace(data=data, params={}), method, questions, rows.append)
    return rows


def dated_questions(items, days=(1, 2, 3)):
    """The fixture's three questions, asked 1, 2, 3 days after the last session (one forgetting pass each)."""
    _, questions = dialogue_fixture()
    last = items[-1].timestamp
    return [{**q, "now": last + d * DAY} for q, d in zip(questions, days)]


# ---- (a) forgetting in the official unit removes exactly what the formula says ------------------------------
@pytest.mark.parametrize("forgetting, unit, draws", [
    ("official", None, [0.2, 0.3, 0.4, 0.5, 0.8, 0.85]),
    ("paper", 7.0, [0.3, 0.4, 0.5, 0.6, 0.85, 0.9]),
])
def test_forgetting_removes_what_the_formula_says(tiny_lm, forgetting, unit, draws):
    opts = {"forgetting": forgetting} if unit is None else {"forgetting": forgetting, "time_unit_days": unit}
    m, items = ingested(tiny_lm, **opts)
    now = items[-1].timestamp + DAY
    m.draws = lambda _now: FixedDraws(draws)
    gone = m.forget(now)
    expected = []
    for item, u in zip(items, draws):  # by hand: t in days (the official unit) or weeks, S = 1
        t = (now - item.timestamp) / 86400.0 / (unit or 1.0)
        r = math.exp(-t * 1.0 / 5) if forgetting == "official" else math.exp(-t / 1.0)
        if u > r:
            expected.append(item.id)
    assert gone == expected == ["d1:2", "d2:2", "d3:2"]  # the draws straddle each session's retention
    assert [x["id"] for x in m.bank["memories"] if x["forgotten"]] == expected
    assert {d["id"] for d in m.docs} == {"d1:1", "d2:1", "d3:1"}  # forgotten items leave the index


def test_time_unit_is_the_official_day_and_validated(tiny_lm):
    m = make(tiny_lm)
    assert m.time_unit_days == 1.0 and m.config()["time_unit_days"] == 1.0 and m.config()["forgetting"] == "paper"
    for bad in ("0", "-2", "week", "nan"):
        with pytest.raises(UserError, match="time_unit_days"):
            make(tiny_lm, time_unit_days=bad)


# ---- (b) a recall strengthens a memory before the next question's forgetting pass ----------------------------
def test_recall_updates_strength_before_the_next_question(tiny_lm):
    m = make(tiny_lm, top_k=1)
    items, qs = dialogue_fixture()
    last = items[-1].timestamp
    q1 = {**qs[2], "id": "q1", "now": last + DAY}  # "Where is Ana's sister moving?" -> d3:1
    q2 = {**qs[0], "id": "q2", "now": last + 2 * DAY}
    seen, passes = [], [[0.0] * 6, [0.5] * 6]  # pass 1 forgets nothing; pass 2 forgets where R < 0.5
    original = m.forget

    def spy(now):
        seen.append({x["id"]: (x["strength"], x["last_recall"]) for x in m.bank["memories"]})
        values = passes[len(seen) - 1]
        m.draws = lambda _now: FixedDraws(values)
        return original(now)

    m.forget = spy
    rows = evaluate(m, items, [q2, q1])  # given out of order: asked in time order
    assert [r["id"] for r in rows] == ["q1", "q2"] and len(seen) == 2
    assert rows[0]["retrieved_ids"] == ["d3:1"]
    assert seen[1]["d3:1"] == (2.0, q1["now"])  # recalled by q1: S = 2, last recall = q1's time
    assert seen[1]["d3:2"] == (1.0, items[5].timestamp)
    # by hand at q2 (u = 0.5): d3:1 has t = 1 day, S = 2 -> R = exp(-1/2) = 0.61, kept; d3:2 has t = 2 days,
    # S = 1 -> R = exp(-2) = 0.14, forgotten (without q1's recall d3:1 would have had R = exp(-2) too)
    gone = sorted(i for i, (s, lr) in seen[1].items() if 0.5 > math.exp(-((q2["now"] - lr) / 86400.0) / s))
    assert "d3:1" not in gone and "d3:2" in gone
    assert sorted(x["id"] for x in m.bank["memories"] if x["forgotten"]) == gone
    assert rows[1]["retrieved_ids"] == ["d3:1"]  # the one memory left


# ---- (c) the no-forgetting control ----------------------------------------------------------------------------
def test_noforget_keeps_every_session(tiny_lm):
    items, _ = dialogue_fixture()
    late = dated_questions(items, days=(30, 31, 32))
    control = make(tiny_lm, "memorybank_noforget", forgetting="paper")
    rows = evaluate(control, items, late)
    assert not any(x["forgotten"] for x in control.bank["memories"])
    assert {d["id"] for d in control.docs} == {it.id for it in items}
    assert [r["metrics"]["recall"] for r in rows] == [1.0, 1.0, 1.0]  # each day's evidence is still found
    assert control.config()["forgetting"] == "none" and control.config()["name"] == "memorybank_noforget"
    forgetful = make(tiny_lm)
    evaluate(forgetful, items, late)
    assert all(x["forgotten"] for x in forgetful.bank["memories"])  # exp(-30) after a month at S = 1
    cls = get_method_class("memorybank_noforget")
    assert issubclass(cls, MemoryBank) and cls.ingest is MemoryBank.ingest and set(cls.families) == {"rag", "dialogue"}


def test_noforget_is_listed_for_dialogue_and_rag(cli):
    proc = cli("list")
    assert proc.returncode == 0, proc.stderr
    line = next(x for x in proc.stdout.splitlines() if x.strip().startswith("memorybank_noforget "))
    assert "rag" in line and "dialogue" in line


# ---- (d) the overall summary and the user portrait reach the prompt -------------------------------------------
@pytest.mark.parametrize("name", ["memorybank", "memorybank_noforget"])
def test_summary_and_portrait_reach_the_prompt(tiny_lm, name):
    items, questions = dialogue_fixture()
    m = get_method_class(name)(tiny_lm, {}, **qa_parts(tiny_lm))
    written = []

    def summarise(prompt: str) -> str:  # the summariser stubbed: one marker per official prompt
        marker = ("PORTRAIT-MARK" if "general summary of the user's personality" in prompt
                  else "HISTORY-MARK" if "highly concise summary of the following event" in prompt
                  else "PERSON-MARK" if "personality traits and emotions, and devise" in prompt else "DAY-MARK")
        written.append(marker)
        return marker

    m._summarize = summarise
    prompts = []
    generate = m.generator.generate
    m.generator.generate = lambda batch: (prompts.extend(batch), generate(batch))[1]
    rows = evaluate(m, items, [{**questions[0], "now": items[-1].timestamp + DAY}])
    assert written == ["DAY-MARK", "PERSON-MARK"] * 3 + ["HISTORY-MARK", "PORTRAIT-MARK"]
    assert m.bank["overall_history"] == "HISTORY-MARK" and m.bank["overall_personality"] == "PORTRAIT-MARK"
    context, _ = m.retrieve(questions[0]["question"], now=items[-1].timestamp + DAY)
    assert "Summary of past events: HISTORY-MARK" in context
    assert "User portrait and response strategy: PORTRAIT-MARK" in context
    assert len(prompts) == 1 and "HISTORY-MARK" in prompts[0] and "PORTRAIT-MARK" in prompts[0]
    assert rows[0]["prompt_tokens"] > 0


# ---- resumption: replaying answered questions gives the uninterrupted numbers ----------------------------------
def test_resumed_protocol_replays_recalls(tiny_lm):
    items, _ = dialogue_fixture()
    questions = dated_questions(items)
    opts = {"time_unit_days": 4.0, "top_k": 2}
    whole = make(tiny_lm, **opts)
    full = evaluate(whole, items, questions, questions)
    first = evaluate(make(tiny_lm, **opts), items, questions[:1], questions)
    resumed = make(tiny_lm, **opts)
    rest = evaluate(resumed, items, questions[1:], questions)
    keys = ("id", "prediction", "retrieved_ids", "metrics")
    assert [{k: r[k] for k in keys} for r in first + rest] == [{k: r[k] for k in keys} for r in full]
    assert resumed.bank == whole.bank
    blind = make(tiny_lm, **opts)
    evaluate(blind, items, questions[1:])  # no question list: nothing to replay
    assert blind.bank != whole.bank  # q1's recall is missing: the replay is what makes the banks equal


def test_runner_resume_equals_uninterrupted_run(tmp_path):
    from r3mem_bench.runner import RunConfig, run

    def cfg(out, limit):
        return RunConfig(tasks=["persona"], methods=["memorybank"], model="tiny-random", limit=limit,
                         output=str(out), overrides={"conversations": 1, "max_new_tokens": 4},
                         method_options={"summaries": "off", "time_unit_days": 30}, threads=1, quiet=True)

    def rows(out):
        path = out / "persona" / "memorybank" / "results.jsonl"
        keep = ("id", "prediction", "retrieved_ids", "metrics")
        return [{k: json.loads(line)[k] for k in keep} for line in path.read_text().splitlines()]

    # a 30-day unit keeps memories alive across the one-a-day questions, so recalls change later forgetting passes
    # (without the replay of the first 2 questions, the resumed rows differ)
    run(cfg(tmp_path / "a", 2))
    run(cfg(tmp_path / "a", 5))  # resumes: 2 rows done, 3 to go
    run(cfg(tmp_path / "b", 5))
    assert rows(tmp_path / "a") == rows(tmp_path / "b") and len(rows(tmp_path / "b")) == 5
