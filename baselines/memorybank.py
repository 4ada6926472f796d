"""MemoryBank: a per-user long-term memory with LLM summaries, a user portrait and Ebbinghaus forgetting.

Paper: Zhong, Guo, Gao, Ye, Wang, "MemoryBank: Enhancing Large Language Models with Long-Term Memory", AAAI 2024
(arXiv 2305.10250). Official code: zhongwanjun/MemoryBank-SiliconFriend @ cf61c4196e4cfdb0f2b7a0316249fa40312dc3a9,
read in ``memory_bank/memory_retrieval/forget_memory.py`` (forgetting curve, strength/recall update, FAISS search,
memories grouped by date), ``memory_bank/summarize_memory.py`` (the English summary, portrait and overall prompts)
and ``utils/prompt_utils.py`` (the [memory] + date + personality prompt).

The memory store (one per corpus or conversation, ``self.bank``, a plain JSON-able dict):

* ``memories``: the raw items (dialogue turns or passages) with their timestamp, day (UTC date), memory strength
  ``S`` (starts at 1) and last-recall time (starts at the item's timestamp).
* ``days``: per day, an event summary and a personality analysis written by the base model with the official
  English prompts (``summarize_content_prompt`` / ``summarize_person_prompt``, capped at ``summary_tokens`` new
  tokens), and ``overall_history`` / ``overall_personality`` (the user portrait) summarising all days
  (``summarize_overall_prompt`` / ``summarize_overall_personality``). Generation goes through the base model
  (greedy, the official summariser system prompt); its prompt and output tokens count in ``tokens_processed``.
* ``save(path)`` / ``load(path)``: the bank as JSON; embeddings are recomputed on load (same embedder).

Summaries cost most of the ingest (a LoCoMo conversation: ~28 days, 58 generations), so they are written once per
run directory: the runner gives the method the run's ingest cache (``r3mem_bench.ingest_cache``), and each batch
of summary prompts is stored under a key of its exact prompts, the model (weights digest, tokenizer, dtype,
device, torch/transformers versions), ``summary_tokens``, ``summary_prompt_tokens``, the summariser system prompt
and ``SUMMARY_PROMPT_VERSION``; a rerun, a resume, a larger ``--limit`` or ``memorybank_noforget`` next to
``memorybank`` read them back (forgetting, ``top_k`` and the budget do not shape summaries). Cached summaries count
the tokens they cost when generated, so the rows of a warm run equal a cold run's (only ``ingest_s`` is shorter).
``summary_batch_size`` (default 1, one prompt at a time as the numbers in ``results/`` were made) generates that
many prompts of a conversation at once, left-padded, in a fixed order (each day's event then personality
prompt, then the overall two), each batch one cache entry. Batched greedy outputs equalled unbatched ones on every
prompt tried (SmolLM2-135M, CPU fp32: the 60 summaries of LoCoMo's conv-43 and the 58 of the generated LoCoMo-size
conversation at batch 8, ``results/benchmarks/dialogue_ingest*.json``; tiny-random: 16 prompts, batch 4 and 8),
but padding changes the shapes of the matrix products, so a greedy tie could in principle break otherwise; the
option is recorded in the manifest whenever it is given. Ingest progress (``[done/total] summaries (d/n days),
tok/s``) goes to stderr through the runner's ``ingest_log``.

Forgetting (Ebbinghaus): retention ``R = exp(-t / S)`` with ``S`` the memory's strength and ``t`` the time since
it was learned or last recalled, in units of ``time_unit_days`` days: ``t = (now - last_recall) / (86400 *
time_unit_days)``, ``now`` = the question's time (``forgetting=paper``, default). ``time_unit_days`` defaults to 1,
the official unit: ``forgetting_curve(t, S)`` takes "Time elapsed since the information was learned (in days)",
computed by ``_get_date_difference(last_recall_date, now_date)`` between ``%Y-%m-%d`` dates. On that scale a memory
not recalled for a month is all but gone (``exp(-30)`` at ``S = 1``): on the generated persona task, whose sessions
lie 33 to 50 days apart, every session but the last is forgotten before the first question (asked a day after the
last session, where each memory of the last one survives with probability ``exp(-1)``). ``time_unit_days=30`` puts
the curve on a monthly scale, and ``memorybank_noforget`` is the same method with no forgetting (the control). The
official code computes ``math.exp(-t / 5*S)`` = ``exp(-t * S / 5)`` (``forgetting=official``; note it makes strong
memories fade faster); ``forgetting=none`` keeps everything.
Each memory survives a forgetting pass with probability R: a draw ``u ~ U[0, 1)`` from
``np.random.default_rng([seed, crc32(corpus), day])`` forgets it when ``u > R``, as the official
``random.random() > retention_probability``. As in the official code, which forgets when it loads the memory
file, a pass runs once per day of the clock (the first question asked on a new day of ``now``); forgotten items
are gone for good. Recall: each retrieved memory gets ``S += 1`` and its last-recall time set to ``now``.
The QA protocol asks a conversation's questions in time order, so a recall's strength update is in place before
the next question's forgetting pass; a resumed run first replays (``replay``) the recalls of the questions it
answered before, so its numbers equal an uninterrupted run's.
Day summaries are not forgotten on their own (a day's summary is dropped when all its turns are), as in the
official loader. Items without a timestamp (a static RAG corpus) are never forgotten and have no day
summaries, so on ``rag`` tasks MemoryBank is dense retrieval over the passages with the official memory format.

Retrieval: all-MiniLM-L6-v2 (the official English embedder, ``minilm-l6``) + FAISS inner product over the live
raw memories and the day summaries; the ``top_k`` best (default 5; the official ``VECTOR_SEARCH_TOP_K`` is 6)
are sorted by date like the official ``search_memory`` and put in the prompt with their dates, after the overall
summary and the user portrait. ``retrieved_ids`` are the item ids (day summaries appear as ``summary:<day>``).

Official retrieval details as options: ``widen_chars=200`` widens each hit as the official
``similarity_search_with_score_by_vector`` does (neighbours of the same date in store order join it while the
text stays within ``CHUNK_SIZE`` = 200 characters; adjacent chosen documents merge into one; every id in a merged
document counts as retrieved and is recalled), and ``top_k=6`` is the official ``VECTOR_SEARCH_TOP_K``. The
official walk over neighbours runs ``range(1, max(i, len(docs) - i))`` with ``docs`` the still-empty result list,
so a hit at store index i looks at most i - 1 places away (none for the first two documents); the widening here
walks as far as the budget allows, which is what the character budget describes.

Deviations from the official code: memories are whole items (the official splits turns into sentences with a
Chinese text splitter and re-merges neighbours up to 200 characters); by default a hit is not widened
(``widen_chars=0``) and ``top_k`` is vector RAG's 5, so the two retrieve the same number of items; ``t`` is a fractional number of time units
rather than a whole calendar-date difference; the base model (SmolLM2) writes the summaries instead of
gpt-3.5-turbo (temperature 0.7, 400 tokens), greedily and shorter; the answer uses the benchmark's shared prompt
and generator so all methods are compared alike, with MemoryBank's [memory] block as the context.
"""

