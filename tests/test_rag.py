"""RAG family: loaders on tiny upstream-schema fixtures (offline), malformed data, protocol, metrics and the CLI."""

from __future__ import annotations

import json
import logging

import pytest
from conftest import FIXTURES

from r3mem_bench.errors import UserError
from r3mem_bench.families import get_family
from r3mem_bench.families.rag import (
    chunk_words,
    load_corpus_file,
    load_hotpot,
    load_nq_open,
    load_squad,
    load_trivia_qa,
    load_ultradomain,
)
from r3mem_bench.method import Answer, MemoryMethod
from r3mem_bench.task import TaskRegistry

RAG = FIXTURES / "rag"
PARAMS = dict(get_family("rag").default_params)


def test_squad_official_json_keeps_file_order_and_groups_articles():
    questions, corpora = load_squad({}, str(RAG / "squad_tiny.json"), PARAMS)
    assert [q["id"] for q in questions] == ["q-sb-2", "q-sb-1", "q-sb-3", "q-wa-1"]  # file order, not sorted
    assert list(corpora) == ["Super_Bowl_50", "Warsaw"]
    assert [i.id for i in corpora["Super_Bowl_50"]] == ["Super_Bowl_50/000", "Super_Bowl_50/001"]
    q = questions[0]
    assert q["answers"] == ["Denver Broncos", "The Denver Broncos"] and q["corpus_id"] == "Super_Bowl_50"
    assert q["gold_ids"] == ["Super_Bowl_50/000"] and questions[2]["gold_ids"] == ["Super_Bowl_50/001"]
    assert questions[3]["answers"] == ["Vistula River", "Vistula"]
    for q in questions:  # every answer span is in its gold paragraph
        text = {i.id: i.text for i in corpora[q["corpus_id"]]}[q["gold_ids"][0]]
        assert all(a in text for a in q["answers"])


def test_squad_malformed_rows_name_file_and_row(tmp_path):
    with pytest.raises(UserError, match=r"squad_bad.json.*question 0.*'question'"):
        load_squad({}, str(RAG / "squad_bad.json"), PARAMS)
    bad = tmp_path / "noanswers.json"
    bad.write_text(json.dumps({"version": "1.1", "data": [{"title": "T", "paragraphs": [
        {"context": "c", "qas": [{"id": "x", "question": "q?", "answers": []}]}]}]}))
    with pytest.raises(UserError, match=r"noanswers.json.*no non-empty answer"):
        load_squad({}, str(bad), PARAMS)
    notsquad = tmp_path / "list.json"
    notsquad.write_text("[1, 2]")
    with pytest.raises(UserError, match="not SQuAD v1.1 JSON"):
        load_squad({}, str(notsquad), PARAMS)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(UserError, match="broken.json: not valid JSON"):
        load_squad({}, str(broken), PARAMS)


def test_hub_loader_offline_names_dataset_and_local_fix(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match=r"hub dataset 'no-such-owner/no-such-rag-set'.*--data FILE"):
        load_squad({"hub": "no-such-owner/no-such-rag-set"}, None, PARAMS)
    with pytest.raises(UserError, match="no data file; fix: pass --data FILE"):
        load_nq_open({}, None, PARAMS)


def test_hotpot_raw_and_hub_schemas_agree():
    raw_q, raw_c = load_hotpot({}, str(RAG / "hotpot_tiny.json"), PARAMS)
    hub_q, hub_c = load_hotpot({}, str(RAG / "hotpot_hf_tiny.jsonl"), PARAMS)
    assert raw_q == hub_q
    assert {k: [(i.id, i.text) for i in v] for k, v in raw_c.items()} == {k: [(i.id, i.text) for i in v] for k, v in hub_c.items()}
    q = raw_q[1]
    assert q["id"] == "5a8c7595554299585d9e36b6" and q["category"] == "bridge" and q["answers"] == ["Chief of Protocol"]
    assert q["gold_ids"] == ["Kiss and Tell (1945 film)", "Shirley Temple"]  # supporting titles, deduplicated
    items = raw_c[q["corpus_id"]]
    assert [i.id for i in items] == ["Kiss and Tell (1945 film)", "Shirley Temple", "Meet Corliss Archer"]
    assert items[1].text.startswith("Shirley Temple: Shirley Temple Black") and "Chief of Protocol" in items[1].text


def test_hotpot_with_shared_corpus_file():
    questions, corpora = load_hotpot({"corpus": str(RAG / "hotpot_corpus_tiny.json")}, str(RAG / "hotpot_tiny.json"), PARAMS)
    assert list(corpora) == ["hotpot-corpus"] and {q["corpus_id"] for q in questions} == {"hotpot-corpus"}
    ids = {i.id for i in corpora["hotpot-corpus"]}
    assert all(g in ids for q in questions for g in q["gold_ids"])


