"""The dialogue family: loaders on upstream-schema fixtures, LoCoMo's official scoring, knowledge-update
scoring with constructed methods, the judge hook, and the CLI on a locomo10.json-format file."""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone

import pytest

from r3mem_bench.errors import UserError
from r3mem_bench.families import get_family
from r3mem_bench.method import Answer, MemoryMethod
from r3mem_bench.task import TaskRegistry

from conftest import FIXTURES, SHARED_DATA

DLG = FIXTURES / "dialogue"


def _task(name: str, **overrides):
    return TaskRegistry().resolve(name, overrides)[0]


def _examples(name: str, data=None, **overrides):
    task = _task(name, **overrides)
    return task, get_family("dialogue").examples(task, str(data) if data else None)


# ---- loaders -------------------------------------------------------------------------------------------------
def test_locomo_loader_schema_order_and_items():
    task, qs = _examples("locomo", DLG / "locomo_mini.json")
    assert [q["id"] for q in qs] == [f"conv-mini-1/qa{i:03d}" for i in range(5)] + ["conv-mini-2/qa000",
                                                                                    "conv-mini-2/qa001"]
    assert [q["category"] for q in qs[:5]] == ["temporal", "multi-hop", "open-domain", "single-hop", "adversarial"]
    assert qs[0]["question"].endswith("approximate date.")  # the official temporal hint
    assert qs[4]["answerable"] is False and qs[3]["answerable"] is True
    assert qs[6]["answers"] == ["2023"] and qs[6]["gold_ids"] == ["D1:2", "D1:1"]  # int answer, packed evidence
    items = task.data["corpora"]["conv-mini-1"]
    assert [it.id for it in items] == ["D1:1", "D1:2", "D1:3", "D2:1", "D2:2"]
    first = items[0]
    assert first.text.startswith("Caroline: Hey Mel")
    assert first.meta == {"session": 1, "speaker": "Caroline", "date": "1:56 pm on 8 May, 2023", "dia_id": "D1:1"}
    assert first.timestamp == datetime(2023, 5, 8, 13, 56, tzinfo=timezone.utc).timestamp()
    assert items[2].text.endswith("and shared a photo of a bookshelf.")
    assert items[3].timestamp > items[2].timestamp and items[3].meta["session"] == 2
    assert all(q["now"] > items[-1].timestamp for q in qs[:5])


def test_longmemeval_loader():
    task, qs = _examples("longmemeval", DLG / "longmemeval_mini.json")
    assert [q["category"] for q in qs] == ["single-hop", "knowledge-update", "adversarial"]
    assert [q["answerable"] for q in qs] == [True, True, False]
    assert qs[0]["gold_ids"] == ["answer_280352e9:1"] and "2023/05/30" in qs[0]["question"]
    items = task.data["corpora"]["e47becba"]
    assert items[0].id == "answer_280352e9:1"  # sessions sorted by date: 2 May before 20 May
    assert [it.meta["session"] for it in items] == [1, 1, 2, 2]
    assert items[0].text.startswith("user: I graduated") and items[0].meta["speaker"] == "user"
    assert qs[0]["now"] == datetime(2023, 5, 30, 23, 40, tzinfo=timezone.utc).timestamp()


def test_msc_loader_derives_recognition_questions():
    task, qs = _examples("msc", DLG / "msc_mini.jsonl")
    assert {q["category"] for q in qs} == {"persona-recall", "persona-foil"}
    corpora = task.data["corpora"]
    for q in qs:
        fact = re.search(r'"(.*)"', q["question"]).group(1)
        own = json.dumps([ln for ln in (DLG / "msc_mini.jsonl").read_text().splitlines()
                          if q["corpus_id"].split("-")[1] in ln][0])
        if q["category"] == "persona-recall":
            assert q["answers"] == ["yes"] and fact in own and q["gold_ids"]
            spk = re.search(r"Did (Speaker \d)", q["question"]).group(1)
            assert all(corpora[q["corpus_id"]][int(g.split(":")[1]) - 1].meta["speaker"] == spk
                       for g in q["gold_ids"] if g.startswith("D1:"))
        else:
            assert q["answers"] == ["no"] and fact not in own
    items = corpora["msc-fx_0-s2"]
    stamps = [it.timestamp for it in items]
    assert stamps == sorted(stamps) and items[-1].meta["session"] == 3