from __future__ import annotations

import datetime as dt
import inspect
import json
import math
import time
import zlib
from pathlib import Path

import numpy as np

from r3mem_bench.baselines._retrieval import DenseIndex, embed, embed_dim
from r3mem_bench.errors import UserError
from r3mem_bench.method import MemoryItem, MemoryMethod
from r3mem_bench.methods.registry import register_method

FORGETTING = ("paper", "official", "none")
DAY = 86400.0
SUMMARY_SYSTEM = ("Below is a transcript of a conversation between a human and an AI assistant that is intelligent "
                  "and knowledgeable in psychology.")
SUMMARY_PROMPT_VERSION = 1  # bump when the summary prompts or their handling change: cached summaries are redone
SUMMARY_CACHE = "memorybank-summaries"  # kind of the run's ingest-cache entries (r3mem_bench.ingest_cache)


def summary_batch_size(value) -> int:
    """The ``summary_batch_size`` option as a positive whole number."""
    try:
        size = int(float(value))
    except (TypeError, ValueError, OverflowError):
        size = 0
    if size < 1 or float(value) != size:
        raise UserError(f"summary_batch_size={value}: not a positive whole number; fix: --method-arg "
                        "summary_batch_size=1 (one summary at a time, the default) or another such as 8")
    return size


