"""Hub corpus loaders (PG-19, C4, proof-pile/arXiv, WikiText-103), offline on tiny fixtures in the upstream schemas."""

from __future__ import annotations

import os

import pytest

from r3mem_bench.errors import UserError
from r3mem_bench.families import get_family
from r3mem_bench.families.lm import _meta_matches, load_hf
from r3mem_bench.task import TaskRegistry

from conftest import FIXTURES

LM_FIX = FIXTURES / "lm"


def _docs(task_name: str, fixture: str, tokenizer, **overrides):
    task = TaskRegistry().resolve(task_name, {"min_tokens": 0, "max_documents": 0, **overrides})[0]
    return get_family("lm").examples(task, str(LM_FIX / fixture), tokenizer)


def test_pg19_schema_ids_are_book_titles(tiny_lm):
    docs = _docs("pg19", "pg19_test.jsonl", tiny_lm.tokenizer)
    assert [d["id"] for d in docs] == ["The Lighthouse Log", "Letters From The Coast"]
    assert docs[0]["text"].startswith("CHAPTER I.")


def test_c4_schema_ids_are_urls_and_min_tokens_filters(tiny_lm):
    docs = _docs("c4", "c4_validation.jsonl", tiny_lm.tokenizer)
    assert [d["id"] for d in docs] == ["https://example.com/bakery", "https://example.org/ferns",
                                       "https://example.net/short"]
    long_docs = _docs("c4", "c4_validation.jsonl", tiny_lm.tokenizer, min_tokens=20)
    assert [d["id"] for d in long_docs] == ["https://example.com/bakery", "https://example.org/ferns"]


def test_proof_pile_all_sources_and_arxiv_filter(tiny_lm):
    assert len(_docs("proof_pile", "proof_pile_test.jsonl", tiny_lm.tokenizer)) == 3
    arxiv = _docs("arxiv", "proof_pile_test.jsonl", tiny_lm.tokenizer)
    assert len(arxiv) == 2 and all("$" in d["text"] or "theorem" in d["text"] for d in arxiv)


def test_meta_filter_accepts_json_strings():
    assert _meta_matches('{"config": "arxiv", "file": "x"}', {"config": "arxiv"})
    assert not _meta_matches({"set_name": "stack_exchange"}, {"config": "arxiv"})
    assert not _meta_matches("not json", {"config": "arxiv"})


def test_wikitext103_lines_become_detokenized_articles(tiny_lm):
    docs = _docs("wikitext103", "wikitext103_test.jsonl", tiny_lm.tokenizer)
    assert len(docs) == 2 and docs[0]["id"].endswith("Harbour_Light") and docs[1]["id"].endswith("Coastal_Birds")
    assert "= History =" in docs[1]["text"] and "cliffs." in docs[1]["text"] and "cliffs ." not in docs[1]["text"]


def test_data_files_in_yaml_config():
    docs = load_hf({"loader": "hf", "corpus": "c4", "data_files": str(LM_FIX / "c4_validation.jsonl"),
                    "max_documents": 1}, None)
    assert docs == [{"id": "https://example.com/bakery", "text": "Our bakery opens at seven every morning. " * 12}]


def test_missing_text_field_names_the_field():
    with pytest.raises(UserError, match="text_field"):
        load_hf({"corpus": "c4", "text_field": "body", "data_files": str(LM_FIX / "c4_validation.jsonl")}, None)


@pytest.mark.parametrize("corpus,hub_id", [("pg19", "deepmind/pg19"), ("c4", "allenai/c4"),
                                           ("arxiv", "hoskinson-center/proof-pile"),
                                           ("wikitext-103", "Salesforce/wikitext")])
def test_offline_hub_error_names_dataset_and_local_fix(corpus, hub_id, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    assert os.environ["HF_DATASETS_OFFLINE"] == "1"
    with pytest.raises(UserError) as err:
        load_hf({"loader": "hf", "corpus": corpus}, None)
    msg = str(err.value)
    assert hub_id in msg and "data_files" in msg and "--data" in msg


def test_offline_cli_error_is_one_line(cli):
    res = cli("run", "--task", "pg19", "--model", "tiny-random", "--method", "no_memory", "--output", "/tmp/unused",
              env={"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 2 and "deepmind/pg19" in res.stderr and "data_files" in res.stderr
    assert "Traceback" not in res.stderr


def test_unknown_corpus_is_user_error():
    with pytest.raises(UserError, match="corpus 'pg20'"):
        load_hf({"corpus": "pg20"}, None)
