"""What the trained baselines (RMT, ICAE, Activation Beacon) share: switching their private network and trainable
tensors between training and evaluation, token embeddings, the attention-sink token, a QA history cut into
segments, and which checkpoint a run loads."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F

from r3mem_bench.method import MemoryMethod
from r3mem_bench.methods.checkpoints import SHIPPED, lora_copy, resolve_checkpoint
from r3mem_bench.methods.reference import _item_line


class TrainedBaseline(MemoryMethod):
    """A memory method with a private copy of the causal LM in ``self.net`` (set by its ``_build``)."""

    net: torch.nn.Module
    config_file: ClassVar[str] = ""  # the settings JSON that marks one of its checkpoint directories

    def trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        raise NotImplementedError

    def _lora_settings(self, saved: dict, r: int, alpha: int) -> dict:
        """LoRA rank, alpha, dropout and target modules: a checkpoint's recorded ``saved`` settings win over the
        options (``lora_r`` ...), which win over the method's defaults (``r``, ``alpha``, no dropout, every
        linear layer)."""
        o = self.options
        return {"r": int(saved.get("lora_r", o.get("lora_r", r))),
                "alpha": int(saved.get("lora_alpha", o.get("lora_alpha", alpha))),
                "dropout": float(saved.get("lora_dropout", o.get("lora_dropout", 0.0))),
                "targets": saved.get("lora_targets", o.get("lora_targets", "all-linear"))}

    def _adapt(self, lora: dict) -> torch.Tensor:
        """A private LoRA copy of the base model (``self.peft``, ``self.net``; ``self.body``: the causal LM inside
        it; ``self.head``; ``self.emb_norm``: the mean norm of the token-embedding rows); returns the (detached)
        token-embedding matrix [V, H], whose scale the method's learned vectors start at."""
        self.peft = lora_copy(self.lm, r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                              target_modules=lora["targets"], bias="none", task_type="CAUSAL_LM")
        self.body = self.peft.get_base_model()  # the causal LM with LoRA layers injected
        self.net = self.peft
        self.head = self.body.get_output_embeddings()
        emb = self.body.get_input_embeddings().weight.detach()
        self.emb_norm = float(emb.float().norm(dim=-1).mean())
        return emb

    def _at_embedding_scale(self, states: torch.Tensor) -> torch.Tensor:
        """``states`` [..., H] with their direction kept and their norm set to the embedding rows' mean norm (last
        hidden states fed back as input embeddings)."""
        return F.normalize(states.float(), dim=-1).to(states.dtype) * self.emb_norm

    def train(self, mode: bool = True) -> TrainedBaseline:
        """Switch dropout on (training) or off (evaluation) and enable gradients on the trainable weights."""
        self.net.train(mode)
        for p in self.trainable_parameters().values():
            p.requires_grad_(mode)
        return self

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings [..., H] of ``ids``."""
        return self.net.get_input_embeddings()(ids.to(self.lm.device))

    def _sink(self, batch: int) -> torch.Tensor:
        """The model's document prefix token, kept at position 0 as an attention sink: [B, 1, H]."""
        return self._embed(torch.full((batch, 1), self.lm.prefix_token_id, dtype=torch.long))

    def _history_segments(self, items) -> tuple[torch.Tensor, ...]:
        """The QA corpus or dialogue history (items in order, each line with its date when it has one) as token ids
        cut into ``self.segment_len``-token segments (the last may be shorter)."""
        text = "\n".join(_item_line(item) for item in items)
        ids = torch.tensor(self.lm.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
        return ids.split(self.segment_len)

    def _checkpoint_dir(self, given) -> Path | None:
        """The checkpoint to load: ``--checkpoint`` or the shipped one for this base model; None for fresh weights
        (training, or ``untrained`` asked for); without either a one-line error naming the training command."""
        if not given and (self.options.get("untrained") or self.for_training):
            return None  # untrained on request, and training starts from scratch (warm-start: checkpoint=DIR)
        shipped = None if given else self._shipped_for_run()
        return resolve_checkpoint(self.checkpoint_owner, given, self.config_file, shipped, self.lm.name,
                                  f"{self._training_hint()} (or --method-arg untrained=true for the untrained control)")

    def _shipped_for_run(self) -> Path | None:
        """The shipped checkpoint this run loads when none is given."""
        return type(self).shipped_checkpoint(self.lm.name)

    def _training_hint(self) -> str:
        """Options the missing-checkpoint error adds to its training command (none by default)."""
        return ""

    @classmethod
    def shipped_checkpoint(cls, model: str) -> Path | None:
        """``results/checkpoints/<owner>-<model>`` when it holds the method's settings file (shared by the method
        and its reset control), else None."""
        shipped = SHIPPED / f"{cls.checkpoint_owner}-{model}"
        return shipped if (shipped / cls.config_file).is_file() else None
