"""Recurrent Memory Transformer (RMT) for decoder-only models, trainable with ``r3mem-bench train --method rmt``.

Papers: Bulatov, Kuratov, Burtsev, "Recurrent Memory Transformer", NeurIPS 2022 (arXiv 2207.06881); Bulatov et al.,
"Scaling Transformer to 1M tokens and beyond with RMT" (arXiv 2304.11062). Official code:
booydar/recurrent-memory-transformer, read at

* ``framework_accel`` (default branch) @ 9d0ebe1778687995697fe68e886bc1dcf0e45e1c: ``modeling_rmt/language_modeling.py``
  (``MemoryCell``: learned memory ``randn(M, H) * std(token embeddings)``, input ``[mem, segment, mem]``, new
  memory = last-layer hidden states at the last M positions; ``RecurrentWrapper``: segments in order, memory
  carried), ``run_finetuning_lm_rmt.py`` (LoRA on a frozen backbone, only ``memory``/``lora`` parameters trained)
  and ``scripts/wikitext/finetune_wikitext_short_lora_curriculum_rmt.sh`` (segment-count curriculum 2..7, each
  stage starting from the previous stage's checkpoint, BPTT depth ``k2 = 4``).
* ``babilong-release`` @ 5a3d0722a10dc874b69075d74a8f66bffb957c2d: same file. Its ``manage_gradients`` *returns*
  the detached memory and the caller uses it; on the default branch the detached tensor is assigned to a local
  variable and dropped, so no truncation happens there. This module follows the released babilong behaviour:
  in a sample of n segments the memory written by segment i (0-based, i >= 1) is detached when ``i + k2 <= n``:
  gradients cross the hand-over from segment 0 and those from segments n-k2+1.. on (``k2 = -1``: full BPTT).

What this adapter does (``rmt``):

* Segment layout ``[sink][mem_read (M)][segment (S)][mem_write (M)]``; read and write slots carry the same memory
  vectors, as in the official cell. The first token of a segment is predicted from the last read slot; the
  memory for the next segment is the final (normed) hidden state at the M write positions.
* Deviations, both from measured facts on SmolLM2 (``../shared/design/r3mem.md``): (1) a real token (the model's
  document prefix token) is kept at position 0 as an attention sink, ahead of the memory; (2) the written
  memory is rescaled to the mean norm of the token-embedding rows (direction kept), because last-layer states
  fed back as input embeddings as they are wreck the model (PPL 856 vs 39 in the probe). The official code
  feeds them back unscaled (GPT-2 / GPT-NeoX backbones).
* Training (``training_losses``): token NLL of every segment given the memory carried from the previous ones
  (the official LM script scores only the last segment of each sample; scoring all of them gives n times the
  signal per step on a CPU budget), BPTT truncation as above, and a segment-count curriculum inside one run:
  the stages of ``curriculum`` (default 2, 3, ..., ``--segments`` segments per sample) share the step budget
  (``--steps``) equally; the official script runs each stage as a separate job warm-started from the previous.
  The step comes from the trainer (``method.train_step``, set before each micro-batch, and ``train_steps`` in the
  options). A staged curriculum as in the official script: ``--method-arg checkpoint=DIR`` warm-starts a training
  run from an earlier stage's checkpoint and ``--method-arg curriculum=3,4`` sets the later stages.
* LoRA on the frozen base model (peft; defaults r 8, alpha 16, no dropout, every linear layer: the same
  adapter settings as R3Mem's, so the two are trained alike) plus the memory embedding are the trainable
  parameters, at one learning rate as in the official script (its LoRA default is r 8, alpha 32); the base
  model of the run is deep-copied first, so other methods of the same process keep the plain model.
* ``rmt_reset``: the same adapter and memory initialisation, memory re-initialised at every segment; the
  difference to ``rmt`` is what the recurrent memory itself contributes.

QA families: the corpus or dialogue history is read recurrently (items in order, each line with its date when it
has one, cut into segments of the checkpoint's segment length) into the memory; the answer is generated greedily
from ``[first prompt token][memory][rest of the shared chat prompt]`` with the task's closed-book template, so
everything the model knows about the corpus comes through the M memory vectors. No item ids are retrieved.
Answer likelihood (``answer_nll``) scores gold and candidate answers after that same memory-prefixed input.

Shipped checkpoint and its training command: ``results/rmt/README.md``; held-out results: ``results/r3mem/README.md``.

Costs: ``tokens_processed`` counts every position pushed through the model (sink, 2M slots, segment tokens;
prompt, slots and generated tokens for QA); ``state_bytes`` is the memory tensor (M x H floats).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from r3mem_bench.baselines._prefix import answer_from_memory, answer_nll_from_memory
from r3mem_bench.baselines._trained import TrainedBaseline
from r3mem_bench.errors import UserError
from r3mem_bench.method import Answer, AnswerNLL, tensor_bytes
from r3mem_bench.methods.checkpoints import (SHIPPED, load_checkpoint_files, read_checkpoint_config,
                                             save_checkpoint_files)
from r3mem_bench.methods.registry import register_method
from r3mem_bench.scoring import token_nll

CONFIG_FILE = "rmt_config.json"
DEFAULT_MEMORY = 16  # memory tokens of the shipped `rmt-<model>` checkpoint and of a fresh RMT
MEMORY_FILE = "memory.safetensors"


def _int_list(value) -> list[int]:
    """``"2,3,4"`` or ``[2, 3, 4]`` -> ``[2, 3, 4]``."""
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return [int(v) for v in str(value).replace(" ", "").split(",") if v]


def truncate_gradient(seg_num: int, n_segments: int, k2: int) -> bool:
    """Whether the memory written by segment ``seg_num`` is detached (babilong-release ``manage_gradients``)."""
    return not (seg_num == 0 or k2 in (-1, 0) or seg_num + k2 > n_segments)


def _checkpoint_config(path: Path) -> dict:
    """The RMT settings JSON of a checkpoint directory; unreadable or malformed is a ``UserError``."""
    return read_checkpoint_config(path, CONFIG_FILE, "rmt")


@register_method
class RMT(TrainedBaseline):
    """Recurrent memory tokens ``[sink, mem, segment, mem]`` with a LoRA-adapted base model (Bulatov et al.)."""

    name = "rmt"
    checkpoint_owner = "rmt"  # rmt_reset reads the same checkpoint
    config_file = CONFIG_FILE
    families = ("lm", "rag", "dialogue")
    description = "Recurrent Memory Transformer: M memory tokens carried across segments (LoRA + learned memory)"
    trainable = True
    batched_training = True  # training_losses takes [B, S] segments (trainer --micro-batch)

    def __init__(self, lm, options=None, generator=None, prompt=None):
        super().__init__(lm, options, generator, prompt)
        o = self.options
        ckpt = self._checkpoint_dir(o.get("checkpoint"))
        saved = _checkpoint_config(ckpt) if ckpt else {}
        self.num_mem = int(saved.get("num_mem_tokens", o.get("num_mem_tokens", DEFAULT_MEMORY)))
        self.segment_len = int(o.get("segment_len", saved.get("segment_len", 128)))
        self.k2 = int(o.get("k2", saved.get("k2", 4)))
        train_segments = int(o.get("train_segments", 4))
        default_stages = ",".join(str(n) for n in range(min(2, train_segments), train_segments + 1))
        self.curriculum = _int_list(o.get("curriculum", saved.get("curriculum", default_stages)))
        self.lora = self._lora_settings(saved, r=8, alpha=16)
        self.total_steps = int(o.get("train_steps", 0))
        self._build()
        self.checkpoint_id = ""
        if ckpt:
            self.load_checkpoint(ckpt)
        self.train_step = 0
        self.reset()

    # ---- model -------------------------------------------------------------------------------------------
    def _build(self) -> None:
        emb = self._adapt(self.lora)
        self.decoder = self.body.get_decoder()
        init = torch.randn((self.num_mem, emb.shape[1])) * emb.float().std()  # global RNG: the trainer seeds it
        self.memory = torch.nn.Parameter(init.to(emb.device, emb.dtype))
        self.peft.eval()

    def trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        """LoRA weights and the memory embedding by stable name (the base model stays frozen)."""
        params = {n: p for n, p in self.peft.named_parameters() if "lora_" in n}
        params["rmt.memory"] = self.memory
        return params

    def initial_memory(self, batch: int = 1) -> torch.Tensor:
        """The learned memory, repeated for a batch: [B, M, H]."""
        return self.memory.unsqueeze(0).expand(batch, -1, -1)

    def carried_memory(self) -> torch.Tensor:
        """The memory the next read starts from: the state written so far, or the learned initial memory (before
        any text, and always in the reset control). [1, M, H]"""
        return self.state if (self.state is not None and not self.reset_each_segment) else self.initial_memory(1)

    def cell(self, seg_ids: torch.Tensor, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One segment [B, S] with memory [B, M, H] -> (logits [B, S, V] predicting each token, new memory)."""
        b, s = seg_ids.shape
        m = self.num_mem
        x = torch.cat([self._sink(b), memory, self._embed(seg_ids), memory], dim=1)
        hidden = self.decoder(inputs_embeds=x).last_hidden_state  # [B, 1 + 2M + S, H], after the final norm
        logits = self.head(hidden[:, m: m + s])  # position m (last read slot) predicts the first token
        written = hidden[:, -m:]
        new_memory = self._at_embedding_scale(written)
        return logits, new_memory

    def compile_for_training(self) -> None:
        """``train --compile``: the decoder runs through ``torch.compile`` (inductor), which fuses the element-wise
        work around the matrix products (norms, rotary, activations, autocast's casts); a training cell has one
        shape, so it compiles once, on the first step. Rounding differs from eager mode: the fused kernels keep
        intermediates in float32 (``benchmarks/grad_precision.py`` compares both with float32 gradients)."""
        self.decoder.compile()

    # ---- LM streams ----------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Start from the learned memory."""
        self.state: torch.Tensor | None = None

    def state_bytes(self) -> int:
        """The carried memory: M x H floats."""
        return tensor_bytes(self.memory)

    def lm_state_bytes(self) -> int:
        """The memory carried into the next segment (M x H floats); the reset control carries none."""
        return 0 if self.reset_each_segment else tensor_bytes(self.memory)

    @torch.no_grad()
    def score_segment(self, segment_ids: torch.Tensor) -> torch.Tensor:
        """NLL of the segment given the carried memory; then write the segment into the memory."""
        memory = self.carried_memory()
        seg = segment_ids.view(1, -1).to(self.lm.device)
        logits, new_memory = self.cell(seg, memory)
        self.tokens_processed += 1 + 2 * self.num_mem + seg.shape[1]
        self.state = new_memory
        return token_nll(logits, seg)[0].cpu()

    def score_stream(self, segments: list[torch.Tensor]) -> list[torch.Tensor]:
        """Score segments in order, recording per-segment time and state bytes."""
        t0 = time.perf_counter()
        out = [self.score_segment(seg) for seg in segments]
        self.segment_seconds = [(time.perf_counter() - t0) / max(1, len(segments))] * len(segments)
        self.segment_state_bytes = [self.state_bytes()] * len(segments)
        return out

    # ---- training ------------------------------------------------------------------------------------------
    def n_segments_now(self, available: int) -> int:
        """Segments per sample at the current step of the curriculum (stages share the step budget equally)."""
        stages = self.curriculum or [available]
        if self.total_steps > 0:
            stage = min(len(stages) - 1, self.train_step * len(stages) // self.total_steps)
        else:
            stage = len(stages) - 1
        return max(1, min(available, stages[stage]))

    def training_losses(self, segments) -> dict[str, torch.Tensor]:
        """Mean token NLL over the sample's segments with recurrent memory and truncated BPTT (k2)."""
        segs = self._as_segments(segments)
        n = self.n_segments_now(len(segs))
        segs = segs[:n]
        memory = self.initial_memory(segs[0].shape[0])
        total, count = 0.0, 0
        for i, seg in enumerate(segs):
            if self.reset_each_segment:
                memory = self.initial_memory(seg.shape[0])
            logits, new_memory = self.cell(seg, memory)
            nll = token_nll(logits, seg.to(logits.device))
            total = total + nll.sum()
            count += nll.numel()
            self.tokens_processed += seg.shape[0] * (1 + 2 * self.num_mem + seg.shape[1])
            if truncate_gradient(i, n, self.k2):
                new_memory = new_memory.detach()
            memory = new_memory
        self.train_step += 1
        loss = total / max(1, count)
        return {"loss": loss, "nll": loss.detach(), "n_segments": torch.tensor(float(n))}

    @staticmethod
    def _as_segments(segments) -> list[torch.Tensor]:
        """Segments as a list of [B, S] LongTensors (accepts [S] items, [B, S] items or one [B, n, S] tensor)."""
        if isinstance(segments, torch.Tensor):
            if segments.dim() == 2:
                segments = segments.unsqueeze(0)
            return [segments[:, i] for i in range(segments.shape[1])]
        out = [s if s.dim() == 2 else s.view(1, -1) for s in segments]
        if not out:
            raise UserError("rmt training: empty sample; fix: give samples of at least one segment")
        return out

    # ---- checkpoints -----------------------------------------------------------------------------------------
    def _shipped_for_run(self) -> Path | None:
        """The shipped checkpoint of the run's memory size (RMT's lookup, also for derived names, whose one-argument
        ``shipped_checkpoint`` cannot see the options)."""
        return RMT.shipped_checkpoint(self.lm.name, self.options)

    def _training_hint(self) -> str:
        size = self.options.get("num_mem_tokens")
        return f" with --method-arg num_mem_tokens={size}" if size is not None else ""

    @classmethod
    def shipped_checkpoint(cls, model: str, options: dict | None = None) -> Path | None:
        """The shipped RMT checkpoint for ``model`` (shared by ``rmt`` and ``rmt_reset``) with the memory size
        ``options["num_mem_tokens"]`` asks for, if any: ``rmt-<model>`` holds the default size (16), another size
        M lives in ``rmt-m<M>-<model>``; a directory whose recorded size differs does not count."""
        size = (options or {}).get("num_mem_tokens")
        size = None if size is None else int(size)
        shipped = SHIPPED / (f"rmt-{model}" if size in (None, DEFAULT_MEMORY) else f"rmt-m{size}-{model}")
        if not (shipped / CONFIG_FILE).is_file():
            return None
        return shipped if size is None or _checkpoint_config(shipped).get("num_mem_tokens") == size else None

    def save_checkpoint(self, directory, meta: dict | None = None) -> None:
        """Write the LoRA adapter, the memory embedding, the RMT settings and ``meta`` to ``directory``."""
        cfg = {"method": "rmt", "base_model": self.lm.name, "num_mem_tokens": self.num_mem,
               "segment_len": self.segment_len, "k2": self.k2, "curriculum": self.curriculum,
               "lora_r": self.lora["r"], "lora_alpha": self.lora["alpha"], "lora_dropout": self.lora["dropout"],
               "lora_targets": self.lora["targets"], **(meta or {})}
        save_checkpoint_files(directory, self.peft, {"memory": self.memory}, MEMORY_FILE, cfg, CONFIG_FILE)

    def load_checkpoint(self, directory) -> None:
        """Load the LoRA adapter and memory embedding written by ``save_checkpoint``."""
        self.checkpoint_id = load_checkpoint_files(directory, self.peft, {"memory": self.memory}, MEMORY_FILE,
                                                     CONFIG_FILE, "rmt", self.lm.name, SHIPPED)

    def config(self) -> dict:
        """Options plus the resolved checkpoint (path and content hash) and architecture settings."""
        return {"name": self.name, **self.options, "checkpoint_id": self.checkpoint_id, "num_mem_tokens": self.num_mem,
                "lora": self.lora, "carry_memory": not self.reset_each_segment}  # key kept: run configs hash it

    # ---- QA ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def ingest(self, items) -> None:
        """Read the items (dated lines, in order) recurrently into the memory, one segment at a time."""
        for segment in self._history_segments(items):
            self.score_segment(segment)

    def answer(self, question: str, now: float | None = None) -> Answer:
        """Generate from ``[first prompt token][memory][rest of the closed-book chat prompt]``."""
        return answer_from_memory(self, self.carried_memory(), question)

    def answer_nll(self, question: str, texts: list[str], now: float | None = None,
                   given: Answer | None = None) -> AnswerNLL:
        """Mean per-token NLL of each text after ``[first prompt token][memory][rest of the closed-book prompt]``:
        the input ``answer`` generates from, run once through the adapted model with a KV cache."""
        return answer_nll_from_memory(self, self.carried_memory(), question, texts, given)


@register_method
class RMTReset(RMT):
    """RMT's adapter with the memory re-initialised at every segment (the memory's own contribution control)."""

    name = "rmt_reset"
    description = "RMT adapter, memory emptied at every segment (control)"
    reset_each_segment = True

    def ingest(self, items) -> None:
        """Nothing to read: every answer starts from the learned initial memory, which no segment changes when the
        memory is re-initialised at every segment (so the reading's cost is not counted either, as ICAE's and
        Activation Beacon's reset controls count none)."""
