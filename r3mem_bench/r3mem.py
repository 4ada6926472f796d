"""R3Mem: retention and retrieval through reversible context compression, as one readable module.

What the paper states (Wang, Wang, Zhu, Liu, "R3Mem: Bridging Memory Retention and Retrieval via Reversible
Compression", Findings of ACL 2025, arXiv 2502.15957; abstract and Figure 2 caption; no public code)
------------------------------------------------------------------------------------------------------------
* A memory network optimised for both retention and retrieval through reversible context compression.
* Virtual memory tokens compress and encode arbitrarily long histories.
* Hierarchical compression: raw text becomes compact representations at document, paragraph and entity level,
  with context-query pairs built at those levels.
* A reversible architecture: a forward model compresses; a backward model reconstructs the original information
  from the compressed memory ("invoking the model backward").
* Parameter-efficient fine-tuning (adapters), so it attaches to any Transformer; bidirectional and
  cycle-consistent training losses.

Design choices made here to fill the gaps (see ../shared/design/r3mem.md for the probes behind them)
------------------------------------------------------------------------------------------------------
* Base: the frozen decoder; two peft LoRA adapters on every linear layer, ``compress`` (forward model) and
  ``expand`` (backward model), switched per pass; M learned memory-slot embeddings and one learned
  reconstruction-marker embedding. Relatives: ICAE (Ge et al. 2024, getao/icae: LoRA encoder + memory slots,
  frozen decoder reconstructs from ``[memory, AE token]``), RMT (Bulatov et al. 2022,
  booydar/recurrent-memory-transformer: recurrent memory tokens across segments), gisting (Mu et al. 2023:
  the gist tokens' keys/values are the compressed prompt).
* Memory = the slots' keys and values at every layer (a KV memory, as in gisting), not last-layer states re-fed
  as embeddings. Measured in the design doc with SmolLM2-135M on 2 CPU threads: re-fed last-layer states wreck
  the model unless rescaled (PPL 856 -> 60) and barely reconstruct (33% token accuracy vs 32% with an empty
  memory); a KV memory with LoRA r16 on every linear layer at lr 1e-3 reconstructs at 53.5% vs 18.4% empty.
* Layout of every pass: ``[BOS @0][memory @1..M][marker @M+1][text and new slots @M+2..]``. A real token
  stays at position 0 (attention sink: a memory vector there derailed the model in the probe). The new slots
  sit among the text at their natural positions (``slot_layout``, below); their keys are then re-rotated (RoPE
  is a rotation, so rotating by -shift moves a key to another position exactly) to positions 1..M, so a memory
  is position-independent and the recurrence ``memory_t = compress(segment_t | memory_{t-1})`` keeps the same
  layout for ever: a constant-size state for any history length. ``slot_positions=ordered`` (default) keys
  written slot j at position 1+j, as the empty memory's slots sit; ``collapsed`` keys every written slot at
  position 1, which is how the shipped anchored checkpoint was trained (checkpoints without the key load with the
  positions they were trained with: ``ordered`` for ``append``, ``collapsed`` for the interleaved layouts).
* Where the slots go (``slot_layout``). ``append``: all M slots after the text (the v1-v3 checkpoints; old
  checkpoints without the key load as ``append``). ``interleave``: slot j right after text token
  ceil((j+1)T/M)-1, so each slot follows the span it summarises, as Activation Beacon's beacons do (Zhang et
  al. 2024, arXiv 2401.03462); every slot still sees the whole prefix. ``anchored`` (default since v4):
  interleaved, and slot j's input embedding is its learned vector plus the embedding of the text token just
  before it, so each virtual token starts out as a copy of a real one and the expand adapter can read it as
  text. Measured reason (stage-1 autoencoding, same data, seed and samples; teacher-forced reconstruction
  accuracy on the training stream, mean of steps 61-98 / 351-400): append 0.439 / 0.452, interleave 0.424 /
  (stopped), anchored 0.516 / 0.581 (``results/r3mem/probes/``; a higher learning rate, 3e-3, was worse too).
* Forward (retain, ``compress`` adapter): ``[BOS][memory][BOS as read marker][segment][slots]`` writes the next
  memory (the slots' keys/values). The memory before the first segment is the "empty" memory: the slots run
  through ``[BOS][slots]`` alone.
* Backward (retrieve, ``expand`` adapter): ``[BOS][memory][AE marker]`` decodes the text (teacher forcing in
  training, greedy in ``reconstruct(memory)``), ending with EOS.
* Reading the memory for the next segment (``reader`` option). ``reader=expand`` (default since the shipped
  two-stage checkpoint): the decoder side reads, as in ICAE where one decoder both reconstructs (AE token) and
  continues (LM token) from the memory: ``[BOS][memory][BOS][segment]`` under ``expand`` scores the segment
  (the read marker BOS predicts its first token; no_memory starts from the same BOS), then a ``compress``
  pass writes. Measured reason: with ``reader=compress`` (one pass reads and writes) the reconstruction
  warm-up that teaches the writer drifted the same adapter's reading (KL to the base model 1.0-1.3 nats), and
  the 150-step run of that design gave no memory gain over its reset control (36.00 vs 35.56); with the expand
  reader the writer may change freely and the reader is the adapter that has learnt to attend to memories.
  Cost: two passes per segment instead of one, counted in ``tokens_processed``. Old checkpoints without the
  option load as ``reader=compress``.
* Training in two stages with the project's ``train`` command: (1) ``recon_warmup_steps`` steps of
  autoencoding only (one segment -> memory -> reconstruct it; ICAE's pretraining objective), which teaches the
  writer to put the text into the slots; (2) ``train --init-from STAGE1`` with every loss below.
* Losses (weights in the options): ``lm`` = next-segment NLL given the recurrent memory (segments 2..K);
  ``kl`` = KL(base || adapted) on the first segment, read with the empty memory (keeps the adapter's own drift
  small: the probe lost ~8 PPL to drift on other text); ``recon`` = reconstruction NLL of the last segment
  from the memory (g(f(x)) ~ x); ``cycle`` = 1 - cosine between the memory of the (argmax, stop-gradient)
  reconstruction and the memory itself (f(g(m)) ~ m).
* Hierarchy, as context-query pairs sampled per training sample (``level_probs``): document (the recurrent
  memory over consecutive segments -> next segment), paragraph (one paragraph's memory -> its key sentence,
  taken as its first sentence) and entity (the sentences mentioning an entity, found by the pluggable offline
  extractor of ``r3mem_bench.entities`` -> another sentence about it). In QA, each item (passage / turn /
  session) becomes a paragraph memory, frequent entities get entity memories keyed by their name, and a
  document memory runs over the whole history. A question is matched to paragraph memories by query
  likelihood (how much a memory lowers the NLL of the question through the read path, relative to the
  empty memory) and to entity memories by name. ``qa_reader=reconstruct`` (default): the chosen memories are
  reconstructed and the reconstructions are the context of the shared prompt. ``qa_reader=memory`` (variant
  ``r3mem_kv``): the answer is read, as gist tokens and ICAE condition generation do, directly after the chosen
  memories' key/values, ``[BOS][memories][read marker][closed-book prompt]``, through the reading adapter (as many
  memories as fit in ``max_memory_tokens`` slots); no text context. No QA objective is trained: the reader has
  only learned to continue the compressed text. Stored memories are float16.
* Memory size: the checkpoint holds ``max_memory_tokens`` slots and training samples M from
  ``train_memory_sizes`` per sample (nested slots), so one checkpoint serves ``memory_tokens`` = 8/16/32/64.
* Variants: ``r3mem_kv`` (QA answered from the memories' key/values, above), ``r3mem_reset`` (same weights,
  memory emptied at every segment: the adapter's share),
  ``r3mem_no_hier`` (document level only: QA keeps one recurrent memory) and ``r3mem_no_cycle``
  (w_recon = w_cycle = 0). The last two change training: each loads its own shipped checkpoint
  (``results/checkpoints/<variant>-<model>``) when there is one, else R3Mem's (then they differ from ``r3mem``
  only at inference). Both ship their own (same data and token budget): ``r3mem_no_cycle`` one stage of LM +
  KL, ``r3mem_no_hier`` v3's stage 1 + a document-level-only stage 2; both use the ``append`` layout of v3
  (not retrained for v4's anchored slots).
* Training data (not from the paper; the paper trains on large corpora we cannot fetch offline): the
  bundled Wikipedia paragraphs of HotpotQA/MuSiQue train, pydoc train topics and tinyshakespeare (2:1:1).
  Measured reason: trained on pydoc + Shakespeare only (v2), the memory helped on held-out pydoc but hurt on
  WikiText-2 (PPL 36.3 vs 34.9 for its reset control); with the Wikipedia text it helps on both.

Measured numbers of the shipped checkpoints live next to their runs, in ``results/r3mem/README.md``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn.functional as F

from r3mem_bench.entities import EXTRACTORS, entity_contexts, sentences
from r3mem_bench.errors import UserError
from r3mem_bench.method import Answer, AnswerNLL, MemoryItem, MemoryMethod, tensor_bytes
from r3mem_bench.methods.checkpoints import SHIPPED, resolve_checkpoint
from r3mem_bench.methods.registry import register_method
from r3mem_bench.scoring import token_nll

CHECKPOINT_FORMAT = "r3mem-checkpoint/1"
WEIGHTS, META = "r3mem.safetensors", "r3mem.json"

# Options: architecture (fixed by a checkpoint) and behaviour (free at run time).
ARCH_DEFAULTS = {"max_memory_tokens": 64, "lora_r": 8, "lora_alpha": 16, "lora_targets": "all-linear",
                 "reader": "expand", "slot_layout": "anchored", "slot_positions": "ordered"}
LEGACY_ARCH = {"reader": "compress", "slot_layout": "append"}  # checkpoints written before an option existed behave as they were trained
SLOT_POSITIONS = ("ordered", "collapsed")


def trained_arch(config: dict, key: str):
    """The value of architecture option ``key`` a checkpoint was trained with (its JSON ``config``).

    Checkpoints written before an option existed behave as they were trained: ``reader=compress``,
    ``slot_layout=append``, and for ``slot_positions`` the positions the code of their time wrote: slot j at 1+j
    (``ordered``) for the ``append`` layout, every written slot at 1 (``collapsed``) for the interleaved layouts.
    """
    if key in config:
        return config[key]
    if key == "slot_positions":
        return "ordered" if trained_arch(config, "slot_layout") == "append" else "collapsed"
    return LEGACY_ARCH.get(key)
RUN_DEFAULTS = {
    "memory_tokens": 16, "segment_len": 128, "train_segments": 3, "train_memory_sizes": [8, 16, 32, 64],
    "train_memory_probs": [0.2, 0.5, 0.2, 0.1], "level_probs": [0.6, 0.2, 0.2], "w_lm": 1.0, "w_kl": 1.0,
    "w_recon": 1.0, "w_cycle": 0.2, "lr_compress_scale": 0.3, "top_k": 3, "max_entities": 32,
    "entity_extractor": "capitalised", "max_item_tokens": 512, "recon_max_tokens": 160, "save_dtype": "float16",
    "recon_warmup_steps": 0, "recon_no_repeat_ngram": 0, "qa_reader": "reconstruct",
}
QA_READERS = ("reconstruct", "memory")
LEVELS = ("document", "paragraph", "entity")
INGEST_CACHE_VERSION = 1  # bump when ingest's memories change for the same inputs: cached ones are recomputed
INGEST_INDEX, INGEST_TENSORS = "r3mem-ingest-index", "r3mem-ingest-memories"  # kinds of the run's ingest cache


def _valid_ingest(index, tensors) -> bool:
    """Whether a cached index and its tensors describe one ingest (bank entries with their memories)."""
    bank = index.get("bank") if isinstance(index, dict) else None
    return (isinstance(bank, list) and isinstance(index.get("tokens"), int) and isinstance(tensors, dict)
            and "document" in tensors and set(tensors) == {"document", *(f"bank/{i}" for i in range(len(bank)))}
            and all(isinstance(e, dict) and isinstance(e.get("ids"), list) and e.get("kind") in ("paragraph", "entity")
                    for e in bank))


def rotate_keys(keys: torch.Tensor, shift: int | torch.Tensor, rotary) -> torch.Tensor:
    """Move RoPE keys [..., T, D] by ``shift`` positions (an int, or one shift per key: LongTensor [T]), exactly."""
    shift = torch.as_tensor(shift, dtype=torch.long, device=keys.device).reshape(1, -1)  # [1, 1] or [1, T]
    cos, sin = rotary(keys, shift)  # [1, 1 or T, D]
    half = keys.shape[-1] // 2
    rotated = torch.cat((-keys[..., half:], keys[..., :half]), dim=-1)
    return keys * cos[0] + rotated * sin[0]


def repeated_ngram_ends(seq: list[int], n: int) -> list[int]:
    """Tokens that would repeat an n-gram already in ``seq`` if appended (n <= 0: none); greedy decoding's
    no-repeat-n-gram rule, as ``no_repeat_ngram_size`` in transformers' ``generate``."""
    if n <= 0 or len(seq) < n - 1:
        return []
    prefix = seq[len(seq) - n + 1:] if n > 1 else []
    return sorted({seq[i + n - 1] for i in range(len(seq) - n + 1) if seq[i:i + n - 1] == prefix})