def test_nq_open_closed_book_and_dpr_corpus():
    questions, corpora = load_nq_open({}, str(RAG / "nq_open_tiny.jsonl"), PARAMS)
    assert [q["id"] for q in questions] == ["nq-00000", "nq-00001", "nq-00002"]
    assert questions[0]["answers"] == ["14 December 1972 UTC", "December 1972"]
    assert corpora == {"closed-book": []}
    questions, corpora = load_nq_open({"corpus": str(RAG / "nq_corpus_tiny.tsv")}, str(RAG / "nq_open_tiny.jsonl"), PARAMS)
    assert (corpora["nq-corpus"][0].id, corpora["nq-corpus"][0].text) == ("1", "Apollo 17: Apollo 17 left the Moon in December 1972.")


def test_trivia_qa_chunks_documents_labels_evidence_and_counts_skips(caplog):
    with caplog.at_level(logging.WARNING):
        questions, corpora = load_trivia_qa({}, str(RAG / "trivia_qa_tiny.jsonl"), {**PARAMS, "passage_words": 20})
    assert [q["id"] for q in questions] == ["tc_1"]
    assert "skipped 1 of 2 questions" in caplog.text
    q = questions[0]
    assert q["answers"] == ["Bartholdi", "Frédéric Auguste Bartholdi"]
    items = corpora["tc_1"]
    assert all(len(i.text.split()) <= 20 for i in items) and len(items) >= 3
    assert q["gold_ids"] and all("Bartholdi" in {i.id: i.text for i in items}[g] for g in q["gold_ids"])
    assert "tc_1/search0/0000" in q["gold_ids"]
    assert not any("Bartholdi" in i.text for i in items if i.id not in q["gold_ids"])


