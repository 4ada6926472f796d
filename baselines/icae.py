"""In-Context Autoencoder (ICAE) as an LM memory, trainable with ``r3mem-bench train --method icae``.

Paper: Ge, Hu, Wang, Chen, Wei, "In-context Autoencoder for Context Compression in a Large Language Model",
ICLR 2024 (arXiv 2307.06945). Official code: getao/icae, read at

* ``code/icae_v2/modeling_icae_multi_span.py`` @ 5ed61ffa2142c2467a834a6c229954b7da6a361b (``ICAE``): the encoder
  is the base model with a LoRA adapter reading ``[text][mem_1..mem_k]``, the memory tokens being learned
  embeddings (``memory_token_embed``, which also holds the ``[AE]``, ``[LM]`` and ``[FT]`` special tokens); the
  memory slots are the encoder's last-layer (normed) hidden states at the k memory positions; the decoder is the
  frozen base model (a separate frozen copy in training, the encoder with its adapter disabled at inference),
  reading the slots as input embeddings; a long text is cut into spans of ``mem_size x mean_compression_rate``
  tokens, each compressed to ``mem_size`` slots, and the spans' slots are concatenated.
* ``code/icae_v2/training_utils.py`` and ``pretrain.py`` @ 882c58d6408e075ee80e085701c543c128ffb9f1: pretraining
  mixes the autoencoding objective (decoder input ``[slots][AE]``, target the text, then EOS) and the language
  modelling objective (decoder input ``[slots]``, target the continuation of the text, no loss on its first
  ``leave_tokens_for_lm = 8`` tokens; ``lm_ratio`` picks one objective per sample); LoRA r 128, alpha 32,
  dropout 0.05 on the peft default modules (q and v projections).

What this adapter does (``icae``):

* Segment layout: encoder ``[sink][segment (S)][mem (M)]`` with the adapter on, slots = final (normed) hidden
  states at the M memory positions; decoder ``[sink][slots of the previous segment(s)][segment]`` with the adapter
  off (the frozen base model), the first token predicted from the last slot. ``spans`` (default 1) is how many
  previous segments' slots the decoder reads, concatenated as in the official multi-span model (0: all of them,
  so the state grows with the document). Before the first segment, and in every segment of ``icae_reset``, the
  slots are those of an empty text (encoder ``[sink][mem]``): the same input shape carrying no text.
* Training (``training_losses``), per sample of n consecutive segments: every segment is compressed (one batched
  encoder pass); autoencoding loss = token NLL of each segment from ``[sink][its slots][AE]``; LM loss = token NLL
  of segment i+1 from the slots of the ``spans`` segments before it; loss = (``ae_weight`` x AE + LM) / (1 +
  ``ae_weight``), ``ae_weight`` 1 by default. Gradients reach the adapter and the memory/AE embeddings through
  the frozen decoder.
* Deviations from the official code: (1) both objectives on every sample instead of one drawn by ``lm_ratio``
  (twice the signal per encoder pass on a CPU budget); (2) the LM loss covers every continuation token, as the
  evaluation scores every token (the official leaves the first 8 out); (3) a real token (the model's document
  prefix token) sits at position 0 of both passes as an attention sink, and no EOS ends the AE target; (4) slots
  are centred by a learned vector ``shift`` [H] (initialised at the base model's mean state at the memory
  positions of an empty text) and rescaled to the mean norm of the token-embedding rows (direction kept). The
  final-normed states of SmolLM2 share a few large dimensions (mean cosine 0.52 between tokens of one sentence,
  0.98 between the memory states of different segments early in training), so uncentred slots look alike to
  the frozen decoder: trained without the shift for 110 steps, the autoencoding NLL stayed at the LM NLL (3.29
  vs 3.31); with it, 0.08 below after 400 steps. The rescaling is that of this suite's RMT, since final-normed
  states are ~13x the embedding scale; (5) the memory and AE embeddings start at the token embeddings' scale
  (``randn x std``) rather than ``nn.Embedding``'s N(0, 1); (6) LoRA r 16, alpha 32, no dropout on every
  linear layer, the shipped RMT's adapter (the official r 128 on q/v was sized for a 7B model with hidden size
  4,096; here hidden is 576); (7) the 128-token segments of the suite's LM protocol at M = 16 (compression 8x;
  the official default is 4x at 128 slots); (8) no instruction fine-tuning stage (``[FT]``): LM and QA read the
  pretrained memory directly.
* ``icae_reset``: the same checkpoint reading the slots of an empty text at every segment; the difference to
  ``icae`` is what the compressed previous segment contributes, over a prefix the training never showed empty
  (on held-out text the shipped checkpoint's reset scores worse than no memory at all: compare with both).

QA families: the corpus or dialogue history (items in order, each line with its date when it has one) is cut into
segments of the checkpoint's segment length and each is compressed to M slots; the frozen model answers from
``[first prompt token][every segment's slots][rest of the shared closed-book chat prompt]`` (the multi-span
concatenation; the latest slots that fit in half the model's window), greedily, and ``answer_nll`` scores gold
and candidate answers after that same input. No item ids are retrieved. ``icae_reset`` compresses nothing and
answers after an empty text's slots.

Shipped checkpoint and its training command: ``results/icae/README.md``.

Costs: ``tokens_processed`` counts every position pushed through the model (encoder: sink, segment, M memory
tokens; decoder: sink, slots, segment); ``state_bytes`` is the slots carried into the next segment.
"""