@pytest.mark.parametrize("mutate,field", [
    (lambda d: d[0]["conversation"].pop("session_2_date_time"), "session_2_date_time"),
    (lambda d: d[0]["qa"][1].pop("answer"), "answer"),
    (lambda d: d[1]["conversation"]["session_1"][0].pop("speaker"), "speaker"),
    (lambda d: d[0]["conversation"].__setitem__("session_1_date_time", "yesterday"), "session_1_date_time"),
    (lambda d: d[0]["qa"][0].__setitem__("category", 9), "category"),
])
def test_malformed_locomo_names_file_and_field(tmp_path, mutate, field):
    data = json.loads((DLG / "locomo_mini.json").read_text())
    mutate(data)
    bad = tmp_path / "bad_locomo.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(UserError) as err:
        _examples("locomo", bad)
    assert str(bad) in str(err.value) and field in str(err.value)


def test_malformed_longmemeval_and_msc(tmp_path):
    data = json.loads((DLG / "longmemeval_mini.json").read_text())
    data[1]["question_type"] = "trivia"
    bad = tmp_path / "lme.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(UserError, match="question_type"):
        _examples("longmemeval", bad)
    bad = tmp_path / "msc.jsonl"
    bad.write_text('{"dialog": []}\n')
    with pytest.raises(UserError, match="previous_dialogs"):
        _examples("msc", bad)
    with pytest.raises(UserError, match="persona task generates"):
        _examples("persona", DLG / "locomo_mini.json")


# ---- scoring -------------------------------------------------------------------------------------------------
def _score(example, text):
    return get_family("dialogue").score(example, Answer(text=text, retrieved_ids=["D1:1"]))


def test_locomo_official_scoring():
    _, qs = _examples("locomo", DLG / "locomo_mini.json")
    temporal, multi, open_domain, single, adversarial = qs[:5]
    # category 2-4: stemmed token F1 after dropping commas/articles/'and'
    assert _score(single, "the beach")["f1"] == 1.0 and _score(single, "beaches")["f1"] == 1.0
    assert _score(temporal, "7 May, 2023")["em"] == 1.0
    # category 3: gold cut at the first ';'
    assert _score(open_domain, "psychology, counseling")["f1"] == 1.0
    # category 1: mean over gold sub-answers of the best F1 against prediction sub-answers
    multi = {**multi, "answers": ["adoption agencies, support groups"]}
    assert _score(multi, "adoption agencies")["f1"] == pytest.approx(0.5)
    assert _score(multi, "support groups, adoption agencies")["f1"] == 1.0
    # category 5: correct iff the prediction refuses with the official phrases
    assert _score(adversarial, "Not mentioned in the conversation")["f1"] == 1.0
    assert _score(adversarial, "I don't know")["f1"] == 0.0  # not one of LoCoMo's two phrases
    assert _score(adversarial, "self-care is important")["abstention"] == 0.0
    assert _score(single, "beach")["recall"] == 0.0 and _score(temporal, "x")["recall"] == 1.0
    # abstention accuracy: refusing an answerable question is wrong, refusing an adversarial one right
    assert _score(single, "not mentioned")["abstention_acc"] == 0.0
    assert _score(adversarial, "not mentioned")["abstention_acc"] == 1.0


# ---- knowledge update: a method that keeps the latest value vs one that returns a stale one -------------------
class _ValueRecall(MemoryMethod):
    """Answers 'where do/does X live now' from its memory: the latest (or the oldest) stated value."""

    families = ("dialogue",)
    pick_latest = True
    retrieves = True  # it answers with the id of the turn it read: retrieval recall applies

    def reset(self) -> None:
        self.items = []

    def ingest(self, items) -> None:
        self.items.extend(items)

    def answer(self, question: str, now=None) -> Answer:
        pattern = r"live in (\w+)" if "live" in question else r"work as an? (\w+)"
        found = [(it.timestamp, m.group(1), it.id) for it in self.items if it.meta["speaker"] in question
                 for m in re.finditer(pattern, it.text)]
        if not found:
            return Answer(text="not mentioned")
        _, value, item_id = max(found) if self.pick_latest else min(found)
        return Answer(text=value, retrieved_ids=[item_id])


class _Latest(_ValueRecall):
    name = "test_latest"


class _Stale(_ValueRecall):
    name = "test_stale"
    pick_latest = False