def test_ultradomain_groups_questions_by_context():
    questions, corpora = load_ultradomain({}, str(RAG / "ultradomain_tiny.jsonl"), {**PARAMS, "passage_words": 50})
    assert [q["id"] for q in questions] == ["ud0", "ud1", "ud2"]
    assert questions[0]["corpus_id"] == questions[1]["corpus_id"] == "agri-0"
    assert questions[2]["corpus_id"].startswith("ctx-") and questions[2]["answers"] == ["a crop grown to protect soil"]
    assert questions[0]["category"] == "agriculture"
    words = len(json.loads((RAG / "ultradomain_tiny.jsonl").read_text().splitlines()[0])["context"].split())
    assert len(corpora["agri-0"]) == -(-words // 50) and all(len(i.text.split()) <= 50 for i in corpora["agri-0"])
    assert " ".join(i.text for i in corpora["agri-0"]).split() == json.loads(
        (RAG / "ultradomain_tiny.jsonl").read_text().splitlines()[0])["context"].split()


def test_malformed_jsonl_and_rows(tmp_path):
    bad = tmp_path / "nq.jsonl"
    bad.write_text('{"question": "q1", "answer": ["a"]}\n{"question": "q2"}\n')
    with pytest.raises(UserError, match=r"nq.jsonl: row 1 field 'answer'"):
        load_nq_open({}, str(bad), PARAMS)
    bad.write_text('{"question": "q1", "answer": ["a"]}\nnot json\n')
    with pytest.raises(UserError, match=r"nq.jsonl: line 2 is not JSON"):
        load_nq_open({}, str(bad), PARAMS)
    hp = tmp_path / "hp.json"
    hp.write_text(json.dumps([{"_id": "x", "question": "q", "answer": "a", "supporting_facts": [], "context": []}]))
    with pytest.raises(UserError, match=r"hp.json: row 0 has no 'context' paragraphs"):
        load_hotpot({}, str(hp), PARAMS)
    with pytest.raises(UserError, match="dataset.corpus .*not found"):
        load_corpus_file(str(tmp_path / "missing.tsv"))


def test_chunk_words():
    items = chunk_words("a b c d e f g", 3, "doc")
    assert [(i.id, i.text) for i in items] == [("doc/0000", "a b c"), ("doc/0001", "d e f"), ("doc/0002", "g")]


def test_task_files_and_default():
    reg = TaskRegistry()
    assert reg.get("rag").name == "needle"
    squad = reg.get("squad")
    assert squad.family == "rag" and squad.dataset["loader"] == "squad"
    for name in ("hotpotqa", "nq_open", "triviaqa", "ultradomain", "needle_long"):
        assert reg.get(name).family == "rag"
    assert len(reg.resolve("needle_long")) == 3  # corpus-length sweep


class _Scripted(MemoryMethod):
    """Answers from a fixed table and 'retrieves' the first passage; stores a fixed number of bytes."""

    name = "scripted"
    retrieves = True

    def __init__(self, lm, replies):
        super().__init__(lm)
        self.replies, self.items = replies, []

    def reset(self):
        self.items = []

    def ingest(self, items):
        self.items = list(items)

    def state_bytes(self):
        return 1000 * len(self.items)

    def answer(self, question, now=None):
        self.tokens_processed += 10
        return Answer(self.replies[question], [self.items[0].id], prompt_tokens=7)


def test_protocol_metrics_and_costs(tiny_lm):
    reg = TaskRegistry()
    (task,) = reg.resolve("squad")
    fam = get_family("rag")
    examples = fam.examples(task, str(RAG / "squad_tiny.json"), tiny_lm.tokenizer)
    replies = {"Which team won Super Bowl 50?": "It was the Denver Broncos.", "What was the final score?": "24–10",
               "Where was the game played?": "In Santa Clara.", "Which river does Warsaw stand on?": "the Vistula"}
    rows = []
    fam.evaluate(task, _Scripted(tiny_lm, replies), examples, rows.append)
    assert [r["id"] for r in rows] == ["q-sb-2", "q-sb-1", "q-sb-3", "q-wa-1"]
    by_id = {r["id"]: r["metrics"] for r in rows}
    assert by_id["q-sb-2"] == {"em": 0.0, "f1": pytest.approx(2 * 0.5 * 1 / 1.5), "contains": 1.0, "recall": 1.0}
    assert by_id["q-sb-1"]["em"] == 1.0 and by_id["q-sb-1"]["recall"] == 1.0
    assert by_id["q-sb-3"] == {"em": 0.0, "f1": 0.0, "contains": 0.0, "recall": 0.0}  # gold is paragraph 001
    assert by_id["q-wa-1"]["em"] == 1.0
    agg = fam.aggregate(rows, task.params)
    assert agg["em"] == 0.5 and agg["contains"] == 0.75 and agg["recall"] == 0.75 and agg["prompt_tokens"] == 7
    ctoks = task.data["corpus_tokens"]
    assert agg["bytes_per_1k_corpus_tokens"] == pytest.approx((2000 + 1000) / (ctoks["Super_Bowl_50"] + ctoks["Warsaw"]) * 1000)
    assert agg["tokens_processed"] == 10 and agg["answer_s"] >= 0 and agg["ingest_s"] >= 0


def test_needle_category_aggregates_and_data_flag(tiny_lm):
    reg = TaskRegistry()
    (task,) = reg.resolve("needle", {"n_corpora": 1})
    fam = get_family("rag")
    examples = fam.examples(task, None, tiny_lm.tokenizer)
    assert [q["category"] for q in examples] == ["single", "multikey", "multihop", "single"]
    rows = []
    replies = {q["question"]: (q["answers"][0] if q["category"] == "single" else "no idea") for q in examples}
    fam.evaluate(task, _Scripted(tiny_lm, replies), examples, rows.append)
    agg = fam.aggregate(rows, task.params)
    assert agg["contains/single"] == 1.0 and agg["contains/multikey"] == 0.0 and agg["em/multihop"] == 0.0
    with pytest.raises(UserError, match="needle task generates its data"):
        fam.examples(task, str(RAG / "squad_tiny.json"))


def test_cli_squad_local_file_with_limit(cli, tmp_path):
    out = tmp_path / "runs"
    proc = cli("run", "--task", "squad", "--data", str(RAG / "squad_tiny.json"), "--limit", "3", "--model", "tiny-random",
               "--method", "full_context,no_memory", "--output", str(out), "--threads", "1", "-q")
    assert proc.returncode == 0, proc.stderr
    for method in ("full_context", "no_memory"):
        rows = [json.loads(line) for line in (out / "squad" / method / "results.jsonl").read_text().splitlines()]
        assert [r["id"] for r in rows] == ["q-sb-2", "q-sb-1", "q-sb-3"]
        assert all({"em", "f1", "contains"} <= set(r["metrics"]) for r in rows)
        # recall@k only for methods that retrieve; closed-book no_memory has no recall column
        assert all(("recall" in r["metrics"]) == (method == "full_context") for r in rows)
    assert "squad" in proc.stdout and "full_context" in proc.stdout
    bad = cli("run", "--task", "squad", "--data", str(RAG / "squad_bad.json"), "--model", "tiny-random", "--output", str(out))
    assert bad.returncode == 2 and "squad_bad.json" in bad.stderr + bad.stdout


@pytest.mark.shared_data
def test_loaders_on_shared_real_data():
    from conftest import SHARED_DATA

    rag = SHARED_DATA / "rag"
    questions, corpora = load_squad({}, str(rag / "squad_dev-v1.1_partA_bloomsbury-dev.json"), PARAMS)
    assert len(questions) == 4961 and len(corpora) == 24 and sum(len(v) for v in corpora.values()) == 913
    assert questions[0]["corpus_id"] == "Super_Bowl_50"
    questions, corpora = load_hotpot({}, str(rag / "hotpotqa_train100_hipporag.json"), PARAMS)
    assert len(questions) == 100 and all(len(corpora[q["corpus_id"]]) >= 2 for q in questions)
    assert all(g in {i.id for i in corpora[q["corpus_id"]]} for q in questions for g in q["gold_ids"])
    questions, corpora = load_hotpot({"corpus": str(rag / "hotpotqa_train100_hipporag_corpus.json")},
                                     str(rag / "hotpotqa_train100_hipporag.json"), PARAMS)
    assert len(corpora["hotpot-corpus"]) == 994
    questions, _ = load_nq_open({}, str(rag / "NQ-open.dev.jsonl"), PARAMS)
    assert len(questions) == 3610
