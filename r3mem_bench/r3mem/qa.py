"""R3Mem in the QA families: hierarchical memories of a corpus or history (document, paragraph, entity), their
retrieval by query likelihood and by name, and the two answering paths (reconstructions in the prompt, or the
memories' keys and values read directly)."""

from __future__ import annotations

import math
import re
import time
from typing import Iterable

import torch

from r3mem_bench.entities import EXTRACTORS, entity_contexts
from r3mem_bench.method import Answer, AnswerNLL, MemoryItem
from r3mem_bench.r3mem.layout import continuation_nll_after, greedy_after, rotate_keys
from r3mem_bench.scoring import token_nll

INGEST_CACHE_VERSION = 2  # bump when ingest's memories change for the same inputs: cached ones are recomputed
INGEST_INDEX, INGEST_TENSORS = "r3mem-ingest-index", "r3mem-ingest-memories"  # kinds of the run's ingest cache


def _valid_ingest(index, tensors) -> bool:
    """Whether a cached index and its tensors describe one ingest (bank entries with their memories)."""
    bank = index.get("bank") if isinstance(index, dict) else None
    return (isinstance(bank, list) and isinstance(index.get("tokens"), int) and isinstance(tensors, dict)
            and "document" in tensors and set(tensors) == {"document", *(f"bank/{i}" for i in range(len(bank)))}
            and all(isinstance(e, dict) and isinstance(e.get("ids"), list) and e.get("kind") in ("paragraph", "entity")
                    for e in bank))