def _run(task, method, examples) -> dict:
    fam = get_family("dialogue")
    rows = []
    fam.evaluate(task, method, examples, rows.append)
    return fam.aggregate(rows, task.params)


def test_knowledge_update_constructed_case(tiny_lm):
    """Two sessions: 'I live in Oslo' then 'I moved to Lima'. Latest-value memory scores 1.0, stale 0.0."""
    from r3mem_bench.families.dialogue import turn_item

    task = _task("locomo")
    d1, d2 = datetime(2023, 1, 5, tzinfo=timezone.utc), datetime(2023, 3, 9, tzinfo=timezone.utc)
    task.data["corpora"] = {"c": [turn_item("D1:1", "Ana", "I live in Oslo.", d1, 1),
                                  turn_item("D1:2", "Bo", "Nice!", d1, 1),
                                  turn_item("D2:1", "Ana", "I moved, I live in Lima now.", d2, 2)]}
    ex = [{"id": "c/q0", "question": "Where does Ana live now?", "answers": ["Lima"], "corpus_id": "c",
           "category": "knowledge-update", "gold_ids": ["D2:1"], "answerable": True,
           "now": d2.timestamp() + 86400}]
    latest = _run(task, _Latest(tiny_lm), ex)
    stale = _run(task, _Stale(tiny_lm), ex)
    assert latest["f1/knowledge-update"] == 1.0 and latest["em/knowledge-update"] == 1.0 and latest["recall"] == 1.0
    assert stale["f1/knowledge-update"] == 0.0 and stale["recall"] == 0.0


def test_knowledge_update_on_generated_conversations(tiny_lm):
    task, qs = _examples("persona")
    ku = [q for q in qs if q["category"] == "knowledge-update"]
    assert len(ku) == 16 and all(q["stale"] for q in ku)
    latest = _run(task, _Latest(tiny_lm), ku)
    stale = _run(task, _Stale(tiny_lm), ku)
    assert latest["f1/knowledge-update"] == 1.0
    assert stale["f1/knowledge-update"] == 0.0


# ---- question times and order, recall only for retrieving methods ----------------------------------------------
def test_question_times_and_asking_order():
    from r3mem_bench.families.dialogue import load_locomo, load_persona
    from r3mem_bench.families.qa import asking_order

    task, qs = _examples("persona")
    conv = qs[0]["corpus_id"]
    last = max(it.timestamp for it in task.data["corpora"][conv])
    own = [q for q in qs if q["corpus_id"] == conv]
    assert [q["now"] - last for q in own] == [86400.0 * (1 + i) for i in range(7)]  # one a day, generated order
    assert task.data["questions"] == qs and [q["id"] for q in own] == [f"{conv}/q{i:02d}" for i in range(7)]
    cfg = {"loader": "persona", "conversations": 1, "question_interval_days": 0.5}
    half = [q["now"] - last for q in load_persona(cfg, None, {})[0]]
    assert half == [86400.0 * (1 + 0.5 * i) for i in range(7)]
    _, lq = _examples("locomo", DLG / "locomo_mini.json")
    assert len({q["now"] for q in lq if q["corpus_id"] == "conv-mini-1"}) == 1  # LoCoMo: one shared time
    spaced, _ = load_locomo({"loader": "locomo", "question_interval_days": 2}, str(DLG / "locomo_mini.json"), {})
    assert spaced[1]["now"] - spaced[0]["now"] == 2 * 86400.0
    with pytest.raises(UserError, match="question_interval_days"):
        load_persona({"loader": "persona", "conversations": 1, "question_interval_days": -1}, None, {})
    mixed = [{"id": "a", "corpus_id": "x", "now": 3.0}, {"id": "b", "corpus_id": "y", "now": 9.0},
             {"id": "c", "corpus_id": "x", "now": 1.0}, {"id": "d", "corpus_id": "x", "now": None}]
    assert [q["id"] for q in asking_order(mixed)] == ["d", "b", "c", "a"]  # each corpus sorted in its own slots


class _StateOnly(MemoryMethod):
    """Answers from an internal state and names no items (like RMT): no ``retrieve``."""

    name = "test_state_only"
    families = ("dialogue",)

    def ingest(self, items) -> None:
        pass

    def answer(self, question: str, now=None) -> Answer:
        return Answer(text="Lima")


