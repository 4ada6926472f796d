"""Vector RAG: chunking, fusion, retrieval recall@k on a hand-made corpus, QA and LM protocols on tiny-random."""

from __future__ import annotations

import pytest
import torch
from fixtures.baselines.helpers import LM_TEXT, qa_parts, retrieval_fixture, run_lm, run_qa

from r3mem_bench.baselines._retrieval import DenseIndex, SparseIndex, embed, rrf, token_chunks
from r3mem_bench.errors import UserError
from r3mem_bench.methods import get_method_class


def test_token_chunks_cover_with_overlap():
    assert token_chunks(10, 4, 1) == [(0, 4), (3, 7), (6, 10)]
    assert token_chunks(3, 4, 1) == [(0, 3)]
    assert token_chunks(0, 4, 1) == []
    with pytest.raises(UserError):
        token_chunks(10, 4, 4)


def test_rrf_fuses_ranks():
    fused = rrf([[1, 2, 3], [3, 1]], k=60)
    assert [p for p, _ in fused] == [1, 3, 2]
    assert fused[0][1] == pytest.approx(1 / 61 + 1 / 62)


def test_dense_and_sparse_indexes_find_the_right_passage():
    items, questions = retrieval_fixture()
    texts = [i.text for i in items]
    vecs = embed(texts)
    flat, hnsw = DenseIndex(vecs.shape[1], "flat"), DenseIndex(vecs.shape[1], "hnsw")
    flat.add(vecs)
    hnsw.add(vecs)
    sparse = SparseIndex(texts)
    ids = [i.id for i in items]
    for q in questions:
        qv = embed([q["question"]])[0]
        assert ids[flat.search(qv, 1)[0][0]] == q["gold_ids"][0]
        assert [i for i, _ in flat.search(qv, 3)] == [i for i, _ in hnsw.search(qv, 3)]  # exact at this size
    assert ids[sparse.search("Guido van Rossum programming language", 1)[0][0]] == "p-python"
    assert sparse.search("zzzz qqqq", 3) == []
    assert flat.nbytes() >= vecs.nbytes and sparse.nbytes() > 0


@pytest.mark.parametrize("retriever", ["dense", "bm25", "hybrid"])
def test_recall_at_k_through_the_qa_protocol(tiny_lm, retriever):
    items, questions = retrieval_fixture()
    method = get_method_class("vector_rag")(tiny_lm, {"retriever": retriever, "top_k": 2}, **qa_parts(tiny_lm))
    rows = run_qa(method, items, questions)
    recall = [r["metrics"]["recall"] for r in rows]
    assert len(rows) == len(questions)
    assert sum(recall) / len(recall) >= (1.0 if retriever != "bm25" else 0.8), recall
    assert all(len(r["retrieved_ids"]) <= 2 for r in rows)
    assert all(set(r["retrieved_ids"]) <= {i.id for i in items} for r in rows)
    assert rows[0]["state_bytes"] > sum(len(i.text) for i in items)
    assert all(r["prompt_tokens"] > 0 and r["tokens_processed"] > r["prompt_tokens"] - 1 for r in rows)


def test_budget_caps_the_qa_context(tiny_lm):
    items, questions = retrieval_fixture()
    method = get_method_class("vector_rag")(tiny_lm, {"top_k": 5, "memory_budget": 40}, **qa_parts(tiny_lm))
    method.ingest(items)
    context, ids = method.retrieve(questions[0]["question"])
    assert 1 <= len(ids) < 5
    assert len(tiny_lm.tokenizer(context)["input_ids"]) <= 40


def test_bad_options_are_user_errors(tiny_lm):
    cls = get_method_class("vector_rag")
    for opts in ({"retriever": "magic"}, {"index": "ivf"}, {"chunk_size": 8, "chunk_overlap": 8}, {"top_k": 0}):
        with pytest.raises(UserError):
            cls(tiny_lm, opts)


def test_lm_stream_uses_only_the_past(tiny_lm):
    cls = get_method_class("vector_rag")
    method = cls(tiny_lm, {"chunk_size": 16, "chunk_overlap": 4, "memory_budget": 48})
    ids = torch.tensor(tiny_lm.tokenizer(LM_TEXT, add_special_tokens=False)["input_ids"][:160])
    segments = list(ids.split(32))
    method.reset()
    assert method._lm_context(segments[0]).numel() == 0  # nothing stored yet
    for i, seg in enumerate(segments):
        ctx = method._lm_context(segments[i - 1] if i else seg[:0])
        assert ctx.numel() <= 48
        assert all(c.end <= 32 * i for c in method.chunks)  # the store holds only earlier segments
        method._absorb(seg)
    rows = run_lm(cls(tiny_lm, {"chunk_size": 16, "chunk_overlap": 4, "memory_budget": 48}), LM_TEXT, 32, 160)
    assert rows[0]["n_segments"] == 5 and sum(rows[0]["segment_tokens"]) == 160
    # segment 0 sees only the prefix token; segments 1.. see 32 to 48 retrieved tokens (budget 48)
    assert 5 + 160 + 4 * 32 <= rows[0]["tokens_processed"] <= 5 + 160 + 4 * 48
    assert rows[0]["state_bytes_series"] == sorted(rows[0]["state_bytes_series"])


def test_lm_stream_matches_segment_by_segment(tiny_lm):
    cls = get_method_class("vector_rag")
    ids = torch.tensor(tiny_lm.tokenizer(LM_TEXT, add_special_tokens=False)["input_ids"][:128])
    segments = list(ids.split(32))
    a, b = cls(tiny_lm, {"memory_budget": 64}), cls(tiny_lm, {"memory_budget": 64})
    batched = a.score_stream(segments)
    single = [b.score_segment(s) for s in segments]
    for x, y in zip(batched, single):
        assert torch.allclose(x, y, atol=1e-4)
    assert a.tokens_processed == b.tokens_processed
