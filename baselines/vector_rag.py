"""Vector RAG: chunk the history, embed the chunks, retrieve the top-k for each query and put them in the prompt.

The standard retrieve-then-read baseline (Lewis et al., NeurIPS 2020, with a frozen reader; chunking and dense
retrieval as in common RAG stacks). Options (``--method-arg k=v``):

* ``chunk_size`` / ``chunk_overlap``: chunk length and overlap in base-model tokens (default 128 / 16).
  Chunks never cross item boundaries (a passage or a dialogue turn is split into windows of its own tokens).
* ``retriever``: ``dense`` (all-MiniLM-L6-v2 + FAISS, default), ``bm25`` (``bm25s``) or ``hybrid``
  (reciprocal rank fusion of both rankings, k = 60).
* ``index``: ``flat`` (exact ``IndexFlatIP``, default) or ``hnsw`` (``IndexHNSWFlat``, inner product).
* ``top_k``: chunks put in a QA prompt (default 5); ``memory_budget``: cap on retrieved tokens (LM default 512;
  QA: no cap beyond ``top_k``, the shared generator truncates an over-long prompt from the front).

QA (rag, dialogue): ``ingest`` chunks and indexes every item; ``retrieve`` returns the top-k chunks (best first,
each line with the item's date when it has one) and the ids of the items they came from, deduplicated in rank
order, so retrieval recall@k is measured on item (passage / turn) ids. A static corpus has no notion of time.

LM streams: memory = every chunk of the segments already scored. Segment i is scored as
``[prefix][retrieved tokens][segment i]`` where the retrieved tokens are found with segment i-1's text as the
query (only text that precedes the scored tokens), ranked chunks are taken until ``memory_budget`` tokens, then
merged (overlaps removed) and laid out in document order. Each segment is chunked together with the last
``chunk_overlap`` tokens of the one before, so chunks bridge segment boundaries.

Costs: ``tokens_processed`` counts base-model tokens (LM rows, QA prompts and answers); the embedder's own tokens
are not base-model tokens and are kept apart in ``embedder_tokens``. ``state_bytes`` = stored chunk text + FAISS
index (it holds the 384-dim float32 vectors) + BM25 matrix and vocabulary.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from r3mem_bench.baselines._retrieval import DenseIndex, SparseIndex, embed, embed_dim, embed_tokens, rrf, token_chunks
from r3mem_bench.errors import UserError
from r3mem_bench.method import MemoryItem, MemoryMethod
from r3mem_bench.methods.registry import register_method
from r3mem_bench.methods.reference import _batched_nll, _item_line

RETRIEVERS = ("dense", "bm25", "hybrid")


@dataclass
class Chunk:
    """A stored chunk: its text, source item id and (LM streams) its token span in the document."""

    text: str
    item_id: str
    line: str
    start: int = 0
    end: int = 0


@register_method
class VectorRAG(MemoryMethod):
    """Chunk + embed + FAISS (or BM25 / hybrid) top-k retrieval into the prompt; LM: retrieved past chunks."""

    name = "vector_rag"
    families = ("lm", "rag", "dialogue")
    description = "chunked history, MiniLM + FAISS (or BM25/hybrid) top-k into the prompt"

    def __init__(self, lm, options=None, generator=None, prompt=None):
        super().__init__(lm, options, generator, prompt)
        o = self.options
        self.chunk_size = int(o.get("chunk_size", 128))
        self.chunk_overlap = int(o.get("chunk_overlap", 16))
        token_chunks(1, self.chunk_size, self.chunk_overlap)  # validates the pair
        self.retriever = str(o.get("retriever", "dense"))
        if self.retriever not in RETRIEVERS:
            raise UserError(f"retriever={self.retriever}: unknown; fix: use one of {', '.join(RETRIEVERS)}")
        self.index_kind = str(o.get("index", "flat"))
        self.top_k = int(o.get("top_k", 5))
        if self.top_k <= 0:
            raise UserError(f"top_k={self.top_k}: must be positive; fix: --method-arg top_k=5")
        self.budget = int(o.get("memory_budget") or 0)
        self.batch_size = int(o.get("batch_size", 4))
        self.embedder_tokens = 0
        self.reset()

    # ---- state --------------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Empty chunk store and indexes."""
        self.chunks: list[Chunk] = []
        self.dense = DenseIndex(embed_dim(), self.index_kind) \
            if self.retriever != "bm25" else None
        self.sparse: SparseIndex | None = None
        self._sparse_n = -1
        self.history = torch.empty(0, dtype=torch.long)
        self._prev = self.history

    def _add_chunks(self, chunks: list[Chunk]) -> None:
        if not chunks:
            return
        self.chunks.extend(chunks)
        if self.dense is not None:
            self.embedder_tokens += embed_tokens([c.text for c in chunks])
            self.dense.add(embed([c.text for c in chunks]))

    def _sparse(self) -> SparseIndex:
        if self._sparse_n != len(self.chunks):  # rebuilt lazily when chunks were added since the last query
            self.sparse = SparseIndex([c.text for c in self.chunks])
            self._sparse_n = len(self.chunks)
        return self.sparse

    def state_bytes(self) -> int:
        """Chunk text + FAISS index (with its vectors) + BM25 matrix."""
        text = sum(len(c.text.encode()) for c in self.chunks)
        dense = self.dense.nbytes() if self.dense is not None else 0
        sparse = self._sparse().nbytes() if self.retriever != "dense" and self.chunks else 0
        return text + dense + sparse

    def search(self, query: str, k: int) -> list[int]:
        """Positions of the ``k`` best chunks for ``query`` under the configured retriever, best first."""
        if not self.chunks or not query.strip():
            return []
        if self.retriever == "dense":
            self.embedder_tokens += embed_tokens([query])
            return [i for i, _ in self.dense.search(embed([query])[0], k)]
        if self.retriever == "bm25":
            return [i for i, _ in self._sparse().search(query, k)]
        depth = max(4 * k, 50)
        self.embedder_tokens += embed_tokens([query])
        dense = [i for i, _ in self.dense.search(embed([query])[0], depth)]
        sparse = [i for i, _ in self._sparse().search(query, depth)]
        return [i for i, _ in rrf([dense, sparse])[:k]]

    # ---- QA -----------------------------------------------------------------------------------------------
    def ingest(self, items) -> None:
        """Chunk every item into token windows and index the chunks."""
        tok = self.lm.tokenizer
        new: list[Chunk] = []
        for item in items:
            ids = tok(item.text, add_special_tokens=False)["input_ids"]
            for a, b in token_chunks(len(ids), self.chunk_size, self.chunk_overlap):
                text = item.text if (a, b) == (0, len(ids)) else tok.decode(ids[a:b])
                line = _item_line(MemoryItem(item.id, text, meta=item.meta))
                new.append(Chunk(text=text, item_id=item.id, line=line))
        self._add_chunks(new)

    def retrieve(self, question: str, now: float | None = None) -> tuple[str, list[str]]:
        """Top-k chunks (best first) and their item ids, deduplicated in rank order."""
        picked = self.search(question, self.top_k)
        if self.budget:
            tok, kept, used = self.lm.tokenizer, [], 0
            for i in picked:
                n = len(tok(self.chunks[i].line, add_special_tokens=False)["input_ids"]) + 1
                if used + n > self.budget:
                    break
                kept.append(i)
                used += n
            picked = kept
        ids = list(dict.fromkeys(self.chunks[i].item_id for i in picked))
        return "\n".join(self.chunks[i].line for i in picked), ids

    # ---- LM streams ---------------------------------------------------------------------------------------
    def _lm_context(self, query_ids: torch.Tensor) -> torch.Tensor:
        """Past tokens retrieved with ``query_ids``' text: ranked chunks up to the budget, merged, in order."""
        budget = self.budget or 512
        if not self.chunks or query_ids.numel() == 0:
            return self.history[:0]
        depth = min(len(self.chunks), 4 * (budget // max(1, self.chunk_size - self.chunk_overlap) + 2))
        order = self.search(self.lm.tokenizer.decode(query_ids.tolist()), depth)
        covered: set[int] = set()
        for i in order:
            span = set(range(self.chunks[i].start, self.chunks[i].end))
            if len(covered | span) > budget:
                continue
            covered |= span
            if len(covered) >= budget:
                break
        if not covered:
            return self.history[:0]
        return self.history[sorted(covered)]

    def _absorb(self, segment: torch.Tensor) -> None:
        """Append a scored segment to the history and index its chunks (bridging the previous segment)."""
        a = self.history.numel()
        self.history = torch.cat([self.history, segment])
        start = max(0, a - self.chunk_overlap) if a else 0
        tok, new = self.lm.tokenizer, []
        for s, e in token_chunks(self.history.numel() - start, self.chunk_size, self.chunk_overlap):
            s, e = s + start, e + start
            text = tok.decode(self.history[s:e].tolist())
            new.append(Chunk(text=text, item_id=f"tokens:{s}-{e}", line=text, start=s, end=e))
        self._add_chunks(new)

    def score_stream(self, segments: list[torch.Tensor]) -> list[torch.Tensor]:
        """Retrieve for each segment with the previous one, absorb it, then score all rows in batches."""
        t0 = time.perf_counter()
        prefix = torch.tensor([self.lm.prefix_token_id])
        rows, states, prev = [], [], torch.empty(0, dtype=torch.long)
        for seg in segments:
            ctx = self._lm_context(prev)
            rows.append((torch.cat([prefix, ctx, seg]), seg.numel()))
            self._absorb(seg)
            states.append(self.state_bytes())
            prev = seg
        out = _batched_nll(self.lm, rows, self.batch_size)
        self.tokens_processed += sum(ids.numel() for ids, _ in rows)
        self.segment_seconds = [(time.perf_counter() - t0) / max(1, len(segments))] * len(segments)
        self.segment_state_bytes = states
        return out

    def score_segment(self, segment_ids: torch.Tensor) -> torch.Tensor:
        """Score one segment with chunks retrieved by the previous segment, then absorb it."""
        ctx = self._lm_context(self._prev)
        row = torch.cat([torch.tensor([self.lm.prefix_token_id]), ctx, segment_ids])
        out = _batched_nll(self.lm, [(row, segment_ids.numel())], 1)[0]
        self.tokens_processed += row.numel()
        self._absorb(segment_ids)
        self._prev = segment_ids
        return out
