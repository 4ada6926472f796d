"""Reference methods: ``full_context`` (the ceiling) and ``no_memory`` (a sliding window, the floor)."""

from __future__ import annotations

import math
import time

import torch

from r3mem_bench.method import MemoryItem, MemoryMethod
from r3mem_bench.methods.registry import register_method
from r3mem_bench.scoring import kv_bytes, scored_nll


def _batched_nll(lm, rows: list[tuple[torch.Tensor, int]], batch_size: int) -> list[torch.Tensor]:
    """NLL of the last ``n`` tokens of each id row [L_i] (right-padded batches); returns [n] per row."""
    out: list[torch.Tensor] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        width = max(ids.numel() for ids, _ in chunk)
        input_ids = torch.full((len(chunk), width), lm.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, (ids, _) in enumerate(chunk):
            input_ids[i, : ids.numel()] = ids
            mask[i, : ids.numel()] = 1
        spans = [(ids.numel() - n - 1, ids.numel() - 1) for ids, n in chunk]
        with torch.no_grad():
            out.extend(scored_nll(lm, input_ids, mask, spans))
    return out


class _StreamMethod(MemoryMethod):
    """Shared bookkeeping for the reference methods' LM streams."""

    def _record(self, segments: list[torch.Tensor], elapsed: float, states: list[int]) -> None:
        self.segment_seconds = [elapsed / max(1, len(segments))] * len(segments)
        self.segment_state_bytes = states


@register_method
class FullContext(_StreamMethod):
    """Every token sees the whole history up to the model's maximum length (the ceiling).

    LM: one forward pass when the document fits ``max_context`` (default: the model's maximum length); beyond it,
    windows of ``max_context`` tokens end at segment boundaries and advance by ``stride`` tokens (default half the
    window), so each token keeps at least ``max_context - stride`` tokens of context, as lm-eval's rolling
    windows do for their last window. The first window (whose tokens see the document start) is sized so that no
    more windows follow than necessary: a document just over the window costs two forward passes, not three.
    QA: the whole corpus/history in the prompt, truncated from the front.
    """

    name = "full_context"
    description = "whole history in context, up to the model's window (ceiling)"

    def __init__(self, lm, options=None, generator=None, prompt=None):
        super().__init__(lm, options, generator, prompt)
        self.max_context = int(self.options.get("max_context") or lm.max_length)
        self.stride = int(self.options.get("stride") or self.max_context // 2)
        self.items: list[MemoryItem] = []

    def reset(self) -> None:
        self.items = []

    def score_stream(self, segments: list[torch.Tensor]) -> list[torch.Tensor]:
        t0 = time.perf_counter()
        prefix = torch.tensor([self.lm.prefix_token_id])
        tokens = torch.cat([prefix] + segments)  # [1 + N]
        n = tokens.numel() - 1
        nll = torch.empty(n)
        if tokens.numel() <= self.max_context:
            nll[:] = _batched_nll(self.lm, [(tokens, n)], 1)[0]
            self.tokens_processed += tokens.numel()
        else:
            bounds = torch.cumsum(torch.tensor([s.numel() for s in segments]), 0).tolist()
            first_end = self._first_window_end(bounds, n)
            done = 0  # tokens scored so far (positions 1..done of `tokens`)
            while done < n:
                end = next(b for b in bounds if b > done)  # at least the next segment boundary
                for b in bounds:  # then whole segments while the chunk stays within `stride` tokens
                    if b > end and b - done <= self.stride:
                        end = b
                if done == 0 and first_end:
                    end = first_end
                end = min(end, done + self.max_context - 1)
                start = max(0, end + 1 - self.max_context)
                window = tokens[start: end + 1]
                nll[done:end] = _batched_nll(self.lm, [(window, end - done)], 1)[0]
                self.tokens_processed += window.numel()
                done = end
        out, pos = [], 0
        states = []
        for seg in segments:
            out.append(nll[pos: pos + seg.numel()])
            pos += seg.numel()
            states.append(kv_bytes(self.lm, min(pos, self.max_context)))
        self._record(segments, time.perf_counter() - t0, states)
        return out

    def _first_window_end(self, bounds: list[int], n: int) -> int:
        """End of the first window (its tokens see the document start): the smallest segment boundary that fits
        the window and still needs no more ``stride`` windows after it than the largest one would (0: none fits)."""
        fits = [b for b in bounds if b < self.max_context]
        if not fits:
            return 0
        need = math.ceil((n - fits[-1]) / self.stride)
        return next(b for b in fits if math.ceil((n - b) / self.stride) <= need)

    def score_segment(self, segment_ids: torch.Tensor) -> torch.Tensor:
        return self.score_stream([segment_ids])[0]

    def ingest(self, items) -> None:
        self.items.extend(items)

    def retrieve(self, question: str, now=None) -> tuple[str, list[str]]:
        """All items, newest last, truncated from the front to fit the generator's prompt budget."""
        tok = self.lm.tokenizer
        if self.generator is not None and self.prompt is not None:  # room left by system, template and question
            overhead = len(self.generator.encode(self.prompt.render(question=question, context="-")))
            budget = self.generator.max_prompt_tokens - overhead - 8
        else:
            budget = self.max_context
        budget = min(budget, int(self.options.get("max_context_tokens") or budget))
        kept, used = [], 0
        for item in reversed(self.items):
            n = len(tok(_item_line(item), add_special_tokens=False)["input_ids"]) + 1  # +1: the newline
            if used + n > budget:
                break
            kept.append(item)
            used += n
        kept.reverse()
        return "\n".join(_item_line(i) for i in kept), [i.id for i in kept]

    def state_bytes(self) -> int:
        return sum(len(i.text.encode()) for i in self.items)


def _item_line(item: MemoryItem) -> str:
    """An item as one prompt line, with its date when it has one."""
    date = item.meta.get("date")
    return f"[{date}] {item.text}" if date else item.text


@register_method
class NoMemory(_StreamMethod):
    """No memory: each segment sees only the last ``window`` tokens before it (default 0: the segment alone).

    QA: closed book, the question alone.
    """

    name = "no_memory"
    retrieves = False
    description = "current segment / sliding window only; closed-book QA (floor)"

    def __init__(self, lm, options=None, generator=None, prompt=None):
        super().__init__(lm, options, generator, prompt)
        self.window = int(self.options.get("window", 0))
        self.batch_size = int(self.options.get("batch_size", 4))

    def score_stream(self, segments: list[torch.Tensor]) -> list[torch.Tensor]:
        t0 = time.perf_counter()
        prefix = torch.tensor([self.lm.prefix_token_id])
        history = torch.cat(segments) if segments else torch.empty(0, dtype=torch.long)
        rows, pos = [], 0
        for seg in segments:
            ctx = history[max(0, pos - self.window): pos] if self.window else history[:0]
            rows.append((torch.cat([prefix, ctx, seg]), seg.numel()))
            pos += seg.numel()
        out = _batched_nll(self.lm, rows, self.batch_size)
        self.tokens_processed += sum(ids.numel() for ids, _ in rows)
        self._record(segments, time.perf_counter() - t0, [kv_bytes(self.lm, self.window)] * len(segments))
        return out

    def score_segment(self, segment_ids: torch.Tensor) -> torch.Tensor:
        return self.score_stream([segment_ids])[0]

    def lm_state_bytes(self) -> int:
        """The key/value cache of the ``window`` tokens carried into the next segment."""
        return kv_bytes(self.lm, self.window)

    def ingest(self, items) -> None:
        """Closed book: nothing is stored."""

    def retrieve(self, question: str, now=None) -> tuple[str, list[str]]:
        return "", []
