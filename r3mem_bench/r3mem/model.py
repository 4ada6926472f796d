"""The R3Mem memory network (see the package docstring): construction, the compress / expand / read passes over a
KV memory, LM streams, checkpoints and the trainer interface."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from r3mem_bench.errors import UserError
from r3mem_bench.method import MemoryMethod, tensor_bytes
from r3mem_bench.methods.checkpoints import SHIPPED, lora_copy, resolve_checkpoint
from r3mem_bench.methods.registry import register_method
from r3mem_bench.r3mem.layout import (ARCH_DEFAULTS, CHECKPOINT_FORMAT, META, ONE_VALUE_ARCH, QA_READERS, RUN_DEFAULTS,
                                      SLOT_POSITIONS, TRAIN_CHOICES, WEIGHTS, arch_problem, kv_cache, kv_pass,
                                      repeated_ngram_ends, rotate_keys, slot_order, trained_arch)
from r3mem_bench.r3mem.qa import QAMixin
from r3mem_bench.r3mem.training import TrainingMixin
from r3mem_bench.scoring import token_nll

@register_method
class R3Mem(QAMixin, TrainingMixin, MemoryMethod):
    """R3Mem with a recurrent KV memory, compress/expand LoRA adapters and hierarchical memories."""

    name = "r3mem"
    checkpoint_owner = "r3mem"  # whose shipped checkpoint the variants fall back to (and `train --method` makes)
    description = "reversible compression: recurrent KV memory, LoRA compress/expand, hierarchy (this work)"
    trainable = True
    batched_training = True  # training_losses takes [B, S] segments (trainer --micro-batch)
    hierarchy = True
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
        if not self.hierarchy:  # document pairs only; a QA share (fourth entry) stays, so the QA budget is matched
            qa_share = [float(p) for p in self.cfg["level_probs"][3:]]
            self.cfg["level_probs"] = [1.0 - sum(qa_share), 0.0, 0.0, *qa_share]
        self.M = int(self.cfg["memory_tokens"])
        for key, value in ONE_VALUE_ARCH.items():
            if self.cfg[key] != value:
                raise UserError(f"r3mem: {key}={self.cfg[key]!r} is not implemented; fix: drop the option "
                                f"(only {key}={value})")
        if self.cfg["slot_positions"] not in SLOT_POSITIONS:
            raise UserError(f"r3mem: slot_positions={self.cfg['slot_positions']!r}; fix: use slot_positions=ordered "
                            "(written slot j keyed at position 1+j) or collapsed (every written slot at 1)")
        if self.cfg["qa_reader"] not in QA_READERS:
            raise UserError(f"r3mem: qa_reader={self.cfg['qa_reader']!r}; fix: use qa_reader=reconstruct (reconstructions "
                            "in the prompt) or qa_reader=memory (the answer reads the memories' key/values)")
        if len(self.cfg["level_probs"]) not in (3, 4):
            raise UserError(f"r3mem: level_probs={self.cfg['level_probs']!r}; fix: give the shares of document, "
                            "paragraph and entity pairs, and optionally of QA pairs (3 or 4 numbers)")
        for key, choices in TRAIN_CHOICES.items():
            if self.cfg[key] not in choices:
                raise UserError(f"r3mem: {key}={self.cfg[key]!r}; fix: use one of {', '.join(choices)}")
        if not 1 <= self.M <= int(self.cfg["max_memory_tokens"]):
            raise UserError(f"r3mem: memory_tokens={self.M} but the checkpoint has {self.cfg['max_memory_tokens']} "
                            "slots; fix: use memory_tokens between 1 and that, or train with a larger max_memory_tokens")
        self._build()
        if ckpt_meta is not None:
            self.load_checkpoint(ckpt_dir)
        self._cache: dict[str, torch.Tensor] = {}
        self._in_step = False
        self.reset()

    # ---- construction --------------------------------------------------------------------------------------
    def _build(self) -> None:
        """Copy the frozen base model, add the two LoRA adapters and the slot/marker embeddings."""
        from peft import LoraConfig

        targets = self.cfg["lora_targets"]
        lora = dict(r=int(self.cfg["lora_r"]), lora_alpha=int(self.cfg["lora_alpha"]), lora_dropout=0.0,
                    target_modules=targets if targets == "all-linear" else list(targets))
        self.net = lora_copy(self.lm, adapter_name="compress", **lora)
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
        return kv_pass(self.decoder, past, embeds, start)

    def _bos_kv(self, adapter: str, batch: int) -> torch.Tensor:
        """KV of the BOS token at position 0 under ``adapter``: [L, 2, B, H, 1, D] (see ``_reused``)."""
        def run() -> torch.Tensor:
            self._use(adapter)
            ids = torch.tensor([[self.bos]], device=self.lm.device)
            return self._forward(None, self.embed(ids), 0)[1]

        return self._reused(f"bos/{adapter}", run).expand(-1, -1, batch, -1, -1, -1)

    def empty_memory(self, M: int | None = None, batch: int = 1) -> torch.Tensor:
        """The memory before any text: the slots run after BOS alone. -> [L, 2, B, H, M, D]."""
        M = M or self.M

        def run() -> torch.Tensor:
            self._use("compress")
            bos = self._bos_kv("compress", 1)
            return self._forward(bos, self.slots[:M].unsqueeze(0), 1)[1]  # slots at positions 1..M already

        return self._reused(f"empty/{M}", run).expand(-1, -1, batch, -1, -1, -1)

    def _reused(self, key: str, compute) -> torch.Tensor:
        """``compute()``'s result, kept in ``_cache`` under ``key`` where it may be reused (the BOS and empty-memory
        passes): always in evaluation; while training only within one ``training_losses`` call (the weights change
        between calls), else computed at every use."""
        if not self._caching():
            return compute()
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    def _caching(self) -> bool:
        """Whether ``_reused`` may keep results (see there)."""
        return not self.training or self._in_step

    def compress(self, tokens: torch.Tensor | None, memory: torch.Tensor, write: bool = True,
                 lengths: list[int] | None = None, embeds: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Read ``tokens`` [B, T] after ``memory`` [L,2,B,H,M,D] and (``write``) fold them into a new memory.

        Returns hidden states [B, T, d] that predict tokens[:, 0..T-1] (from the read marker and tokens[:, :-1])
        and the new memory [L, 2, B, H, M, D] (None when not writing). ``lengths`` [B]: row b's text is
        ``tokens[b, :lengths[b]]`` (right padding; its slots follow its own text, and the padding comes after every
        real token and slot of the row, so causal attention never lets it in; its hidden states are zeros).
        ``embeds`` [B, T, d] replaces the tokens' embeddings (the soft cycle compresses expected embeddings).
        """
        self._use("compress")
        text = self.embed(tokens) if embeds is None else embeds  # [B, T, d]
        B, T = text.shape[:2]
        M = memory.shape[-2]
        past = torch.cat([self._bos_kv("compress", B), memory], dim=-2)  # [L,2,B,H,1+M,D]
        read = self.embed(torch.full((B, 1), self.bos, device=text.device))  # [B, 1, d]
        if not write:
            hidden, _ = self._forward(past, torch.cat([read, text], dim=1), M + 1)
            return hidden[:, :T], None
        lengths = [T] * B if lengths is None else [int(n) for n in lengths]
        body = text.new_zeros(B, T + M, text.shape[-1])  # per row: text and slots in pass order, then padding
        slot_at = torch.empty(B, M, dtype=torch.long)  # sequence index of each row's slots
        text_at = torch.zeros(B, T, dtype=torch.long)  # index of the hidden state predicting each text token
        for n in sorted(set(lengths)):  # rows of one length share one slot order
            rows = torch.tensor([b for b, x in enumerate(lengths) if x == n])
            order, slot_index = slot_order(n, M)
            part = text[rows.to(text.device), :n]  # [b, n, d]
            # anchored: slot j also carries the embedding of the token just before it
            slots = self.slots[:M] + part[:, (slot_index - torch.arange(M) - 1).clamp(min=0).to(text.device)]
            body[rows.to(text.device), :n + M] = torch.cat([part, slots], dim=1)[:, order.to(text.device)]
            slot_at[rows] = slot_index
            text_at[rows, :n] = torch.cat([torch.zeros(1, dtype=torch.long), 1 + (order < n).nonzero()[:-1, 0]])
        hidden, kv = self._forward(past, torch.cat([read, body], dim=1), M + 1)  # body k at position M+2+k
        L, _, _, H, _, D = kv.shape  # kv [L,2,B,H,1+T+M,D]: the read marker, then the body
        where = (1 + slot_at).to(kv.device).view(1, 1, B, 1, M, 1).expand(L, 2, B, H, M, D)
        slot_kv = kv.gather(4, where)  # [L,2,B,H,M,D]: each row's slots
        target = 1 + torch.arange(M) if self.cfg["slot_positions"] == "ordered" else torch.ones(M, dtype=torch.long)
        keys = rotate_keys(slot_kv[:, 0], target - (M + 2 + slot_at), self.rotary)  # row b's slot j -> target[j]
        hidden = hidden.gather(1, text_at.to(hidden.device).unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        if min(lengths) < T:
            real = torch.arange(T).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)  # [B, T]
            hidden = hidden * real.unsqueeze(-1).to(hidden)
        return hidden, torch.stack([keys, slot_kv[:, 1]], dim=1)

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

        The ``expand`` adapter reads ``[BOS][memory][BOS][tokens]`` as it reads for reconstruction, only with the
        read marker (BOS) instead of the reconstruction marker (ICAE-style decoder); a separate ``compress`` pass
        writes.
        """
        read_marker = self.embed(torch.tensor(self.bos, device=tokens.device))  # [d]
        logits = self.expand_logits(memory, tokens, marker=read_marker)
        new = self.compress(tokens, memory, write=True)[1] if write else None
        return logits, new

    def read_cost(self, T: int, M: int, write: bool) -> int:
        """Tokens run through the model by one ``read`` of T tokens with M memory slots."""
        return (1 + T) + (1 + T + M if write else 0)

    @torch.no_grad()
    def reconstruct_ids(self, memory: torch.Tensor, max_tokens: int | list[int] | None = None) -> list[list[int]]:
        """Greedy decoding of each memory in the batch [L,2,B,H,M,D] until EOS or ``max_tokens``."""
        self._use("expand")
        B, M = memory.shape[2], memory.shape[-2]
        caps = max_tokens if isinstance(max_tokens, list) else [int(max_tokens or self.cfg["recon_max_tokens"])] * B
        past = torch.cat([self._bos_kv("expand", B), memory.float()], dim=-2)
        cache = kv_cache(past)
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
        problem = arch_problem(meta.get("config") or {})
        if problem:
            raise UserError(f"{path}: {problem}")
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