def slot_order(T: int, M: int, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the M slots go among T text tokens: (permutation of ``[text, slots]`` into pass order [T+M],
    sequence index of each slot [M]). ``append``: all slots after the text. ``interleave``: slot j right after
    text token ceil((j+1)*T/M)-1, so each slot follows the span it summarises (Activation Beacon's layout)."""
    if layout == "append":  # "anchored" is "interleave" with another slot input (see R3Mem.compress)
        after = torch.full((M,), T, dtype=torch.long)
    else:
        after = torch.tensor([-(-(j + 1) * T // M) for j in range(M)], dtype=torch.long)  # text tokens before slot j
    slot_index = after + torch.arange(M)  # [M]
    is_slot = torch.zeros(T + M, dtype=torch.bool)
    is_slot[slot_index] = True
    order = torch.empty(T + M, dtype=torch.long)
    order[~is_slot] = torch.arange(T)
    order[is_slot] = T + torch.arange(M)
    return order, slot_index


@register_method
class R3Mem(MemoryMethod):
    """R3Mem with a recurrent KV memory, compress/expand LoRA adapters and hierarchical memories."""

    name = "r3mem"
    description = "reversible compression: recurrent KV memory, LoRA compress/expand, hierarchy (this work)"
    trainable = True
    batched_training = True  # training_losses takes [B, S] segments (trainer --micro-batch)
    hierarchy = True
    reset_each_segment = False
    loss_overrides: dict[str, float] = {}
    own_weights = False  # look for a shipped checkpoint under this variant's own name first

    def __init__(self, lm, options: dict[str, Any] | None = None, generator=None, prompt=None):
        super().__init__(lm, options, generator, prompt)
        opts = dict(self.options)
        if "memory_budget" in opts and "memory_tokens" not in opts:
            opts["memory_tokens"] = opts["memory_budget"]
        self.training = self.for_training and "checkpoint" not in opts
        ckpt_meta = None
        if not self.training and not opts.get("untrained"):
            ckpt_dir = self._checkpoint_dir(opts.get("checkpoint"))
            ckpt_meta = self._read_meta(ckpt_dir)
            for key in ARCH_DEFAULTS:
                opts.setdefault(key, trained_arch(ckpt_meta["config"], key))
        unknown = set(opts) - set(ARCH_DEFAULTS) - set(RUN_DEFAULTS) - {"checkpoint", "untrained", "memory_budget", "train_steps"}
        if unknown:
            raise UserError(f"r3mem: unknown option '{sorted(unknown)[0]}'; fix: use one of "
                            f"{sorted(set(ARCH_DEFAULTS) | set(RUN_DEFAULTS))}")
        self.cfg = {**ARCH_DEFAULTS, **RUN_DEFAULTS, **{k: v for k, v in opts.items() if k in ARCH_DEFAULTS or k in RUN_DEFAULTS},
                    **self.loss_overrides}
        if "memory_tokens" not in opts:  # default 16, or all the slots of a smaller checkpoint
            self.cfg["memory_tokens"] = min(RUN_DEFAULTS["memory_tokens"], int(self.cfg["max_memory_tokens"]))
        if not self.hierarchy:
            self.cfg["level_probs"] = [1.0, 0.0, 0.0]
        self.M = int(self.cfg["memory_tokens"])
        if self.cfg["reader"] not in ("expand", "compress"):
            raise UserError(f"r3mem: reader={self.cfg['reader']!r}; fix: use reader=expand or reader=compress")
        if self.cfg["slot_layout"] not in ("append", "interleave", "anchored"):
            raise UserError(f"r3mem: slot_layout={self.cfg['slot_layout']!r}; fix: use slot_layout=anchored, interleave or append")
        if self.cfg["slot_positions"] not in SLOT_POSITIONS:
            raise UserError(f"r3mem: slot_positions={self.cfg['slot_positions']!r}; fix: use slot_positions=ordered "
                            "(written slot j keyed at position 1+j) or collapsed (every written slot at 1)")
        if self.cfg["reader"] == "compress" and "slot_layout" not in opts:
            self.cfg["slot_layout"] = "append"  # the one layout the one-pass reader supports
        if self.cfg["slot_layout"] != "append" and self.cfg["reader"] == "compress":
            raise UserError(f"r3mem: slot_layout={self.cfg['slot_layout']} puts slots inside the text the compress pass reads; "
                            "fix: use reader=expand with it, or slot_layout=append")
        if self.cfg["qa_reader"] not in QA_READERS:
            raise UserError(f"r3mem: qa_reader={self.cfg['qa_reader']!r}; fix: use qa_reader=reconstruct (reconstructions "
                            "in the prompt) or qa_reader=memory (the answer reads the memories' key/values)")
        if not 1 <= self.M <= int(self.cfg["max_memory_tokens"]):
            raise UserError(f"r3mem: memory_tokens={self.M} but the checkpoint has {self.cfg['max_memory_tokens']} "
                            "slots; fix: use memory_tokens between 1 and that, or train with a larger max_memory_tokens")
        self._build()
        if ckpt_meta is not None:
            self.load_checkpoint(ckpt_dir)
        self._cache: dict[str, torch.Tensor] = {}
        self.reset()

    # ---- construction --------------------------------------------------------------------------------------
    def _build(self) -> None:
        """Copy the frozen base model, add the two LoRA adapters and the slot/marker embeddings."""
        import copy

        from peft import LoraConfig, get_peft_model

        base = copy.deepcopy(self.lm.model)  # the shared model stays untouched for other methods of the run
        targets = self.cfg["lora_targets"]
        lora = dict(r=int(self.cfg["lora_r"]), lora_alpha=int(self.cfg["lora_alpha"]), lora_dropout=0.0,
                    target_modules=targets if targets == "all-linear" else list(targets))
        self.net = get_peft_model(base, LoraConfig(**lora), adapter_name="compress")
        self.net.add_adapter("expand", LoraConfig(**lora))
        causal = self.net.base_model.model
        self.decoder, self.lm_head = causal.model, causal.lm_head  # LlamaModel-like, Linear
        self.embed = self.decoder.get_input_embeddings()
        self.rotary = self.decoder.rotary_emb
        cfg = causal.config
        self.shape = {"hidden": int(cfg.hidden_size), "layers": int(cfg.num_hidden_layers),
                      "kv_heads": int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads),
                      "head_dim": int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads),
                      "vocab": int(cfg.vocab_size)}
        d = self.shape["hidden"]
        scale = self.embed.weight.detach().std().item()
        device = self.lm.device
        # slots [M_max, d] start as random real-token embeddings (on the input scale); marker [d] likewise
        pick = torch.randint(0, self.shape["vocab"], (int(self.cfg["max_memory_tokens"]) + 1,))
        init = self.embed.weight.detach()[pick].clone() + 0.1 * scale * torch.randn(len(pick), d)
        self.slots = torch.nn.Parameter(init[:-1].to(device))  # [M_max, d]
        self.ae_marker = torch.nn.Parameter(init[-1].to(device))  # [d]
        self.bos = int(self.lm.prefix_token_id)
        self.eos = self.lm.tokenizer.eos_token_id
        self.net.eval()
        for p in self.net.parameters():
            p.requires_grad_(False)
        self._adapter = None
        self._use("compress")

    def _use(self, adapter: str) -> None:
        """Activate one LoRA adapter (both stay trainable while training)."""
        if self._adapter == adapter:
            return
        self.net.base_model.set_adapter(adapter)
        for name, p in self.net.named_parameters():
            p.requires_grad_(self.training and "lora_" in name)
        self._adapter = adapter

    # ---- trainer interface (see r3mem_bench/train.py) -------------------------------------------------------
    def trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        """LoRA weights of both adapters, the memory slots and the reconstruction marker."""
        out = {n: p for n, p in self.net.named_parameters() if "lora_" in n}
        out["slots"], out["ae_marker"] = self.slots, self.ae_marker
        return out

    def param_groups(self, lr: float) -> list[dict]:
        """Slots, marker and expand adapter at ``lr``; the compress adapter slower (less drift of the reader)."""
        params = self.trainable_parameters()
        compress = [p for n, p in params.items() if ".compress." in n]
        rest = [p for n, p in params.items() if ".compress." not in n]
        return [{"params": rest, "lr": lr}, {"params": compress, "lr": lr * float(self.cfg["lr_compress_scale"])}]

    def train(self, flag: bool = True) -> None:
        """Enter (or leave) training: gradients flow into the adapters and slots, caches are off."""
        self.training = flag
        self.slots.requires_grad_(flag)
        self.ae_marker.requires_grad_(flag)
        adapter, self._adapter = self._adapter, None
        self._use(adapter or "compress")
        self._cache = {}

    # ---- passes -------------------------------------------------------------------------------------------
    def _forward(self, past: torch.Tensor | None, embeds: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoder over ``embeds`` [B, T, d] at positions start.. after ``past`` KV [L, 2, B, H, P, D].

        Returns the last hidden states [B, T, d] and the new keys/values [L, 2, B, H, T, D].
        """
        from transformers import DynamicCache

        T = embeds.shape[1]
        cache = DynamicCache(ddp_cache_data=[(kv[0], kv[1]) for kv in past]) if past is not None else DynamicCache()
        positions = torch.arange(start, start + T, device=embeds.device).unsqueeze(0).expand(embeds.shape[0], -1)
        out = self.decoder(inputs_embeds=embeds, cache=cache, position_ids=positions, use_cache=True)
        new_kv = torch.stack([torch.stack([layer.keys[:, :, -T:], layer.values[:, :, -T:]]) for layer in cache.layers])
        return out.last_hidden_state, new_kv

    def _bos_kv(self, adapter: str, batch: int) -> torch.Tensor:
        """KV of the BOS token at position 0 under ``adapter``: [L, 2, B, H, 1, D]."""
        key = f"bos/{adapter}"
        if key not in self._cache or self.training:
            self._use(adapter)
            ids = torch.tensor([[self.bos]], device=self.lm.device)
            _, kv = self._forward(None, self.embed(ids), 0)
            if self.training:
                return kv.expand(-1, -1, batch, -1, -1, -1)
            self._cache[key] = kv
        return self._cache[key].expand(-1, -1, batch, -1, -1, -1)

    def empty_memory(self, M: int | None = None, batch: int = 1) -> torch.Tensor:
        """The memory before any text: the slots run after BOS alone. -> [L, 2, B, H, M, D]."""
        M = M or self.M
        key = f"empty/{M}"
        if key in self._cache and not self.training:
            return self._cache[key].expand(-1, -1, batch, -1, -1, -1)
        self._use("compress")
        bos = self._bos_kv("compress", 1)
        _, mem = self._forward(bos, self.slots[:M].unsqueeze(0), 1)  # slots at positions 1..M already
        if not self.training:
            self._cache[key] = mem
        return mem.expand(-1, -1, batch, -1, -1, -1)

    def compress(self, tokens: torch.Tensor, memory: torch.Tensor, write: bool = True
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Read ``tokens`` [B, T] after ``memory`` [L,2,B,H,M,D] and (``write``) fold them into a new memory.

        Returns hidden states [B, T, d] that predict tokens[:, 0..T-1] (from the read marker and tokens[:, :-1])
        and the new memory [L, 2, B, H, M, D] (None when not writing).
        """
        self._use("compress")
        B, T = tokens.shape
        M = memory.shape[-2]
        past = torch.cat([self._bos_kv("compress", B), memory], dim=-2)  # [L,2,B,H,1+M,D]
        read = self.embed(torch.full((B, 1), self.bos, device=tokens.device))  # [B, 1, d]
        if not write:
            hidden, _ = self._forward(past, torch.cat([read, self.embed(tokens)], dim=1), M + 1)
            return hidden[:, :T], None
        order, slot_index = slot_order(T, M, self.cfg["slot_layout"])
        text = self.embed(tokens)  # [B, T, d]
        slots = self.slots[:M].unsqueeze(0).expand(B, -1, -1)  # [B, M, d]
        if self.cfg["slot_layout"] == "anchored":  # slot j also carries the embedding of the token just before it
            slots = slots + text[:, (slot_index - torch.arange(M) - 1).clamp(min=0).to(text.device)]
        body = torch.cat([text, slots], dim=1)[:, order]
        hidden, kv = self._forward(past, torch.cat([read, body], dim=1), M + 1)  # body k at position M+2+k
        slot_kv = kv[..., 1 + slot_index.to(kv.device), :]  # [L,2,B,H,M,D]
        target = 1 + torch.arange(M) if self.cfg["slot_positions"] == "ordered" else torch.ones(M, dtype=torch.long)
        keys = rotate_keys(slot_kv[:, 0], target - (M + 2 + slot_index), self.rotary)  # slot j -> position target[j]
        text_index = torch.cat([torch.zeros(1, dtype=torch.long), 1 + (order < T).nonzero()[:-1, 0]])  # [T]
        return hidden[:, text_index.to(hidden.device)], torch.stack([keys, slot_kv[:, 1]], dim=1)

    def expand_logits(self, memory: torch.Tensor, tokens: torch.Tensor, marker: torch.Tensor | None = None
                      ) -> torch.Tensor:
        """Teacher-forced decoding under ``expand``: logits [B, T, V] predicting ``tokens`` [B, T] from the memory
        and ``marker`` [d] (default: the reconstruction marker, i.e. reconstruction from the memory alone)."""
        self._use("expand")
        B, T = tokens.shape
        M = memory.shape[-2]
        past = torch.cat([self._bos_kv("expand", B), memory], dim=-2)
        marker = self.ae_marker if marker is None else marker
        embeds = torch.cat([marker.view(1, 1, -1).expand(B, 1, -1), self.embed(tokens[:, :-1])], dim=1)
        hidden, _ = self._forward(past, embeds, M + 1)
        return self.lm_head(hidden)

    def read(self, tokens: torch.Tensor, memory: torch.Tensor, write: bool = True
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits [B, T, V] of ``tokens`` [B, T] given ``memory``, and (``write``) the memory that absorbed them.

        ``reader=compress``: one ``compress`` pass reads and writes. ``reader=expand`` (ICAE-style decoder): the
        ``expand`` adapter reads ``[BOS][memory][BOS][tokens]`` as it reads for reconstruction, only with the
        read marker (BOS) instead of the reconstruction marker; a separate ``compress`` pass writes.
        """
        if self.cfg["reader"] == "compress":
            hidden, new = self.compress(tokens, memory, write=write)
            return self.lm_head(hidden), new
        read_marker = self.embed(torch.tensor(self.bos, device=tokens.device))  # [d]
        logits = self.expand_logits(memory, tokens, marker=read_marker)
        new = self.compress(tokens, memory, write=True)[1] if write else None
        return logits, new

    def read_cost(self, T: int, M: int, write: bool) -> int:
        """Tokens run through the model by one ``read`` of T tokens with M memory slots."""
        one_pass = 1 + T + (M if write else 0)
        return one_pass if self.cfg["reader"] == "compress" else (1 + T) + (1 + T + M if write else 0)

    @torch.no_grad()
    def reconstruct_ids(self, memory: torch.Tensor, max_tokens: int | list[int] | None = None) -> list[list[int]]:
        """Greedy decoding of each memory in the batch [L,2,B,H,M,D] until EOS or ``max_tokens``."""
        from transformers import DynamicCache

        self._use("expand")
        B, M = memory.shape[2], memory.shape[-2]
        caps = max_tokens if isinstance(max_tokens, list) else [int(max_tokens or self.cfg["recon_max_tokens"])] * B
        past = torch.cat([self._bos_kv("expand", B), memory.float()], dim=-2)
        cache = DynamicCache(ddp_cache_data=[(kv[0], kv[1]) for kv in past])
        x = self.ae_marker.view(1, 1, -1).expand(B, 1, -1)
        out: list[list[int]] = [[] for _ in range(B)]
        done = [False] * B
        pos = M + 1
        for _ in range(max(caps)):
            h = self.decoder(inputs_embeds=x, cache=cache, use_cache=True,
                             position_ids=torch.full((B, 1), pos, device=x.device)).last_hidden_state
            logits = self.lm_head(h[:, -1])  # [B, V]
            for b in range(B):
                banned = repeated_ngram_ends(out[b], int(self.cfg["recon_no_repeat_ngram"]))
                if banned:
                    logits[b, banned] = float("-inf")
            nxt = logits.argmax(-1)  # [B]
            for b in range(B):
                if not done[b]:
                    if int(nxt[b]) == self.eos or len(out[b]) >= caps[b]:
                        done[b] = True
                    else:
                        out[b].append(int(nxt[b]))
            self.tokens_processed += B
            if all(done):
                break
            x, pos = self.embed(nxt.unsqueeze(1)), pos + 1
        return out

    def reconstruct(self, memory: torch.Tensor, max_tokens: int | None = None) -> str:
        """Decode the text a single memory [L,2,1,H,M,D] (or [L,2,H,M,D]) holds."""
        if memory.dim() == 5:
            memory = memory.unsqueeze(2)
        return self.lm.tokenizer.decode(self.reconstruct_ids(memory, max_tokens)[0])

    # ---- LM streams --------------------------------------------------------------------------------------
    def reset(self) -> None:
        """New document / corpus: empty recurrent memory, empty memory bank."""
        self.memory: torch.Tensor | None = None  # [L,2,1,H,M,D]
        self.bank: list[dict] = []  # QA: {"ids", "kind", "key", "memory" [L,2,H,M,D] fp16, "tokens"}

    @torch.no_grad()
    def score_segment(self, segment_ids: torch.Tensor) -> torch.Tensor:
        """NLL [S] of the segment given the recurrent memory; the memory then absorbs the segment."""
        memory = self.memory if (self.memory is not None and not self.reset_each_segment) else self.empty_memory()
        tokens = segment_ids.to(self.lm.device).unsqueeze(0)  # [1, S]
        logits, new = self.read(tokens, memory, write=not self.reset_each_segment)
        nll = token_nll(logits, tokens)[0].cpu()
        self.memory = new if new is not None else memory
        self.tokens_processed += self.read_cost(tokens.shape[1], self.M, new is not None)
        return nll

    def lm_state_bytes(self) -> int:
        """Keys and values of the M slots in every layer, carried into the next segment (none for the reset
        control)."""
        if self.reset_each_segment:
            return 0
        s = self.shape
        elem = self.embed.weight.element_size()
        return 2 * s["layers"] * s["kv_heads"] * self.M * s["head_dim"] * elem

    def state_bytes(self) -> int:
        """Bytes of the stored memory tensors (+ entity key strings in QA)."""
        bank = sum(tensor_bytes(e["memory"]) + len(e.get("key", "").encode()) for e in self.bank)
        return tensor_bytes(self.memory) + bank

    # ---- training --------------------------------------------------------------------------------------
    def _lm_nll(self, memory: torch.Tensor, tokens: torch.Tensor, write: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Mean NLL of ``tokens`` [1, T] read after ``memory``; also the logits and the written memory."""
        logits, new = self.read(tokens, memory, write=write)
        return token_nll(logits, tokens).mean(), logits, new

    def _recon_and_cycle(self, memory: torch.Tensor, target: torch.Tensor, prev: torch.Tensor) -> dict[str, torch.Tensor]:
        """Reconstruction NLL of ``target`` [B, T] (+EOS) from ``memory`` and the cycle loss via ``prev`` memory."""
        out = {}
        eos = torch.full((target.shape[0], 1), self.eos, device=target.device)
        full = torch.cat([target, eos], dim=1)
        if self.cfg["w_recon"] > 0:
            logits = self.expand_logits(memory, full)
            nll = token_nll(logits, full)
            out["recon"] = nll.mean()
            out["recon_acc"] = (logits.argmax(-1) == full).float().mean().detach()
        if self.cfg["w_cycle"] > 0:
            if "recon" not in out:
                logits = self.expand_logits(memory, full)
            guess = logits[:, :-1].argmax(-1).detach()  # the reconstruction, stop-gradient: [1, T]
            _, again = self.compress(guess, prev.detach())
            out["cycle"] = (1 - F.cosine_similarity(again, memory.detach(), dim=-1)).mean()
        return out

    def _pair(self, segments: list[torch.Tensor], level: str) -> tuple[list[torch.Tensor], torch.Tensor] | None:
        """(context segments, query target) for a hierarchy level, built from the sample's text."""
        tok = self.lm.tokenizer
        S = int(self.cfg["segment_len"])
        text = tok.decode(torch.cat(segments).tolist())

        def ids(s: str, cap: int) -> torch.Tensor:
            return torch.tensor(tok(s, add_special_tokens=False)["input_ids"][:cap], dtype=torch.long)

        if level == "paragraph":
            paragraphs = [p for p in re.split(r"\n\s*\n", text) if len(p.split()) >= 12]
            if not paragraphs:
                return None
            par = paragraphs[int(torch.randint(len(paragraphs), (1,)))]
            first = sentences(par)[0]
            return [ids(par, S)], ids(first, 48)
        ents = entity_contexts(text, extractor=EXTRACTORS[self.cfg["entity_extractor"]])
        if not ents:
            return None
        names = list(ents)
        sents = ents[names[int(torch.randint(len(names), (1,)))]]
        return [ids(" ".join(sents[:-1]), S)], ids(sents[-1], 48)

    def training_losses(self, segments: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Losses of one training sample (consecutive [S] segments of one document), or of a micro-batch ([B, S]
        segments of B documents); ``loss`` is their weighted sum.

        Only the autoencoding warm-up takes a micro-batch (one pass for all B samples); after it each sample draws
        its own memory size and hierarchy level, so a micro-batch is refused (``--grad-accum`` gives the batch)."""
        c = self.cfg
        batched = segments[0].dim() == 2
        warmup = getattr(self, "train_step", 0) < int(c["recon_warmup_steps"])
        if batched and not warmup:
            raise UserError("r3mem: --micro-batch > 1 batches only the autoencoding warm-up (recon_warmup_steps); "
                            "fix: train later stages with --micro-batch 1 and --grad-accum for the batch")
        sizes, probs = c["train_memory_sizes"], torch.tensor(c["train_memory_probs"], dtype=torch.float)
        M = int(sizes[int(torch.multinomial(probs, 1))])
        dev = self.lm.device
        zero = torch.zeros((), device=dev)
        losses = {"lm": zero, "kl": zero, "recon": zero, "cycle": zero}
        if warmup:
            # autoencoding warm-up (as ICAE's pretraining): the memory of one segment must reconstruct it
            seg = segments[0].to(dev)
            seg = seg if batched else seg.unsqueeze(0)  # [B, S]
            empty = self.empty_memory(M, batch=seg.shape[0])
            _, memory = self.compress(seg, empty)
            losses.update(self._recon_and_cycle(memory, seg, empty))
            losses["loss"] = c["w_recon"] * losses["recon"] + c["w_cycle"] * losses["cycle"]
            losses["M"], losses["level_warmup"] = torch.tensor(float(M)), torch.tensor(1.0)
            return losses
        empty = self.empty_memory(M)
        level = LEVELS[int(torch.multinomial(torch.tensor(c["level_probs"], dtype=torch.float), 1))]
        pair = self._pair(segments, level) if level != "document" else None
        if pair is None:
            level = "document"
        if level == "document":
            memory, lm_terms = empty, []
            for t, seg in enumerate(segments):
                tokens = seg.to(dev).unsqueeze(0)
                nll, logits, new = self._lm_nll(memory, tokens, write=True)
                if t == 0 and c["w_kl"] > 0:
                    with torch.no_grad(), self.net.disable_adapter():
                        ref = self.net(input_ids=torch.cat([torch.tensor([[self.bos]], device=dev), tokens], 1)).logits[:, :-1]
                    losses["kl"] = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(ref, -1), log_target=True,
                                            reduction="none").sum(-1).mean()
                    self._adapter = None  # disable_adapter changed peft's state; re-select on next use
                elif t > 0:
                    lm_terms.append(nll)
                prev, memory = memory, new
            losses["lm"] = torch.stack(lm_terms).mean() if lm_terms else zero
            losses.update(self._recon_and_cycle(memory, segments[-1].to(dev).unsqueeze(0), prev))
        else:
            context, query = pair
            memory = empty
            for seg in context:
                prev, (_, memory) = memory, self.compress(seg.to(dev).unsqueeze(0), memory)
            losses["lm"], _, _ = self._lm_nll(memory, query.to(dev).unsqueeze(0), write=False)
            losses.update(self._recon_and_cycle(memory, context[-1].to(dev).unsqueeze(0), prev))
        losses["loss"] = (c["w_lm"] * losses["lm"] + c["w_kl"] * losses["kl"] + c["w_recon"] * losses["recon"]
                          + c["w_cycle"] * losses["cycle"])
        losses["M"] = torch.tensor(float(M))
        losses[f"level_{level}"] = torch.tensor(1.0)
        return losses

    # ---- checkpoints ---------------------------------------------------------------------------------------
    def _checkpoint_dir(self, given: str | None) -> Path:
        """The checkpoint to load: ``--checkpoint`` or the shipped one for this base model."""
        return resolve_checkpoint("r3mem", given, META, None if given else self.shipped_checkpoint(self.lm.name),
                                  self.lm.name)

    @classmethod
    def shipped_checkpoint(cls, model: str) -> Path | None:
        """This variant's own shipped checkpoint for ``model`` if it has one (``own_weights``), else R3Mem's."""
        own = SHIPPED / f"{cls.name}-{model}"  # an ablation's own shipped training, if any
        path = own if cls.own_weights and (own / META).exists() else SHIPPED / f"r3mem-{model}"
        return path if (path / META).exists() else None

    def _read_meta(self, path: Path) -> dict:
        """The checkpoint JSON, checked against this base model."""
        try:
            meta = json.loads((path / META).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise UserError(f"{path / META}: unreadable ({exc}); fix: retrain or pass another --checkpoint") from None
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise UserError(f"{path}: not an R3Mem checkpoint (format {meta.get('format')!r}); fix: pass a "
                            "directory written by `r3mem-bench train --method r3mem`")
        return meta

    def save_checkpoint(self, path: Path, meta: dict | None = None) -> None:
        """Write adapters + slots + marker (``save_dtype``) and the JSON with config, model shape and ``meta``."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        dtype = getattr(torch, self.cfg["save_dtype"])
        tensors = {n: p.detach().to(dtype).contiguous() for n, p in self.trainable_parameters().items()}
        save_file(tensors, str(path / WEIGHTS))
        body = {"format": CHECKPOINT_FORMAT, "method": self.name, "model": self.lm.name, "model_shape": self.shape,
                "config": {k: self.cfg[k] for k in sorted(self.cfg)}, **(meta or {})}
        (path / META).write_text(json.dumps(body, indent=1) + "\n")

    def load_checkpoint(self, path: Path) -> None:
        """Load a checkpoint; another base model or other shapes raise ``UserError``."""
        from safetensors.torch import load as load_safetensors

        path = Path(path)
        meta = self._read_meta(path)
        if meta.get("model_shape") != self.shape:
            raise UserError(f"{path}: trained for model '{meta.get('model')}' with shape {meta.get('model_shape')}, "
                            f"but the model is '{self.lm.name}' {self.shape}; fix: pass --model {meta.get('model')} "
                            "or a checkpoint trained for this model")
        for key in ARCH_DEFAULTS:  # e.g. --init-from a stage trained with another layout: refuse, do not retrain it
            trained = trained_arch(meta["config"], key)
            if trained is not None and trained != self.cfg[key]:
                raise UserError(f"{path}: trained with {key}={trained!r} but this R3Mem has {key}={self.cfg[key]!r}; "
                                f"fix: pass --method-arg {key}={trained} (or drop the option)")
        blob = (path / WEIGHTS).read_bytes()
        tensors = load_safetensors(blob)
        self.checkpoint_digest = hashlib.sha256(blob).hexdigest()[:16]
        params = self.trainable_parameters()
        if set(tensors) != set(params):
            raise UserError(f"{path}: its tensors do not match this R3Mem configuration (lora_r, targets); fix: "
                            "retrain or pass the matching checkpoint")
        with torch.no_grad():
            for n, p in params.items():
                if tensors[n].shape != p.shape:
                    raise UserError(f"{path}: tensor '{n}' has shape {tuple(tensors[n].shape)}, expected "
                                    f"{tuple(p.shape)}; fix: retrain or pass the matching checkpoint")
                p.copy_(tensors[n].to(p.dtype))
        self.checkpoint_meta = meta
        self._cache = {}

    def config(self) -> dict:
        """Options defining this method, with the checkpoint's identity."""
        out = {"name": self.name, **{k: v for k, v in self.cfg.items() if not k.startswith(("w_", "lr_", "train_"))
                                     and not (k == "qa_reader" and v == "reconstruct")}}
        meta = getattr(self, "checkpoint_meta", None)
        if meta:
            out["checkpoint"] = {"path": str(self.options.get("checkpoint") or "shipped"),
                                 "step": meta.get("training", {}).get("step"), "trained_as": meta.get("method"),
                                 "sha256": self.checkpoint_digest}  # a retrained checkpoint never resumes old runs
        return out

    # ---- QA: ingest / retrieve ---------------------------------------------------------------------------
    @torch.no_grad()
    def _memory_of(self, text: str, cap: int | None = None) -> tuple[torch.Tensor, int]:
        """Recurrent memory [L,2,1,H,M,D] of a text (chunks of segment_len from the empty memory), token count."""
        ids = self.lm.tokenizer(text, add_special_tokens=False)["input_ids"][: cap or int(self.cfg["max_item_tokens"])]
        memory = self.empty_memory()
        S = int(self.cfg["segment_len"])
        for start in range(0, len(ids), S):
            chunk = torch.tensor([ids[start: start + S]], device=self.lm.device)
            _, memory = self.compress(chunk, memory)
            self.tokens_processed += 1 + chunk.shape[1] + self.M
        return memory, len(ids)

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
        doc = self.memory if self.memory is not None else self.empty_memory()
        S = int(self.cfg["segment_len"])
        for item in items:
            ids = self.lm.tokenizer(item.text, add_special_tokens=False)["input_ids"][: int(self.cfg["max_item_tokens"])]
            for start in range(0, len(ids), S):
                chunk = torch.tensor([ids[start: start + S]], device=self.lm.device)
                _, doc = self.compress(chunk, doc)
                self.tokens_processed += 1 + chunk.shape[1] + self.M
            if self.hierarchy:
                memory, n = self._memory_of(item.text)
                self.bank.append({"ids": [item.id], "kind": "paragraph", "memory": memory[:, :, 0].half(), "tokens": n})
        self.memory = doc
        if not self.hierarchy:
            return
        mentions: dict[str, list[tuple[str, str]]] = {}
        extractor = EXTRACTORS[self.cfg["entity_extractor"]]
        for item in items:
            for ent, sents in entity_contexts(item.text, min_mentions=1, extractor=extractor).items():
                mentions.setdefault(ent, []).extend((item.id, s) for s in sents)
        frequent = sorted((e for e, m in mentions.items() if len({i for i, _ in m}) >= 2),
                          key=lambda e: (-len(mentions[e]), e))[: int(self.cfg["max_entities"])]
        for ent in frequent:
            memory, n = self._memory_of(" ".join(s for _, s in mentions[ent]), cap=S)
            self.bank.append({"ids": sorted({i for i, _ in mentions[ent]}), "kind": "entity", "key": ent,
                              "memory": memory[:, :, 0].half(), "tokens": n})

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
        scores = self._query_scores(question, [e["memory"] for e in paragraphs])
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
        parts = []
        for j, e in enumerate(chosen):
            mem = e["memory"].float().unsqueeze(2)  # [L,2,1,H,M,D]
            if j and self.cfg["slot_positions"] == "ordered":
                mem = torch.stack([rotate_keys(mem[:, 0], j * self.M, self.rotary), mem[:, 1]], dim=1)
            parts.append(mem)
        return torch.cat(parts, dim=-2), list(dict.fromkeys(i for e in chosen for i in e["ids"]))

    @torch.no_grad()
    def _read_prompt(self, question: str) -> tuple[torch.Tensor, torch.Tensor, int, list[str], int]:
        """Run ``[BOS][memory][read marker][closed-book prompt]`` through the reading adapter.

        Returns the logits [1, V] of the first answer token, the KV [L,2,1,H,P,D] after the prompt, the position of
        the next token, the item ids behind the memory and the number of positions read.
        """
        from r3mem_bench.generation import HFGenerator

        gen = self.generator if hasattr(self.generator, "encode") else HFGenerator(self.lm, system=self.prompt.system)
        memory, ids = self._answer_memory(question)
        Mt = memory.shape[-2]
        adapter = "expand" if self.cfg["reader"] == "expand" else "compress"
        self._use(adapter)
        prompt = torch.tensor([gen.encode(self.prompt.render(question=question, context=""))], device=self.lm.device)
        read_marker = self.embed(torch.full((1, 1), self.bos, device=self.lm.device))  # [1, 1, d]
        past = torch.cat([self._bos_kv(adapter, 1), memory], dim=-2)  # [L,2,1,H,1+Mt,D]
        hidden, kv = self._forward(past, torch.cat([read_marker, self.embed(prompt)], dim=1), Mt + 1)
        return (self.lm_head(hidden[:, -1]), torch.cat([past, kv], dim=-2), Mt + 2 + prompt.shape[1], ids,
                1 + Mt + 1 + prompt.shape[1])

    @torch.no_grad()
    def answer(self, question: str, now: float | None = None) -> Answer:
        """``qa_reader=reconstruct``: the shared prompt with the reconstructions as context. ``qa_reader=memory``:
        greedy decoding from ``[BOS][memories][read marker][closed-book prompt]`` (no text context)."""
        if self.cfg["qa_reader"] != "memory":
            return super().answer(question, now=now)
        logits, past, pos, ids, read = self._read_prompt(question)
        max_new = int(getattr(self.generator, "max_new_tokens", 32))
        out: list[int] = []
        for _ in range(max_new):
            nxt = int(logits.argmax(-1))
            if nxt == self.eos:
                break
            out.append(nxt)
            hidden, kv = self._forward(past, self.embed(torch.tensor([[nxt]], device=self.lm.device)), pos)
            past, pos, logits = torch.cat([past, kv], dim=-2), pos + 1, self.lm_head(hidden[:, -1])
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
        from r3mem_bench.generation import HFGenerator

        gen = self.generator if hasattr(self.generator, "continuation_ids") else HFGenerator(self.lm)
        last, past, pos, ids, read = self._read_prompt(question)
        if given is None:
            self.tokens_processed += read
        nll, counts = [], []
        for text in texts:
            cont = gen.continuation_ids(text)[: self.lm.max_length // 2]
            if not cont:
                nll.append(float("nan"))
                counts.append(0)
                continue
            target = torch.tensor([cont], device=self.lm.device)  # [1, C]
            logits = last.unsqueeze(1)  # [1, 1, V]
            if len(cont) > 1:
                hidden, _ = self._forward(past, self.embed(target[:, :-1]), pos)
                logits = torch.cat([logits, self.lm_head(hidden)], dim=1)
            nll.append(float(F.cross_entropy(logits[0].float(), target[0], reduction="sum")) / len(cont))
            counts.append(len(cont))
        return AnswerNLL(nll, counts, read, ids, "")

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


@register_method
class R3MemNoHier(R3Mem):
    """Ablation: no hierarchy. Trained on document-level pairs only; QA keeps only the recurrent document memory."""

    name = "r3mem_no_hier"
    description = "R3Mem without hierarchy (document-level memory only; train it separately for training effects)"
    hierarchy = False
    own_weights = True


@register_method
class R3MemNoCycle(R3Mem):
    """Ablation: no backward/cycle losses (w_recon = w_cycle = 0); meaningful only with its own training run."""

    name = "r3mem_no_cycle"
    description = "R3Mem trained without reconstruction/cycle losses (needs its own `train --method r3mem_no_cycle`)"
    loss_overrides = {"w_recon": 0.0, "w_cycle": 0.0}
    own_weights = True


@register_method
class R3MemKV(R3Mem):
    """R3Mem answering from the retrieved memories' key/values (``qa_reader=memory``), not their reconstructions."""

    name = "r3mem_kv"
    families = ("rag", "dialogue")
    description = "R3Mem's QA answer read directly from the retrieved memories' key/values (no reconstruction)"
    preset_options = {"qa_reader": "memory"}


@register_method
class R3MemReset(R3Mem):
    """Control: the same trained adapter, memory emptied at every segment (adapter effect without memory)."""

    name = "r3mem_reset"
    families = ("lm",)
    description = "R3Mem's adapter with the memory emptied at every segment (control)"
    reset_each_segment = True