def test_recall_absent_for_methods_that_do_not_retrieve(tiny_lm):
    from r3mem_bench.families.qa import reports_recall
    from r3mem_bench.methods import get_method_class

    task, qs = _examples("persona")
    ku = [q for q in qs if q["category"] == "knowledge-update"][:4]
    rows = []
    get_family("dialogue").evaluate(task, _StateOnly(tiny_lm), ku, rows.append)
    assert rows and all("recall" not in r["metrics"] for r in rows)
    assert "recall" not in get_family("dialogue").aggregate(rows, task.params)  # absent, not 0
    assert "recall" in _run(task, _Latest(tiny_lm), ku)
    classes = {n: get_method_class(n) for n in ("rmt", "no_memory", "vector_rag", "memorybank", "full_context")}
    assert {n: reports_recall(object.__new__(c)) for n, c in classes.items()} == {
        "rmt": False, "no_memory": False, "vector_rag": True, "memorybank": True, "full_context": True}


# ---- judge ---------------------------------------------------------------------------------------------------
class _FakeGen:
    """A generator that says 'yes' when the predicted answer is in the prompt's gold line."""

    def __init__(self):
        self.prompts = []

    def generate(self, prompts):
        from r3mem_bench.generation import Generation

        self.prompts.extend(prompts)
        out = []
        for p in prompts:
            gold = re.search(r"Gold answer: (.*)", p).group(1)
            pred = re.search(r"Predicted answer: (.*)", p).group(1)
            out.append(Generation("Yes." if pred.lower() in gold.lower() else "No.", 10, 1))
        return out


def test_judge_off_by_default_and_pluggable(tiny_lm):
    task, qs = _examples("persona")
    ku = [q for q in qs if q["category"] == "knowledge-update"][:4]
    assert "judge" not in _run(task, _Latest(tiny_lm), ku)
    task, _ = _examples("persona", judge="generator")
    gen = _FakeGen()
    agg = _run(task, _Latest(tiny_lm, generator=gen), ku)
    assert agg["judge"] == 1.0 and agg["judge/knowledge-update"] == 1.0 and len(gen.prompts) == 4
    assert _run(task, _Stale(tiny_lm, generator=_FakeGen()), ku)["judge"] == 0.0
    with pytest.raises(UserError, match="judge 'gpt5' is unknown"):
        _examples("persona", judge="gpt5")


# ---- end to end ----------------------------------------------------------------------------------------------
def test_cli_locomo_file_per_category(cli, tmp_path):
    out = tmp_path / "runs"
    res = cli("run", "--task", "locomo", "--data", str(DLG / "locomo_mini.json"), "--method", "full_context,no_memory",
              "--model", "tiny-random", "--limit", "6", "--output", str(out), "--threads", "1", "-q")
    assert res.returncode == 0, res.stderr
    for name in ("f1/single-hop", "f1/multi-hop", "f1/temporal", "f1/open-domain", "f1/adversarial",
                 "em/single-hop", "abstention_acc", "state_bytes", "ingest_s", "answer_s"):
        assert name in res.stdout, name
    rows = [json.loads(x) for x in (out / "locomo" / "full_context" / "results.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"conv-mini-1/qa{i:03d}" for i in range(5)] + ["conv-mini-2/qa000"]
    assert rows[0]["state_bytes"] > 0 and "D1:1" in rows[0]["retrieved_ids"]
    nomem = [json.loads(x) for x in (out / "locomo" / "no_memory" / "results.jsonl").read_text().splitlines()]
    assert all(r["state_bytes"] == 0 and r["retrieved_ids"] == [] for r in nomem)


def test_cli_malformed_file_exit_2(cli, tmp_path):
    bad = tmp_path / "broken.json"
    bad.write_text(json.dumps([{"sample_id": "x", "conversation": {"session_1": []}, "qa": []}]))
    res = cli("run", "--task", "locomo", "--data", str(bad), "--model", "tiny-random", "--output", str(tmp_path))
    assert res.returncode == 2
    assert "session_1_date_time" in res.stderr and str(bad) in res.stderr and "Traceback" not in res.stderr


@pytest.mark.shared_data
def test_real_locomo_dev_loads():
    _, qs = _examples("locomo", SHARED_DATA / "dialogue" / "locomo5_dev.json")
    assert len(qs) == 999 and {q["category"] for q in qs} == {"single-hop", "multi-hop", "temporal", "open-domain",
                                                              "adversarial"}