def _valid_summaries(payload, n: int) -> bool:
    """Whether a cached payload holds ``n`` summaries of the shape ``MemoryBank._summarize`` stores."""
    rows = payload.get("summaries") if isinstance(payload, dict) else None
    return isinstance(rows, list) and len(rows) == n and all(
        isinstance(r, dict) and isinstance(r.get("text"), str)
        and all(type(r.get(k)) is int and r[k] >= 0 for k in ("prompt_tokens", "new_tokens")) for r in rows)


def retention(t: float, strength: float, variant: str = "paper") -> float:
    """Ebbinghaus retention after ``t`` time units: ``exp(-t/S)`` (paper), ``exp(-t*S/5)`` (official code) or 1."""
    if variant == "none":
        return 1.0
    t = max(0.0, float(t))
    if variant == "paper":
        return math.exp(-t / float(strength))
    if variant == "official":
        return math.exp(-t / 5 * float(strength))
    raise UserError(f"forgetting={variant}: unknown; fix: use one of {', '.join(FORGETTING)}")


def time_unit(value) -> float:
    """The ``time_unit_days`` option as a positive number of days."""
    try:
        unit = float(value)
    except (TypeError, ValueError):
        unit = float("nan")
    if not (math.isfinite(unit) and unit > 0):
        raise UserError(f"time_unit_days={value}: not a positive number of days; fix: --method-arg time_unit_days=1 "
                        "(the official day) or another positive number such as 30")
    return unit


def day_of(timestamp: float) -> str:
    """UTC calendar day ``YYYY-MM-DD`` of a timestamp in seconds."""
    return dt.datetime.fromtimestamp(float(timestamp), tz=dt.timezone.utc).strftime("%Y-%m-%d")


# ---- the official English prompts (memory_bank/summarize_memory.py), with our item lines as the dialogue ----
def content_prompt(lines: list[str]) -> str:
    """Event summary prompt of one day (``summarize_content_prompt``)."""
    return ("Please summarize the following dialogue as concisely as possible, extracting the main themes and key "
            "information. If there are multiple key events, you may summarize them separately. Dialogue content:\n"
            + "".join(f"\n{line}" for line in lines) + "\nSummarization：")


def person_prompt(lines: list[str], user: str, bot: str = "AI") -> str:
    """Personality prompt of one day (``summarize_person_prompt``)."""
    return (f"Based on the following dialogue, please summarize {user}'s personality traits and emotions, and devise "
            f"response strategies based on your speculation. Dialogue content:\n" + "".join(f"\n{x}" for x in lines)
            + f"\n{user}'s personality traits, emotions, and {bot}'s response strategy are:")


def overall_history_prompt(days: list[tuple[str, str]]) -> str:
    """Overall event summary prompt (``summarize_overall_prompt``)."""
    return ("Please provide a highly concise summary of the following event, capturing the essential key "
            "information as succinctly as possible. Summarize the event:\n"
            + "".join(f"At {d}, the events are {s.strip()}" for d, s in days) + "\nSummarization：")


def overall_personality_prompt(days: list[tuple[str, str]]) -> str:
    """User portrait prompt (``summarize_overall_personality``)."""
    return ("The following are the user's exhibited personality traits and emotions throughout multiple dialogues, "
            "along with appropriate response strategies for the current situation:"
            + "".join(f"\nAt {d}, the analysis shows {s.strip()}" for d, s in days)
            + "\nPlease provide a highly concise and general summary of the user's personality and the most "
              "appropriate response strategy for the AI lover, summarized as:")


def _unit(run: list[dict]) -> dict:
    """What one retrieval hit puts in the prompt: documents adjacent in store order (one without widening), with
    the first one's day and kind (for the date order) and every id and kind (for recall)."""
    return {"ids": [d["id"] for d in run], "day": run[0]["day"], "kind": run[0]["kind"],
            "kinds": [d["kind"] for d in run], "line": "\n".join(d["line"] for d in run)}