from __future__ import annotations

import time

import torch

from r3mem_bench.baselines._prefix import answer_from_memory, answer_nll_from_memory
from r3mem_bench.baselines._trained import TrainedBaseline
from r3mem_bench.errors import UserError
from r3mem_bench.method import Answer, AnswerNLL, tensor_bytes
from r3mem_bench.methods.checkpoints import (SHIPPED, load_checkpoint_files, read_checkpoint_config,
                                             save_checkpoint_files)
from r3mem_bench.methods.registry import register_method
from r3mem_bench.scoring import token_nll

CONFIG_FILE = "icae_config.json"
TOKENS_FILE = "icae_tokens.safetensors"
DEFAULT_MEMORY = 16  # slots per segment of the shipped `icae-<model>` checkpoint and of a fresh ICAE


@register_method
class ICAE(TrainedBaseline):
    """In-context autoencoder: a LoRA encoder compresses each segment into M slots the frozen model reads next."""

    name = "icae"
    config_file = CONFIG_FILE
    checkpoint_owner = "icae"  # icae_reset reads the same checkpoint
    families = ("lm", "rag", "dialogue")
    description = "In-Context Autoencoder: each segment compressed to M slots, read by the frozen model (LoRA encoder)"
    trainable = True
    batched_training = True  # training_losses takes [B, S] segments (trainer --micro-batch)

    def __init__(self, lm, options=None, generator=None, prompt=None):
        super().__init__(lm, options, generator, prompt)
        o = self.options
        ckpt = self._checkpoint_dir(o.get("checkpoint"))
        saved = read_checkpoint_config(ckpt, CONFIG_FILE, "icae") if ckpt else {}
        self.num_mem = int(saved.get("num_mem_tokens", o.get("num_mem_tokens", DEFAULT_MEMORY)))
        self.segment_len = int(o.get("segment_len", saved.get("segment_len", 128)))
        self.spans = int(o.get("spans", saved.get("spans", 1)))
        if self.spans < 0:
            raise UserError(f"icae: spans={self.spans}; fix: a number of previous segments >= 1, or 0 for all")
        self.ae_weight = float(o.get("ae_weight", saved.get("ae_weight", 1.0)))
        self.lora = self._lora_settings(saved, r=16, alpha=32)
        self._build()
        self.checkpoint_id = ""
        if ckpt:
            self.load_checkpoint(ckpt)
        else:
            with torch.no_grad():  # LoRA B is zero: the base model's states at the memory positions of an empty text
                self.shift.copy_(self._memory_states(None, 1).mean(dim=(0, 1)))
        self.reset()

    # ---- model -------------------------------------------------------------------------------------------
    def _build(self) -> None:
        emb = self._adapt(self.lora)
        self.stack = self.body.get_decoder()
        init = torch.randn((self.num_mem + 1, emb.shape[1])) * emb.float().std()  # global RNG: the trainer seeds it
        self.tokens = torch.nn.Parameter(init.to(emb.device, emb.dtype))  # rows 0..M-1: memory tokens; row M: [AE]
        self.shift = torch.nn.Parameter(torch.zeros(emb.shape[1], device=emb.device, dtype=emb.dtype))  # [H]
        self.peft.eval()

    def trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        """LoRA weights of the encoder and the memory/[AE] embeddings by stable name (the base model stays frozen)."""
        params = {n: p for n, p in self.peft.named_parameters() if "lora_" in n}
        params["icae.tokens"] = self.tokens
        params["icae.shift"] = self.shift
        return params

    def _memory_states(self, seg_ids: torch.Tensor | None, batch: int) -> torch.Tensor:
        """Encoder's final (normed) hidden states at the M memory positions after the segments [B, S] (None: an
        empty text): [B, M, H]."""
        b = batch if seg_ids is None else seg_ids.shape[0]
        mem = self.tokens[: self.num_mem].unsqueeze(0).expand(b, -1, -1)
        parts = [self._sink(b)] + ([] if seg_ids is None else [self._embed(seg_ids)]) + [mem]
        return self.stack(inputs_embeds=torch.cat(parts, dim=1)).last_hidden_state[:, -self.num_mem:]

    def compress(self, seg_ids: torch.Tensor | None, batch: int = 1) -> torch.Tensor:
        """Encoder: segments [B, S] (None: an empty text) -> slots [B, M, H]: the memory states less the learned
        ``shift``, at the embedding rows' mean norm."""
        return self._at_embedding_scale(self._memory_states(seg_ids, batch) - self.shift)  # [B, M, H]

    def read(self, slots: torch.Tensor, seg_ids: torch.Tensor, autoencode: bool = False) -> torch.Tensor:
        """Decoder (the frozen base model): logits [B, S] predicting ``seg_ids`` [B, S] after ``[sink][slots]``
        (then ``[AE]`` when ``autoencode``)."""
        b, s = seg_ids.shape
        parts = [self._sink(b), slots]
        if autoencode:
            parts.append(self.tokens[self.num_mem:].unsqueeze(0).expand(b, -1, -1))
        parts.append(self._embed(seg_ids))
        start = sum(p.shape[1] for p in parts[:-1]) - 1  # the position that predicts the first segment token
        with self.peft.disable_adapter():
            hidden = self.stack(inputs_embeds=torch.cat(parts, dim=1)).last_hidden_state
        return self.head(hidden[:, start: start + s])

    # ---- LM streams ----------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the document: no slots yet (the next segment reads an empty text's slots)."""
        self.slots: list[torch.Tensor] = []  # [1, M, H] per kept previous segment (the last `spans`), oldest first
        self.passage_slots: list[torch.Tensor] = []  # QA: [1, M, H] per ingested segment
        self._empty: torch.Tensor | None = None

    def empty_slots(self) -> torch.Tensor:
        """Slots of an empty text [1, M, H], computed once per document."""
        if self._empty is None:
            self._empty = self.compress(None)
            self.tokens_processed += 1 + self.num_mem
        return self._empty

    def carried_slots(self) -> torch.Tensor:
        """What the decoder reads before the next segment: [1, spans x M, H] (an empty text's slots at first)."""
        if self.reset_each_segment or not self.slots:
            return self.empty_slots()
        return torch.cat(self.slots, dim=1)

    def state_bytes(self) -> int:
        """The slots carried into the next segment (QA: the slots of the ingested text)."""
        if self.passage_slots:
            return tensor_bytes(*self.passage_slots)
        return 0 if self.reset_each_segment else tensor_bytes(*self.slots)

    def lm_state_bytes(self) -> int | None:
        """``spans`` x M x H floats carried between segments (None with ``spans=0``: it grows with the document)."""
        if self.reset_each_segment:
            return 0
        return None if self.spans == 0 else self.spans * tensor_bytes(self.tokens[: self.num_mem])

    @torch.no_grad()
    def score_segment(self, segment_ids: torch.Tensor) -> torch.Tensor:
        """NLL of the segment given the carried slots; then compress it into slots for the next segment."""
        seg = segment_ids.view(1, -1).to(self.lm.device)
        slots = self.carried_slots()
        nll = token_nll(self.read(slots, seg), seg)[0].cpu()
        self.tokens_processed += 1 + slots.shape[1] + seg.shape[1]
        if not self.reset_each_segment:
            self.slots.append(self.compress(seg))
            self.tokens_processed += 1 + seg.shape[1] + self.num_mem
            if self.spans:
                self.slots = self.slots[-self.spans:]
        return nll

    def score_stream(self, segments: list[torch.Tensor]) -> list[torch.Tensor]:
        """Score segments in order, recording per-segment time and state bytes."""
        t0 = time.perf_counter()
        out, sizes = [], []
        for seg in segments:
            out.append(self.score_segment(seg))
            sizes.append(self.state_bytes())
        self.segment_seconds = [(time.perf_counter() - t0) / max(1, len(segments))] * len(segments)
        self.segment_state_bytes = sizes
        return out

    # ---- training ------------------------------------------------------------------------------------------
    def training_losses(self, segments) -> dict[str, torch.Tensor]:
        """(AE + LM) token NLL of one sample of n consecutive segments (see the module docstring)."""
        segs = [s if s.dim() == 2 else s.view(1, -1) for s in segments]
        if not segs:
            raise UserError("icae training: empty sample; fix: give samples of at least one segment")
        n, b, s = len(segs), segs[0].shape[0], segs[0].shape[1]
        stacked = torch.cat(segs, dim=0).to(self.lm.device)  # [n*B, S], segment-major
        slots = self.compress(stacked)  # [n*B, M, H]
        ae = token_nll(self.read(slots, stacked, autoencode=True), stacked).mean()
        self.tokens_processed += n * b * ((1 + s + self.num_mem) + (2 + self.num_mem + s))
        out = {"ae_nll": ae.detach()}
        loss = ae
        if n > 1:
            per_seg = slots.view(n, b, self.num_mem, -1)
            if self.reset_each_segment:
                per_seg = self.compress(None, batch=b).unsqueeze(0).expand(n, -1, -1, -1)
            lm_total = 0.0
            for i in range(1, n):
                first = 0 if self.spans == 0 else max(0, i - self.spans)
                memory = torch.cat(list(per_seg[first:i]), dim=1)  # [B, spans x M, H]
                lm_total = lm_total + token_nll(self.read(memory, segs[i].to(self.lm.device)), segs[i]).mean()
                self.tokens_processed += b * (1 + memory.shape[1] + s)
            lm = lm_total / (n - 1)
            out["lm_nll"] = lm.detach()
            loss = (self.ae_weight * ae + lm) / (1 + self.ae_weight)
        return {"loss": loss, **out}

    # ---- checkpoints -----------------------------------------------------------------------------------------
    def _own_tensors(self) -> dict[str, torch.nn.Parameter]:
        return {"tokens": self.tokens, "shift": self.shift}

    def save_checkpoint(self, directory, meta: dict | None = None) -> None:
        """Write the encoder's LoRA adapter, the memory/[AE] embeddings, the ICAE settings and ``meta``."""
        cfg = {"method": "icae", "base_model": self.lm.name, "num_mem_tokens": self.num_mem,
               "segment_len": self.segment_len, "spans": self.spans, "ae_weight": self.ae_weight,
               "lora_r": self.lora["r"], "lora_alpha": self.lora["alpha"], "lora_dropout": self.lora["dropout"],
               "lora_targets": self.lora["targets"], **(meta or {})}
        save_checkpoint_files(directory, self.peft, self._own_tensors(), TOKENS_FILE, cfg, CONFIG_FILE)

    def load_checkpoint(self, directory) -> None:
        """Load what ``save_checkpoint`` wrote (``--init-from`` of the trainer)."""
        self.checkpoint_id = load_checkpoint_files(directory, self.peft, self._own_tensors(), TOKENS_FILE,
                                                     CONFIG_FILE, "icae", self.lm.name, SHIPPED)

    def config(self) -> dict:
        """Options plus the resolved checkpoint (path and content hash) and architecture settings."""
        return {"name": self.name, **self.options, "checkpoint_id": self.checkpoint_id, "num_mem_tokens": self.num_mem,
                "spans": self.spans, "lora": self.lora, "carry_memory": not self.reset_each_segment}


    # ---- QA ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def ingest(self, items) -> None:
        """Compress the items (dated lines, in order) segment by segment; the answer reads every segment's slots."""
        if self.reset_each_segment:
            self.empty_slots()  # what every answer reads, computed (and counted) with the ingest
            return
        chunks = self._history_segments(items)
        self.passage_slots = [self.compress(chunk.view(1, -1)) for chunk in chunks]
        self.tokens_processed += sum(1 + chunk.numel() + self.num_mem for chunk in chunks)

    def _qa_memory(self) -> torch.Tensor:
        """The slots of every ingested segment, in order (the official multi-span concatenation), as many of the
        latest as fit in half the model's window: [1, K, H]; an empty text's slots before any ingest."""
        kept = self.passage_slots[-max(1, (self.lm.max_length // 2) // self.num_mem):]
        return torch.cat(kept, dim=1) if kept else self.empty_slots()

    def answer(self, question: str, now: float | None = None) -> Answer:
        """Generate with the frozen model from ``[first prompt token][slots][rest of the closed-book prompt]``."""
        return answer_from_memory(self, self._qa_memory(), question, reader=self.peft.disable_adapter)

    def answer_nll(self, question: str, texts: list[str], now: float | None = None,
                   given: Answer | None = None) -> AnswerNLL:
        """Mean per-token NLL of each text after the input ``answer`` generates from (the frozen model)."""
        return answer_nll_from_memory(self, self._qa_memory(), question, texts, given, reader=self.peft.disable_adapter)


@register_method
class ICAEReset(ICAE):
    """ICAE's checkpoint reading an empty text's slots at every segment (the compressed segment's contribution)."""

    name = "icae_reset"
    description = "ICAE, slots of an empty text at every segment (control)"
    reset_each_segment = True
