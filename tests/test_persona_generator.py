"""The seeded persona conversation generator: determinism, sizes, and gold answers supported by their evidence."""

from __future__ import annotations

import re
from dataclasses import asdict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from r3mem_bench.errors import UserError
from r3mem_bench.generators.persona import CATEGORIES, CITIES, JOBS, Conversation, generate, generate_conversation


def _session(dia_id: str) -> int:
    return int(dia_id[1:].split(":")[0])


def _check_supported(conv: Conversation) -> None:
    """Every question's gold answer is stated in its evidence; knowledge updates have an older stale value."""
    user_turns = [t for s in conv.sessions for t in s.turns if t.speaker == conv.user]
    for q in conv.questions:
        if q.category == "adversarial":
            assert not q.answerable and q.evidence == []
            attribute = "my cat" if "cat" in q.question else "i drive"
            assert all(attribute not in t.text.lower() for t in user_turns), q.question
            continue
        assert q.answerable and q.evidence
        turns = [conv.turn(d) for d in q.evidence]
        assert all(t.speaker == conv.user for t in turns)
        assert re.search(rf"\b{re.escape(q.answer)}\b", turns[-1].text), (q, turns[-1])
        if q.category == "multi-hop":
            assert len(q.evidence) == 2 and _session(q.evidence[0]) < _session(q.evidence[1])
            name = turns[0].text.rsplit(" ", 1)[1].rstrip(".")
            assert turns[1].text.startswith(name)  # the second fact names the relative of the first
        if q.category == "temporal":
            month = conv.sessions[_session(q.evidence[0]) - 1].date.strftime("%B %Y")
            assert month in q.question
        if q.category == "knowledge-update":
            assert q.stale and len(q.stale) == len(q.stale_evidence)
            for value, where in zip(q.stale, q.stale_evidence):
                assert value != q.answer and value in conv.turn(where).text
                assert _session(where) < _session(q.evidence[0])  # the stale value is older
            pool = CITIES if "city" in q.question else JOBS
            mentions = [t for t in user_turns if any(re.search(rf"\b{v}\b", t.text) for v in q.stale + [q.answer])
                        and any(v in t.text for v in pool)]
            assert mentions[-1].dia_id == q.evidence[0]  # the evidence is the LATEST update


def test_every_category_and_gold_supported_default_size():
    convs = generate(seed=0, conversations=8)
    for conv in convs:
        _check_supported(conv)
    assert {q.category for c in convs for q in c.questions} == set(CATEGORIES)
    # the first conversation alone covers every category (questions are interleaved by category)
    assert {q.category for q in convs[0].questions[:5]} == set(CATEGORIES)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), sessions=st.integers(4, 9), half=st.integers(4, 7))
def test_gold_supported_property(seed, sessions, half):
    _check_supported(generate_conversation(seed, 0, sessions=sessions, turns=2 * half))


def test_deterministic_per_seed_and_index():
    a, b = generate(seed=3, conversations=3), generate(seed=3, conversations=3)
    assert [asdict(c) for c in a] == [asdict(c) for c in b]
    other = generate(seed=4, conversations=3)
    assert [asdict(c) for c in a] != [asdict(c) for c in other]
    # conversation i does not depend on how many are generated
    assert asdict(generate(seed=3, conversations=1)[0]) == asdict(a[0])


def test_sizes_follow_sessions_and_turns():
    conv = generate_conversation(1, 0, sessions=7, turns=10)
    assert len(conv.sessions) == 7 and all(len(s.turns) == 10 for s in conv.sessions)
    ids = [t.dia_id for s in conv.sessions for t in s.turns]
    assert len(set(ids)) == len(ids) and ids[0] == "D1:1" and ids[-1] == "D7:10"
    dates = [s.date for s in conv.sessions]
    assert dates == sorted(dates) and len({d.strftime("%Y-%m") for d in dates}) == len(dates)
    speakers = [t.speaker for t in conv.sessions[0].turns]
    assert speakers[0::2] == [conv.user] * 5 and speakers[1::2] == [conv.friend] * 5


@pytest.mark.parametrize("sessions,turns", [(2, 8), (4, 5), (3, 4)])
def test_too_small_is_a_user_error(sessions, turns):
    with pytest.raises(UserError, match="fix:"):
        generate_conversation(0, 0, sessions=sessions, turns=turns)
