"""The ``MemoryMethod`` contract: what every memory module implements, whatever the task family.

A method is built once per (task, run) with the loaded base model and its options, then driven by the task's
family protocol, which is the only caller:

* **LM streams** (family ``lm``): ``reset()`` at the start of each document, then ``score_segment(ids)`` for each
  segment of S token ids in order. It returns the negative log-likelihood (nats) of every token of the segment
  given what the method remembers of the earlier segments, and then lets the method absorb the segment into its
  memory. ``score_stream(segments)`` loops over it; a method may override it to batch (full_context does).
  The first token of a document is predicted from the model's document prefix token (``lm.prefix_token_id``).
* **QA** (families ``rag`` and ``dialogue``): ``reset()``, ``ingest(items)`` with the corpus passages or the
  dialogue turns in time order (each a :class:`MemoryItem` with optional timestamp), then ``answer(question)``
  for each question. Prompt-based methods implement ``retrieve(question) -> (context_text, retrieved_ids)`` and
  inherit ``answer``, which formats the task's shared prompt template and calls the shared generator, so every
  method is compared with the same model, prompt and decoding.
* **Answer likelihood** (QA): ``answer_nll(question, texts, now, given)`` scores texts (the first gold answer,
  then any answer candidates) as continuations of what the method answers from, one prompt forward pass per
  question (:func:`r3mem_bench.generation.continuation_nll`). The default is the prompt path: the same rendered
  prompt, chat-formatted and truncated as the generator encodes it, with the context of ``given`` (the method's
  ``Answer`` to that question, so nothing is retrieved twice) or, when the family skipped generation, of
  ``retrieve``. A method with its own ``answer`` overrides it too (RMT scores after its memory-prefixed prompt);
  one that overrides ``answer`` only, or has no shared prompt, returns None (no likelihood metrics).
* **Costs, for all**: ``tokens_processed`` counts tokens pushed through the base model (prompts, memory slots,
  segments, summaries: everything the method pays for), ``state_bytes()`` is the size of the memory state the
  method carries (tensors, stored text and indexes), reported after each document or ingest.
* **Ingest cache and progress (optional)**: the runner sets ``ingest_cache`` (an
  :class:`r3mem_bench.ingest_cache.IngestCache` under the run's output directory; None elsewhere) and
  ``ingest_log`` (a ``str -> None`` progress printer to stderr; None when quiet). A method whose ingest is costly
  and deterministic may keep its products there (``get_or_compute``) and report progress through
  :class:`r3mem_bench.ingest_cache.IngestProgress`; methods that ignore both are unaffected.
"""

from __future__ import annotations

from abc import ABC
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable

import torch

from r3mem_bench.models import LoadedModel


@dataclass
class MemoryItem:
    """One unit of history or corpus: a passage, a dialogue turn, or a session."""

    id: str
    text: str
    timestamp: float | None = None  # seconds since the epoch (dialogue); None for a static corpus
    meta: dict = field(default_factory=dict)


@dataclass
class Answer:
    """A method's answer to one question and what it cost."""

    text: str
    retrieved_ids: list[str] = field(default_factory=list)
    prompt_tokens: int = 0
    context: str = ""
    new_tokens: int = 0  # tokens generated (counted in tokens_processed with the prompt's)


@dataclass
class AnswerNLL:
    """Likelihood of candidate answer texts after a method's prompt (see ``MemoryMethod.answer_nll``)."""

    nll: list[float]  # mean per-token NLL (nats) of each text, in the order given; nan for an empty text
    tokens: list[int]  # answer tokens of each text
    prompt_tokens: int  # positions of the prompt the texts were scored after
    retrieved_ids: list[str] = field(default_factory=list)
    context: str = ""


FOR_TRAINING = "for_training"  # option the trainer sets (and only it): build fresh weights to be trained