@register_method
class MemoryBank(MemoryMethod):
    """Dated memories + LLM day summaries and user portrait, Ebbinghaus forgetting, MiniLM/FAISS recall."""

    name = "memorybank"
    families = ("rag", "dialogue")
    description = "MemoryBank: dated memories, LLM summaries + portrait, Ebbinghaus forgetting, FAISS recall"

    def __init__(self, lm, options=None, generator=None, prompt=None):
        super().__init__(lm, options, generator, prompt)
        o = self.options
        self.forgetting = str(o.get("forgetting", "paper"))
        retention(0.0, 1.0, self.forgetting)  # validates the name
        self.time_unit_days = time_unit(o.get("time_unit_days", 1.0))
        self.top_k = int(o.get("top_k", 5))
        self.widen_chars = int(o.get("widen_chars", 0))
        if self.widen_chars < 0:
            raise UserError(f"memorybank: widen_chars={self.widen_chars}; fix: use 0 (off) or a character budget "
                            "(the official CHUNK_SIZE is 200)")
        self.summaries = str(o.get("summaries", "on")).lower() not in ("off", "0", "false", "no")
        self.summary_tokens = int(o.get("summary_tokens", 64))
        self.summary_prompt_tokens = int(o.get("summary_prompt_tokens", 1536))
        self.budget = int(o.get("memory_budget") or 0)
        self.key = ""
        self._summarizer = None
        self.reset()

    def config(self) -> dict:
        """The options, with the forgetting variant and its time unit resolved (both define the numbers)."""
        return {**super().config(), "forgetting": self.forgetting, "time_unit_days": self.time_unit_days}

    # ---- store -------------------------------------------------------------------------------------------
    def begin(self, key: str) -> None:
        """Seed the global RNGs and remember the key (the corpus key seeds forgetting)."""
        super().begin(key)
        self.key = key

    def reset(self) -> None:
        """An empty bank."""
        self.bank: dict = {"version": 1, "corpus": "", "forgetting": self.forgetting, "memories": [], "days": {},
                           "overall_history": "", "overall_personality": "", "last_forget_day": None}
        self.docs: list[dict] = []  # indexed documents: {"id", "text", "line", "day", "kind"}
        self.vectors = np.zeros((0, embed_dim()), dtype=np.float32)
        self.index = DenseIndex(embed_dim())

    def _summarize(self, prompts):
        """Greedy summaries from the base model (capped), counted in ``tokens_processed``: one prompt (str -> str)
        or one batch (list -> list, generated together, left-padded). Read from the run's ingest cache when it
        holds this exact batch (``SUMMARY_CACHE``), else generated and stored there; cached summaries count the
        tokens they cost when they were generated, so a warm run's rows equal a cold run's."""
        from r3mem_bench.generation import HFGenerator

        single = isinstance(prompts, str)
        batch = [prompts] if single else list(prompts)
        width = max(summary_batch_size(self.options.get("summary_batch_size", 1)), len(batch))
        if self._summarizer is None or self._summarizer.batch_size != width:
            self._summarizer = HFGenerator(self.lm, max_new_tokens=self.summary_tokens, system=SUMMARY_SYSTEM,
                                           max_prompt_tokens=self.summary_prompt_tokens, batch_size=width)
        cache = getattr(self, "ingest_cache", None)
        parts = got = None
        if cache is not None:
            parts = self._summary_parts(batch)
            got = cache.get(SUMMARY_CACHE, parts)
            if got is not None and not _valid_summaries(got, len(batch)):
                cache.stats["invalid"] += 1  # well-formed entry of the wrong shape: recomputed, not a hit
                cache.stats["hits"] -= 1
                got = None
        stats = self.__dict__.setdefault("summary_stats", {"generated": 0, "cached": 0, "seconds": 0.0})
        if got is None:
            t0 = time.perf_counter()
            outs = [{"text": g.text, "prompt_tokens": g.prompt_tokens, "new_tokens": g.new_tokens}
                    for g in self._summarizer.generate(batch)]
            seconds = time.perf_counter() - t0
            stats["generated"] += len(batch)
            stats["seconds"] += seconds
            if cache is not None:
                cache.put(SUMMARY_CACHE, parts, {"summaries": outs, "seconds": seconds})
        else:
            outs = got["summaries"]
            stats["cached"] += len(batch)
        for g in outs:
            self.tokens_processed += g["prompt_tokens"] + g["new_tokens"]
        texts = [g["text"] for g in outs]
        return texts[0] if single else texts

    def _summary_parts(self, batch: list[str]) -> dict:
        """What a cached batch of summaries depends on (its ingest-cache key parts)."""
        from r3mem_bench.ingest_cache import digest, model_id

        return {"version": SUMMARY_PROMPT_VERSION, "model": model_id(self.lm), "system": SUMMARY_SYSTEM,
                "summary_tokens": self.summary_tokens, "summary_prompt_tokens": self.summary_prompt_tokens,
                "prompts": digest(batch), "n": len(batch)}

    @staticmethod
    def _days(items) -> tuple[dict[str, list[str]], list[str]]:
        """The items' texts per day (in order) and the speakers (in order of appearance)."""
        by_day: dict[str, list[str]] = {}
        speakers: list[str] = []
        for item in items:
            if item.timestamp is not None:
                by_day.setdefault(day_of(item.timestamp), []).append(item.text)
            sp = item.meta.get("speaker")
            if sp and sp not in speakers:
                speakers.append(sp)
        return by_day, speakers

    @staticmethod
    def _day_prompts(by_day: dict[str, list[str]], speakers: list[str]) -> list[str]:
        """Each day's event-summary then personality prompt, days in order."""
        user = " and ".join(speakers) or "the user"
        return [p for lines in by_day.values() for p in (content_prompt(lines), person_prompt(lines, user))]

    def ingest_estimate(self, corpora) -> tuple[float, str] | None:
        """Summary batches to generate (those not in the run's ingest cache; the overall two counted at their
        longest) times their cost, from a probe timed now at this ``summary_batch_size`` and the batches' mean
        padded length (each batch's longest prompt): prefill seconds per prompt token and seconds per generated
        step, every summary counted at ``summary_tokens`` (an upper estimate where summaries stop early)."""
        import torch

        from r3mem_bench.generation import HFGenerator

        if not self.summaries:
            return None
        size = summary_batch_size(self.options.get("summary_batch_size", 1))
        cache = getattr(self, "ingest_cache", None)
        enc = HFGenerator(self.lm, max_new_tokens=self.summary_tokens, system=SUMMARY_SYSTEM,
                          max_prompt_tokens=self.summary_prompt_tokens, batch_size=size)
        batches: list[list[int]] = []  # prompt tokens (as the summariser encodes them) of each batch to generate
        probe: list[int] = []
        summarised = False  # whether any corpus has days to summarise
        for items in corpora:
            by_day, speakers = self._days(items)
            prompts = self._day_prompts(by_day, speakers)
            summarised = summarised or bool(prompts)
            chunks = [prompts[i: i + size] for i in range(0, len(prompts), size)]
            fresh = [c for c in chunks if cache is None or not cache.has(SUMMARY_CACHE, self._summary_parts(c))]
            for c in fresh:
                encoded = [enc.encode(p)[-self.summary_prompt_tokens:] for p in c]
                batches.append([len(e) for e in encoded])
                probe += [t for e in encoded for t in e][: self.summary_prompt_tokens - len(probe)]
            if fresh:  # the overall summary and portrait: at most every day's summary in the prompt
                longest = min(self.summary_prompt_tokens, 96 + len(by_day) * (self.summary_tokens + 16))
                batches += [[longest] * min(2, size)] * (2 // min(2, size))
        if not batches:
            return (0.0, "summaries cached") if summarised else None  # no timestamps: nothing to summarise
        width = max(len(b) for b in batches)
        # a batch runs padded to its longest prompt: probe at the batches' mean padded length
        length = max(1, min(len(probe), round(sum(max(b) for b in batches) / len(batches))))
        rows = torch.tensor([probe[:length]], device=self.lm.device)  # [1, length]
        model, steps = self.lm.model, 4
        params = inspect.signature(model.forward).parameters
        cache_arg = "cache" if "cache" in params else "past_key_values"  # transformers 5 renamed it
        keep = next(({k: 1} for k in ("logits_to_keep", "num_logits_to_keep") if k in params), {})  # as generate
        with torch.no_grad():
            model(input_ids=rows[:, :8], use_cache=True, **keep)  # untimed: first-call costs
            t = time.perf_counter()
            out = model(input_ids=rows[:1], use_cache=True, **keep)  # one row: prefill costs per token
            prefill = (time.perf_counter() - t) * width
            past = getattr(out, "cache", None) or out.past_key_values
            past.batch_repeat_interleave(width)  # the batch's cache without computing it `width` times
            nxt = out.logits[:, -1].argmax(-1, keepdim=True).expand(width, 1)
            t = time.perf_counter()
            for _ in range(steps):
                out = model(input_ids=nxt, use_cache=True, **keep, **{cache_arg: past})
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            per_step = (time.perf_counter() - t) / steps  # seconds per generated step of a batch of `width`
        per_token = prefill / (width * length)  # prefill seconds per prompt token
        seconds = sum(len(b) * max(b) * per_token + self.summary_tokens * per_step for b in batches)
        n = sum(len(b) for b in batches)
        hint = "; --method-arg summary_batch_size=8 generates 8 at a time" if size == 1 and n > 8 else ""
        return seconds, (f"{n} summaries in {len(batches)} batches of <= {width}: prefill {per_token * 1e3:.2f} ms "
                         f"per prompt token, {per_step * 1e3:.0f} ms per step x {self.summary_tokens} at "
                         f"{length} prompt tokens, timed now{hint}")

    def ingest(self, items) -> None:
        """Store the items, write day summaries, personalities and the overall summary/portrait, index all."""
        self.bank["corpus"] = self.bank["corpus"] or self.key
        items = list(items)
        for item in items:
            day = day_of(item.timestamp) if item.timestamp is not None else None
            self.bank["memories"].append({
                "id": item.id, "text": item.text, "timestamp": item.timestamp, "day": day,
                "date": item.meta.get("date") or day, "strength": 1.0, "last_recall": item.timestamp,
                "speaker": item.meta.get("speaker"), "forgotten": False})
        by_day, speakers = self._days(items)
        if self.summaries and by_day:
            from r3mem_bench.ingest_cache import IngestProgress

            size = summary_batch_size(self.options.get("summary_batch_size", 1))
            n_days = len(by_day)
            progress = IngestProgress(f"{self.name} ingest {self.bank['corpus'] or 'corpus'}", 2 * n_days + 2,
                                      "summaries", getattr(self, "ingest_log", None))

            def write(prompts: list[str]) -> list[str]:  # batches of `size` in a fixed order, with progress
                texts = []
                for start in range(0, len(prompts), size):
                    chunk = prompts[start: start + size]
                    generated = getattr(self, "summary_stats", {}).get("generated", 0)
                    before = self.tokens_processed
                    out = self._summarize(chunk if len(chunk) > 1 else chunk[0])
                    texts.extend([out] if isinstance(out, str) else out)
                    fresh = getattr(self, "summary_stats", {}).get("generated", 0) > generated
                    progress.update(len(chunk), tokens=self.tokens_processed - before if fresh else 0,
                                    cached=0 if fresh else len(chunk),
                                    extra=f" ({min((progress.done + len(chunk)) // 2, n_days)}/{n_days} days)")
                return texts

            days_in = list(by_day.items())
            day_texts = write(self._day_prompts(by_day, speakers))
            for i, (day, _) in enumerate(days_in):
                entry = self.bank["days"].setdefault(day, {})
                entry["summary"], entry["personality"] = day_texts[2 * i], day_texts[2 * i + 1]
            days = sorted(self.bank["days"].items())
            overall = write([overall_history_prompt([(d, e["summary"]) for d, e in days]),
                             overall_personality_prompt([(d, e["personality"]) for d, e in days])])
            self.bank["overall_history"], self.bank["overall_personality"] = overall
        self._rebuild(reembed=True)

    def _documents(self) -> list[dict]:
        """The retrievable documents: live memories and the summaries of days that still have memories."""
        docs, live_days = [], set()
        for m in self.bank["memories"]:
            if m["forgotten"]:
                continue
            live_days.add(m["day"])
            prefix = f"Conversation content on {m['date']}:" if m["date"] else ""
            docs.append({"id": m["id"], "text": f"{prefix} {m['text']}".strip(), "day": m["day"], "kind": "memory",
                         "line": f"[{m['date']}] {m['text']}" if m["date"] else m["text"]})
        for day, entry in sorted(self.bank["days"].items()):
            if day in live_days and entry.get("summary"):
                docs.append({"id": f"summary:{day}", "day": day, "kind": "summary",
                             "text": f"The summary of the conversation on {day} is: {entry['summary']}",
                             "line": f"[{day}] (summary) {entry['summary']}"})
        return docs

    def _rebuild(self, reembed: bool = False) -> None:
        """Re-index the live documents (embeddings are cached by document id)."""
        docs = self._documents()
        cache = {} if reembed else {d["id"]: v for d, v in zip(self.docs, self.vectors)}
        missing = [d for d in docs if d["id"] not in cache]
        if missing:
            for d, v in zip(missing, embed([d["text"] for d in missing])):
                cache[d["id"]] = v
        self.docs = docs
        self.vectors = np.stack([cache[d["id"]] for d in docs]) if docs else np.zeros((0, embed_dim()), np.float32)
        self.index = DenseIndex(embed_dim())
        self.index.add(self.vectors)

    # ---- forgetting and recall -----------------------------------------------------------------------------
    def draws(self, now: float):
        """The forgetting pass's source of ``u ~ U[0, 1)``: one generator per (seed, corpus, day of ``now``)."""
        return np.random.default_rng([self.seed, zlib.crc32(str(self.bank["corpus"]).encode()), int(now // DAY)])

    def forget(self, now: float) -> list[str]:
        """One forgetting pass at time ``now`` (seconds): drop each dated memory with probability 1 - R."""
        rng = self.draws(now)
        gone = []
        for m in self.bank["memories"]:
            if m["forgotten"] or m["last_recall"] is None:
                continue
            t = (now - m["last_recall"]) / (DAY * self.time_unit_days)
            r = retention(t, m["strength"], self.forgetting)
            if rng.random() > r:
                m["forgotten"] = True
                gone.append(m["id"])
        self.bank["last_forget_day"] = int(now // DAY)
        if gone:
            self._rebuild()
        return gone

    def recall(self, ids: list[str], now: float | None) -> None:
        """Strengthen recalled memories: ``S += 1`` and the last-recall time becomes ``now``."""
        wanted = set(ids)
        for m in self.bank["memories"]:
            if m["id"] in wanted:
                m["strength"] += 1.0
                if now is not None and m["last_recall"] is not None:
                    m["last_recall"] = float(now)

    def retrieve(self, question: str, now: float | None = None) -> tuple[str, list[str]]:
        """Forget (once per day of ``now``), recall the top-k memories by date, format the [memory] block."""
        if now is not None and self.forgetting != "none" and self.bank["last_forget_day"] != int(now // DAY):
            self.forget(float(now))
        hits = self.index.search(embed([question])[0], self.top_k) if question.strip() else []
        picked = self._widen([i for i, _ in hits]) if self.widen_chars else [_unit([self.docs[i]]) for i, _ in hits]
        if self.budget:
            tok, kept, used = self.lm.tokenizer, [], 0
            for d in picked:
                n = len(tok(d["line"], add_special_tokens=False)["input_ids"]) + 1
                if used + n > self.budget:
                    break
                kept.append(d)
                used += n
            picked = kept
        self.recall([i for d in picked for i, kind in zip(d["ids"], d["kinds"]) if kind == "memory"], now)
        picked = sorted(picked, key=lambda d: (d["day"] or "", d["kind"] != "summary"))  # by date, as official
        parts = []
        if self.bank["overall_history"]:
            parts.append(f"Summary of past events: {self.bank['overall_history']}")
        if self.bank["overall_personality"]:
            parts.append(f"User portrait and response strategy: {self.bank['overall_personality']}")
        if picked:
            parts.append("Relevant [memory]:\n" + "\n".join(d["line"] for d in picked))
            dates = list(dict.fromkeys(d["day"] for d in picked if d["day"]))
            if dates:
                parts.append(f"The date of this [memory] is {', '.join(dates)}.")
        return "\n".join(parts), [i for d in picked for i in d["ids"]]

    def _widen(self, hits: list[int]) -> list[dict]:
        """The hits (indices into ``docs``) with neighbours of the same day added, as the official
        ``similarity_search_with_score_by_vector``: in the official store order (each day's memories, then its
        summary), the neighbours at distance 1, 2, ... (after, then before) join a hit while its text and theirs
        stay within ``widen_chars`` characters (a neighbour that would overflow is skipped, the walk goes on, as the
        official inner ``break``); runs of adjacent chosen documents are merged into one, in store order."""
        order = sorted(range(len(self.docs)), key=lambda i: (self.docs[i]["day"] or "", self.docs[i]["kind"] == "summary", i))
        rank = {doc_index: r for r, doc_index in enumerate(order)}
        chosen: set[int] = set()
        for hit in hits:
            r, used = rank[hit], len(self.docs[hit]["text"])
            chosen.add(r)
            for k in range(1, len(order)):
                for n in (r + k, r - k):
                    if not 0 <= n < len(order):
                        continue
                    doc = self.docs[order[n]]
                    if used + len(doc["text"]) > self.widen_chars:
                        break
                    if doc["day"] == self.docs[hit]["day"]:
                        used += len(doc["text"])
                        chosen.add(n)
        runs: list[list[dict]] = []
        for r in sorted(chosen):
            if runs and r - 1 in chosen:
                runs[-1].append(self.docs[order[r]])
            else:
                runs.append([self.docs[order[r]]])
        return [_unit(run) for run in runs]

    def replay(self, question: str, now: float | None = None) -> None:
        """Redo an answered question's forgetting pass and recall (no answer): a resumed run catches up with it."""
        self.retrieve(question, now=now)

    # ---- persistence and costs ------------------------------------------------------------------------------
    def save(self, path) -> None:
        """Write the bank (memories, strengths, summaries, portrait) as JSON."""
        Path(path).write_text(json.dumps(self.bank, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")

    def load(self, path) -> None:
        """Read a bank written by ``save`` and re-index it."""
        try:
            bank = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise UserError(f"memory bank {path}: cannot read it ({exc}); fix: give a file written by save()") from None
        if not isinstance(bank, dict) or bank.get("version") != 1 or "memories" not in bank:
            raise UserError(f"memory bank {path}: not a MemoryBank file; fix: give a file written by save()")
        self.bank = bank
        self._rebuild(reembed=True)

    def items(self) -> list[MemoryItem]:
        """The live memories as items."""
        return [MemoryItem(m["id"], m["text"], m["timestamp"]) for m in self.bank["memories"] if not m["forgotten"]]

    def state_bytes(self) -> int:
        """JSON bank (text, summaries, strengths) + FAISS index (its float32 vectors)."""
        return len(json.dumps(self.bank, ensure_ascii=False).encode()) + self.index.nbytes()


@register_method
class MemoryBankNoForget(MemoryBank):
    """MemoryBank with ``forgetting=none``: the same summaries, portrait, retrieval and recall updates, and the same
    ingest code path, but every memory stays. A ``forgetting`` option given to the run does not apply to it (its
    manifest records ``forgetting: none``)."""

    name = "memorybank_noforget"
    description = "MemoryBank control: same summaries, portrait and FAISS recall, no forgetting"

    def __init__(self, lm, options=None, generator=None, prompt=None):
        super().__init__(lm, {**dict(options or {}), "forgetting": "none"}, generator, prompt)