class QAMixin:
    """Ingest, retrieval and answering of :class:`R3Mem` (the QA half of the ``MemoryMethod`` contract)."""

    ingest_batch = 16  # paragraph / entity memories compressed per pass (an execution setting, not an option)
    _ingest_started = _last_progress = 0.0  # progress lines of the ingest under way
    _ingest_tokens0 = 0

    # ---- QA: ingest / retrieve ---------------------------------------------------------------------------
    def _document_segments(self, items: list[MemoryItem]):
        """The segments the recurrent document memory reads, with the number of items finished after each: the
        items' tokens (each capped at ``max_item_tokens``) packed in order, a newline between items, into segments
        of at most ``segment_len`` tokens that end at item boundaries (an item longer than a segment is split
        into segment-sized chunks), so short dialogue turns are compressed as the training documents were: in
        segments of up to ``segment_len`` tokens, not one turn per pass."""
        S, cap = int(self.cfg["segment_len"]), int(self.cfg["max_item_tokens"])
        sep = self.lm.tokenizer("\n", add_special_tokens=False)["input_ids"]
        texts = [item.text for item in items]
        pack: list[int] = []
        for n, ids in enumerate(self.lm.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [], 1):
            ids = ids[:cap]
            joined = pack + sep + ids if pack else list(ids)
            if len(joined) <= S:
                pack = joined
            else:
                if pack:
                    yield pack, n - 1
                for start in range(0, max(0, len(ids) - S), S):  # all but the last chunk of a long item
                    yield ids[start: start + S], n - 1
                pack = ids[(max(0, len(ids) - 1) // S) * S:] if len(ids) > S else list(ids)
            if n == len(texts) and pack:
                yield pack, n

    @torch.no_grad()
    def _memories_of(self, texts: list[str], cap: int | None = None, what: str = "memories"
                     ) -> list[tuple[torch.Tensor, int]]:
        """Each text's memory [L,2,H,M,D] (its chunks of segment_len from the empty memory) and token count.

        Texts with the same number of chunks are compressed together, ``ingest_batch`` at a time in order of
        length (ragged rows right-padded: ``compress(lengths=...)``), so a history of short turns costs a few
        batched passes instead of one pass per turn.
        """
        S = int(self.cfg["segment_len"])
        ids = self._token_ids(texts, cap)
        out: list[tuple[torch.Tensor, int] | None] = [None] * len(ids)
        done, before = 0, self._ingest_tokens0
        for k, rows in self._memory_batches([len(x) for x in ids]):
            memory = self.empty_memory(batch=len(rows))
            for c in range(k):
                pieces = [ids[i][c * S: (c + 1) * S] for i in rows]
                width = max(len(p) for p in pieces)
                chunk = torch.tensor([p + [self.bos] * (width - len(p)) for p in pieces], device=self.lm.device)
                _, memory = self.compress(chunk, memory, lengths=[len(p) for p in pieces])
                self.tokens_processed += sum(1 + len(p) + self.M for p in pieces)
            for r, i in enumerate(rows):
                out[i] = (memory[:, :, r], len(ids[i]))
            done += len(rows)
            self._progress(what, done, len(ids), self.tokens_processed - before)
        return out  # type: ignore[return-value]

    def _token_ids(self, texts: list[str], cap: int | None = None) -> list[list[int]]:
        """Each text's token ids, capped at ``cap`` (default ``max_item_tokens``)."""
        cap = cap or int(self.cfg["max_item_tokens"])
        return [x[:cap] for x in self.lm.tokenizer(list(texts), add_special_tokens=False)["input_ids"]] if texts else []

    def _memory_batches(self, lengths: list[int]) -> list[tuple[int, list[int]]]:
        """How ``_memories_of`` compresses texts of these token counts: (chunks of segment_len, row indices) per
        batch; texts with the same number of chunks together, ``ingest_batch`` at a time in order of length."""
        S = int(self.cfg["segment_len"])
        by_chunks: dict[int, list[int]] = {}
        for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
            by_chunks.setdefault(-(-lengths[i] // S), []).append(i)
        return [(k, group[start: start + self.ingest_batch]) for k, group in sorted(by_chunks.items())
                for start in range(0, len(group), self.ingest_batch)]

    @staticmethod
    def _entity_texts(mentions: dict[str, list[tuple[str, str]]]) -> list[str]:
        """The text each entity memory compresses: its mentioning sentences, in order."""
        return [" ".join(s for _, s in m) for m in mentions.values()]

    def _progress(self, what: str, done: int, total: int, tokens: int) -> None:
        """An ingest progress line (at most every 10 s, and at the end of each step) through the runner's printer:
        items done, tokens run through the model since ingest started, their rate."""
        log, now = getattr(self, "ingest_log", None), time.perf_counter()
        if log is None or (done < total and now - self._last_progress < 10):
            return
        rate = tokens / max(now - self._ingest_started, 1e-9)
        log(f"r3mem: {what} {done}/{total} ({tokens:,} tokens, {rate:,.0f} tok/s)")
        self._last_progress = now

    def _ingest_cache_parts(self, items: list[MemoryItem]) -> dict | None:
        """What a cached ingest depends on (``r3mem_bench.ingest_cache``): the base model, the checkpoint's
        digest, the options that shape the memories and the items; None (no caching) for untrained weights or a
        bank that already holds memories."""
        from r3mem_bench.ingest_cache import digest, model_id

        if getattr(self, "ingest_cache", None) is None or not getattr(self, "checkpoint_digest", None) \
                or self.memory is not None or self.bank:
            return None
        shape = ("memory_tokens", "segment_len", "max_item_tokens", "max_entities", "entity_extractor",
                 "slot_layout", "slot_positions", "reader", "max_memory_tokens")
        return {"version": INGEST_CACHE_VERSION, "hierarchy": self.hierarchy,  # r3mem_kv reuses r3mem's memories
                "paragraphs": self._reads_paragraphs(),
                "model": model_id(self.lm), "checkpoint": self.checkpoint_digest,
                "options": {k: self.cfg[k] for k in shape}, "items": digest([[i.id, i.text] for i in items])}

    @torch.no_grad()
    def ingest(self, items: Iterable[MemoryItem]) -> None:
        """Compress each item into a paragraph memory, frequent entities into entity memories, all into a document
        memory. With the run's ingest cache, the memories of the same items, checkpoint and options are read back
        (and count the tokens they cost when they were computed) instead of computed again."""
        items = list(items)
        parts = self._ingest_cache_parts(items)
        if parts is not None:
            index = self.ingest_cache.get(INGEST_INDEX, parts)
            tensors = self.ingest_cache.get(INGEST_TENSORS, parts) if isinstance(index, dict) else None
            if tensors is not None and _valid_ingest(index, tensors):
                self.memory = tensors["document"]
                self.bank = [{**e, "memory": tensors[f"bank/{i}"]} for i, e in enumerate(index["bank"])]
                self.tokens_processed += int(index["tokens"])
                return
        before = self.tokens_processed
        self._ingest(items)
        if parts is not None:
            tensors = {"document": self.memory.contiguous(),
                       **{f"bank/{i}": e["memory"].contiguous() for i, e in enumerate(self.bank)}}
            self.ingest_cache.put(INGEST_TENSORS, parts, tensors)  # tensors first: an index never points at nothing
            self.ingest_cache.put(INGEST_INDEX, parts, {"tokens": self.tokens_processed - before, "bank": [
                {k: v for k, v in e.items() if k != "memory"} for e in self.bank]})

    @torch.no_grad()
    def _ingest(self, items: list[MemoryItem]) -> None:
        """``ingest`` computed: the recurrent document memory, then (hierarchy) paragraph and entity memories."""
        self._ingest_started, self._last_progress = time.perf_counter(), 0.0
        self._ingest_tokens0 = before = self.tokens_processed
        doc = self.memory if self.memory is not None else self.empty_memory()
        for segment, done in self._document_segments(items):
            _, doc = self.compress(torch.tensor([segment], device=self.lm.device), doc)
            self.tokens_processed += 1 + len(segment) + self.M
            self._progress("document memory", done, len(items), self.tokens_processed - before)
        self.memory = doc
        if not self.hierarchy:
            return
        if self._reads_paragraphs():
            memories = self._memories_of([item.text for item in items], what="paragraph memories")
            for item, (memory, n) in zip(items, memories):
                self.bank.append({"ids": [item.id], "kind": "paragraph", "memory": memory.half(), "tokens": n})
        mentions = self._frequent_entities(items)
        memories = self._memories_of(self._entity_texts(mentions), cap=int(self.cfg["segment_len"]),
                                     what="entity memories")
        for (ent, mention), (memory, n) in zip(mentions.items(), memories):
            self.bank.append({"ids": sorted({i for i, _ in mention}), "kind": "entity", "key": ent,
                              "memory": memory.half(), "tokens": n})

    def _reads_paragraphs(self) -> bool:
        """Whether an answer can read paragraph memories (``top_k`` > 0); with ``top_k=0`` (the empty-memory
        control) none is computed."""
        return int(self.cfg["top_k"]) > 0

    def _frequent_entities(self, items: list[MemoryItem]) -> dict[str, list[tuple[str, str]]]:
        """The ``max_entities`` entities named in at least two items, most mentioned first, with their
        (item id, sentence) mentions."""
        mentions: dict[str, list[tuple[str, str]]] = {}
        extractor = EXTRACTORS[self.cfg["entity_extractor"]]
        for item in items:
            for ent, sents in entity_contexts(item.text, min_mentions=1, extractor=extractor).items():
                mentions.setdefault(ent, []).extend((item.id, s) for s in sents)
        frequent = sorted((e for e, m in mentions.items() if len({i for i, _ in m}) >= 2),
                          key=lambda e: (-len(mentions[e]), e))[: int(self.cfg["max_entities"])]
        return {e: mentions[e] for e in frequent}

    @torch.no_grad()
    def ingest_estimate(self, corpora: list[list[MemoryItem]]) -> tuple[float, str] | None:
        """Compress passes the ingest needs (the document memory's packed segments one at a time; paragraph and
        entity memories in batches) times the seconds of one pass, measured now on rows of the mean length."""
        S = int(self.cfg["segment_len"])
        cache = getattr(self, "ingest_cache", None)
        todo = []
        for items in corpora:
            parts = self._ingest_cache_parts(list(items))
            if not (parts is not None and cache.has(INGEST_INDEX, parts) and cache.has(INGEST_TENSORS, parts)):
                todo.append(list(items))
        if not todo:
            return 0.0, "ingest cached"
        segments: list[int] = []  # lengths of the document memory's segments
        items_len: list[int] = []
        batched = 0  # passes of up to ingest_batch rows
        for items in todo:
            segments += [len(seg) for seg, _ in self._document_segments(items)]
            if self.hierarchy:  # paragraph then entity memories, batched as _memories_of batches them
                n = [len(x) for x in self._token_ids([i.text for i in items])]
                entities = [len(x) for x in self._token_ids(self._entity_texts(self._frequent_entities(items)), S)]
                passes = (n, entities) if self._reads_paragraphs() else (entities,)
                items_len += n
                batched += sum(k for lengths in passes for k, _ in self._memory_batches(lengths))

        def timed(rows: int, lengths: list[int]) -> float:  # seconds of one compress pass of rows x mean length
            width = max(1, min(S, round(sum(lengths) / max(1, len(lengths)))))
            chunk = torch.full((rows, width), self.bos, device=self.lm.device)
            t = time.perf_counter()
            self.compress(chunk, self.empty_memory(batch=rows))
            return time.perf_counter() - t

        timed(1, segments)  # untimed: first-call costs
        t1 = timed(1, segments)
        tb = timed(self.ingest_batch, items_len) if batched else 0.0
        seconds = len(segments) * t1 + batched * tb
        return seconds, (f"{len(segments):,} compress passes x {t1 * 1e3:.0f} ms + {batched:,} batched passes x "
                         f"{tb * 1e3:.0f} ms, timed now")

    @torch.no_grad()
    def _query_scores(self, question: str, memories: list[torch.Tensor]) -> list[float]:
        """How much each memory lowers the question's NLL through the read path (nats/token; higher = closer)."""
        ids = self.lm.tokenizer(question, add_special_tokens=False)["input_ids"][:64]
        if not ids or not memories:
            return [0.0] * len(memories)
        q = torch.tensor([ids], device=self.lm.device)
        base, _ = self.read(q, self.empty_memory(), write=False)
        base_nll = token_nll(base, q).mean()
        scores = []
        for start in range(0, len(memories), 16):
            batch = torch.stack(memories[start: start + 16], dim=2).float()  # [L,2,B,H,M,D]
            B = batch.shape[2]
            logits, _ = self.read(q.expand(B, -1), batch, write=False)
            nll = token_nll(logits, q.expand(B, -1)).mean(-1)
            scores.extend((base_nll - nll).tolist())
            self.tokens_processed += B * self.read_cost(q.shape[1], batch.shape[-2], False)
        return scores

    @torch.no_grad()
    def _choose(self, question: str) -> list[dict]:
        """The bank entries for ``question``: the ``top_k`` paragraph memories by query likelihood, then up to two
        entity memories whose name the question mentions."""
        paragraphs = [e for e in self.bank if e["kind"] == "paragraph"]
        scores = self._query_scores(question, [e["memory"] for e in paragraphs])  # none with top_k=0: no scoring
        k = int(self.cfg["top_k"])
        chosen = [paragraphs[i] for i in sorted(range(len(paragraphs)), key=lambda i: -scores[i])[:k]]
        lowered = question.lower()
        named = [e for e in self.bank if e["kind"] == "entity"
                 and re.search(rf"\b{re.escape(e['key'].lower())}\b", lowered)]
        return chosen + named[:2]

    @torch.no_grad()
    def retrieve(self, question: str, now: float | None = None) -> tuple[str, list[str]]:
        """Reconstruct the memories most relevant to ``question``; the reconstructions are the context."""
        if not self.hierarchy:  # document level only: reconstruct the recurrent memory
            if self.memory is None:
                return "", []
            return self.reconstruct(self.memory), []
        chosen = self._choose(question)
        if not chosen:
            return "", []
        memory = torch.stack([e["memory"] for e in chosen], dim=2).float()
        caps = [min(int(e["tokens"]) + 8, int(self.cfg["recon_max_tokens"])) for e in chosen]
        texts = [self.lm.tokenizer.decode(x) for x in self.reconstruct_ids(memory, caps)]
        ids = list(dict.fromkeys(i for e in chosen for i in e["ids"]))
        return "\n".join(t.strip() for t in texts if t.strip()), ids

    # ---- QA: answering from the memories themselves (qa_reader=memory) --------------------------------------
    @torch.no_grad()
    def _answer_memory(self, question: str) -> tuple[torch.Tensor, list[str]]:
        """The memory the answer reads [L,2,1,H,Mt,D] and the item ids behind it.

        The chosen memories (``_choose``; the recurrent document memory without hierarchy), as many as fit in the
        checkpoint's ``max_memory_tokens`` slots, side by side in rank order. With ``slot_positions=ordered``
        memory j's slots are moved after memory j-1's (keys rotated by j*M), as the slots of one larger memory;
        with ``collapsed`` every slot already sits at position 1.
        """
        if not self.hierarchy:
            return (self.memory if self.memory is not None else self.empty_memory()), []
        room = max(1, int(self.cfg["max_memory_tokens"]) // self.M)
        chosen = self._choose(question)[:room]
        if not chosen:
            return self.empty_memory(), []
        memory = self.side_by_side([e["memory"].float().unsqueeze(2) for e in chosen])
        return memory, list(dict.fromkeys(i for e in chosen for i in e["ids"]))

    def side_by_side(self, memories: list[torch.Tensor]) -> torch.Tensor:
        """Memories [L,2,B,H,M,D] as the slots of one larger memory [L,2,B,H,n*M,D], in order: with
        ``slot_positions=ordered`` memory j's keys move after memory j-1's (rotated by j*M); with ``collapsed``
        every slot already sits at position 1."""
        parts = []
        for j, mem in enumerate(memories):
            if j and self.cfg["slot_positions"] == "ordered":
                mem = torch.stack([rotate_keys(mem[:, 0], j * mem.shape[-2], self.rotary), mem[:, 1]], dim=1)
            parts.append(mem)
        return torch.cat(parts, dim=-2)

    @torch.no_grad()
    def _read_prompt(self, question: str) -> tuple[torch.Tensor, torch.Tensor, int, list[str]]:
        """Run ``[BOS][memory][read marker][closed-book prompt]`` through the reading adapter.

        Returns the logits [1, V] of the first answer token, the KV [L,2,1,H,P,D] after the prompt, the number of
        positions read (also the position of the next token) and the item ids behind the memory.
        """
        memory, ids = self._answer_memory(question)
        prompt = self._encoder().encode(self.prompt.render(question=question, context=""))
        past, hidden, kv = self.read_after(memory, prompt)
        return self.lm_head(hidden[:, -1]), torch.cat([past, kv], dim=-2), memory.shape[-2] + 2 + len(prompt), ids

    def read_after(self, memory: torch.Tensor, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``ids`` read through the reading adapter after ``[BOS][memory][read marker]`` (``memory``
        [L,2,1,H,Mt,D]; the answer path and the QA training level). Returns the KV before the marker
        [L,2,1,H,1+Mt,D], hidden states [1, 1+len(ids), d] (index i predicts ids[i]) and their KV."""
        self._use("expand")
        read_marker = self.embed(torch.full((1, 1), self.bos, device=self.lm.device))  # [1, 1, d]
        past = torch.cat([self._bos_kv("expand", 1), memory], dim=-2)  # [L,2,1,H,1+Mt,D]
        text = self.embed(torch.tensor([ids], device=self.lm.device))  # [1, P, d]
        hidden, kv = self._forward(past, torch.cat([read_marker, text], dim=1), memory.shape[-2] + 1)
        return past, hidden, kv

    def shared_prompt_answers(self) -> bool:
        """``qa_reader=reconstruct`` answers through the shared prompt (reconstructions as context)."""
        return self.cfg["qa_reader"] != "memory"

    @torch.no_grad()
    def answer(self, question: str, now: float | None = None) -> Answer:
        """``qa_reader=reconstruct``: the shared prompt with the reconstructions as context. ``qa_reader=memory``:
        greedy decoding from ``[BOS][memories][read marker][closed-book prompt]`` (no text context)."""
        if self.cfg["qa_reader"] != "memory":
            return super().answer(question, now=now)
        logits, past, read, ids = self._read_prompt(question)
        max_new = int(getattr(self.generator, "max_new_tokens", 32))
        out = greedy_after(self._forward, self.embed, self.lm_head, past, logits, read, max_new, self.eos)
        self.tokens_processed += read + len(out)
        text = self.lm.tokenizer.decode(out, skip_special_tokens=True).strip()
        return Answer(text=text, retrieved_ids=ids, prompt_tokens=read, context="")

    @torch.no_grad()
    def answer_nll(self, question: str, texts: list[str], now: float | None = None,
                   given: Answer | None = None) -> AnswerNLL | None:
        """Mean per-token NLL of each text as the answer: after the shared prompt with the reconstructions
        (``qa_reader=reconstruct``) or after ``[BOS][memories][read marker][closed-book prompt]`` (``memory``)."""
        if self.cfg["qa_reader"] != "memory":
            return self.prompt_answer_nll(question, texts, now=now, given=given)
        gen = self._encoder()
        last, past, read, ids = self._read_prompt(question)
        if given is None:
            self.tokens_processed += read
        conts = [gen.continuation_ids(text)[: self.lm.max_length // 2] for text in texts]
        scored = continuation_nll_after(self._forward, self.embed, self.lm_head, past, last, read, conts)
        return AnswerNLL([s for s, _ in scored], [n for _, n in scored], read, ids, "")

    # ---- diagnostics -------------------------------------------------------------------------------------
    @torch.no_grad()
    def reconstruction_report(self, text: str, empty: bool = False, greedy: bool = True) -> dict:
        """Per chunk of ``text``: teacher-forced token accuracy and NLL from its memory (or the empty memory), and
        (``greedy``) the greedy reconstruction with its ROUGE-L."""
        ids = self.lm.tokenizer(text, add_special_tokens=False)["input_ids"]
        S = int(self.cfg["segment_len"])
        rows = []
        for start in range(0, len(ids), S):
            chunk = torch.tensor([ids[start: start + S]], device=self.lm.device)
            memory = self.empty_memory() if empty else self.compress(chunk, self.empty_memory())[1]
            logits = self.expand_logits(memory, chunk)
            rows.append({"tokens": chunk.shape[1], "correct": int((logits.argmax(-1) == chunk).sum()),
                         "nll": float(token_nll(logits, chunk).sum()),
                         "text": self.lm.tokenizer.decode(chunk[0]),
                         "reconstruction": self.reconstruct(memory, chunk.shape[1] + 8) if greedy else ""})
        n = sum(r["tokens"] for r in rows)
        return {"chunks": rows, "token_accuracy": sum(r["correct"] for r in rows) / max(1, n),
                "ppl": math.exp(sum(r["nll"] for r in rows) / max(1, n)),
                "rouge_l": float(sum(rouge_l(r["text"], r["reconstruction"]) * r["tokens"] for r in rows) / max(1, n))
                if greedy else None}


def rouge_l(reference: str, candidate: str) -> float:
    """ROUGE-L F1 over whitespace tokens (longest common subsequence)."""
    ref, cand = reference.split(), candidate.split()
    if not ref or not cand:
        return 0.0
    prev = [0] * (len(cand) + 1)
    for r in ref:
        cur = [0]
        for j, c in enumerate(cand):
            cur.append(prev[j] + 1 if r == c else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, rec = lcs / len(cand), lcs / len(ref)
    return 2 * p * rec / (p + rec)