class MemoryMethod(ABC):
    """Base class of every memory module (see the module docstring for the contract)."""

    name: ClassVar[str] = ""
    families: ClassVar[tuple[str, ...]] = ("lm", "rag", "dialogue")
    description: ClassVar[str] = ""
    trainable: ClassVar[bool] = False
    reset_each_segment: ClassVar[bool] = False  # the reset control of a recurrent memory (``<method>_reset``)
    preset_options: ClassVar[dict] = {}  # options a derived name fixes (``r3mem:memory_tokens=4``); they win
    ingest_cache = None  # r3mem_bench.ingest_cache.IngestCache of the run (set by the runner), or None
    ingest_log = None  # callable(str) printing ingest progress to stderr (set by the runner), or None

    def __init__(self, lm: LoadedModel, options: dict[str, Any] | None = None, generator=None, prompt=None):
        self.lm = lm
        self.options = {**dict(options or {}), **self.preset_options}
        self.for_training = bool(self.options.pop(FOR_TRAINING, False))  # built by `r3mem-bench train`
        self.generator = generator  # r3mem_bench.generation.Generator, for QA families
        self.prompt = prompt  # r3mem_bench.generation.PromptTemplate, shared by all methods of a task
        self.tokens_processed = 0
        self.seed = 0

    @classmethod
    def shipped_checkpoint(cls, model: str):
        """The shipped checkpoint directory this method loads for ``model`` when given none (None: it has none)."""
        return None

    @classmethod
    def shipped_weights_id(cls, model: str) -> str | None:
        """Content hash of the shipped checkpoint's weight files for ``model`` (suite cell keys), or None."""
        import hashlib

        path = cls.shipped_checkpoint(model)
        if path is None:
            return None
        digest = hashlib.sha256()
        for f in sorted(path.rglob("*.safetensors")):
            digest.update(f.read_bytes())
        return digest.hexdigest()[:16]

    # ---- common -----------------------------------------------------------------------------------------
    def begin(self, key: str) -> None:
        """Seed every RNG from the run seed and an example key, so each example is reproducible on resume."""
        from r3mem_bench.provenance import seed_everything

        seed_everything(self.seed, key)

    def reset(self) -> None:
        """Forget everything: start a new document, corpus or conversation."""

    def state_bytes(self) -> int:
        """Bytes of memory state the method currently holds."""
        return 0

    def lm_state_bytes(self) -> int | None:
        """Bytes of the state carried from one LM segment to the next, from the shapes alone (None: unknown).

        Sizes the equal-state sliding window ``window@NAME`` (``r3mem_bench.methods.derived``)."""
        return None

    def config(self) -> dict:
        """Options that define this method (recorded in the manifest and its config hash)."""
        return {"name": self.name, **self.options}

    # ---- LM streams ---------------------------------------------------------------------------------------
    def score_segment(self, segment_ids: torch.Tensor) -> torch.Tensor:
        """NLL in nats of each token of ``segment_ids`` (LongTensor [S]) given memory; then absorb it. -> [S]."""
        raise NotImplementedError(f"method '{self.name}' does not score LM streams")

    def score_stream(self, segments: list[torch.Tensor]) -> list[torch.Tensor]:
        """Score a document's segments in order: a list of [S_i] NLL tensors."""
        return [self.score_segment(seg) for seg in segments]

    # ---- QA -----------------------------------------------------------------------------------------------
    def ingest(self, items: Iterable[MemoryItem]) -> None:
        """Store a corpus or a dialogue history (items in time order)."""
        raise NotImplementedError(f"method '{self.name}' does not ingest a corpus")

    def ingest_estimate(self, corpora: list[list[MemoryItem]]) -> tuple[float, str] | None:
        """Expected seconds to ingest these corpora on this machine and how they were reckoned (a short phrase), for
        a method whose ingest runs the model; None where ingest is cheap (storing, embedding). Measured, not
        guessed: implementations time a small probe of their own ingest step now and count the steps; entries
        already in the run's ingest cache cost nothing. Must not change the method's state or token count."""
        return None

    def retrieve(self, question: str, now: float | None = None) -> tuple[str, list[str]]:
        """Context text for ``question`` and the ids of the items it came from."""
        raise NotImplementedError(f"method '{self.name}' does not retrieve")

    def answer(self, question: str, now: float | None = None) -> Answer:
        """Answer from retrieved context with the task's shared prompt and generator."""
        context, ids = self.retrieve(question, now=now)
        return self.generate_answer(question, context, ids)

    def shared_prompt_answers(self) -> bool:
        """Whether ``answer`` is ``retrieve`` then the shared prompt and generator (then a QA family may retrieve
        several questions' contexts first and generate their answers as one batch)."""
        return type(self).answer is MemoryMethod.answer and type(self).generate_answer is MemoryMethod.generate_answer

    def generate_answer(self, question: str, context: str, ids: list[str]) -> Answer:
        """Shared last step for one question: ``generate_answers`` of one."""
        return self.generate_answers([(question, context, ids)])[0]

    def generate_answers(self, asked: list[tuple[str, str, list[str]]]) -> list[Answer]:
        """Shared last step for (question, context, item ids) triples: render the shared prompt with each context,
        generate greedily as one batch, count prompt and generated tokens."""
        outs = self.generator.generate([self.prompt.render(question=q, context=c) for q, c, _ in asked])
        self.tokens_processed += sum(out.prompt_tokens + out.new_tokens for out in outs)
        return [Answer(text=out.text, retrieved_ids=ids, prompt_tokens=out.prompt_tokens, context=context,
                       new_tokens=out.new_tokens) for (_, context, ids), out in zip(asked, outs)]

    def _encoder(self):
        """The prompt encoder: the task's generator, or an HF one with the prompt's system text (vLLM has one)."""
        if hasattr(self.generator, "encode") and hasattr(self.generator, "continuation_ids"):
            return self.generator
        from r3mem_bench.generation import HFGenerator

        return HFGenerator(self.lm, system=self.prompt.system)

    @torch.no_grad()
    def answer_nll(self, question: str, texts: list[str], now: float | None = None,
                   given: Answer | None = None) -> AnswerNLL | None:
        """Mean per-token NLL of each of ``texts`` as the answer after this method's prompt for ``question``.

        The prompt path: ``given.context`` (the context the method answered from) or, without ``given``,
        ``retrieve``; the shared template rendered with it and encoded as the generator encodes it (chat template,
        truncated from the front, further when prompt + longest text would exceed the model's window); texts of
        more than half the window are cut to that. Without ``given`` the prompt's tokens are counted in
        ``tokens_processed`` (what answering would read); with it they already were. None when the method has no
        shared prompt or answers through its own ``answer`` without overriding this.
        """
        if self.prompt is None or type(self).answer is not MemoryMethod.answer:
            return None
        return self.prompt_answer_nll(question, texts, now=now, given=given)

    @torch.no_grad()
    def prompt_answer_nll(self, question: str, texts: list[str], now: float | None = None,
                          given: Answer | None = None) -> AnswerNLL:
        """The prompt path of ``answer_nll``, for a method whose ``answer`` uses the shared prompt (or may)."""
        from r3mem_bench.generation import continuation_nll

        if given is not None:
            context, ids = given.context, list(given.retrieved_ids)
        else:
            context, ids = self.retrieve(question, now=now)
        enc = self._encoder()
        prompt_ids = enc.encode(self.prompt.render(question=question, context=context))
        conts = [enc.continuation_ids(t)[: self.lm.max_length // 2] for t in texts]
        room = self.lm.max_length - max((len(c) for c in conts), default=0)
        prompt_ids = prompt_ids[-room:]
        if given is None:
            self.tokens_processed += len(prompt_ids)
        scored = continuation_nll(self.lm.model, conts, prompt_ids=prompt_ids)
        return AnswerNLL([s for s, _ in scored], [n for _, n in scored], len(prompt_ids), ids, context)


def tensor_bytes(*tensors: torch.Tensor | None) -> int:
    """Total bytes of the given tensors (None ignored)."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)
