"""What the trained baselines (RMT, ICAE, Activation Beacon) share: switching their private network and trainable
tensors between training and evaluation, token embeddings, the attention-sink token, and which checkpoint a run
loads."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch

from r3mem_bench.method import MemoryMethod
from r3mem_bench.methods.checkpoints import SHIPPED, resolve_checkpoint


class TrainedBaseline(MemoryMethod):
    """A memory method with a private copy of the causal LM in ``self.net`` (set by its ``_build``)."""

    net: torch.nn.Module
    config_file: ClassVar[str] = ""  # the settings JSON that marks one of its checkpoint directories

    def trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        raise NotImplementedError

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

    def _checkpoint_dir(self, given) -> Path | None:
        """The checkpoint to load: ``--checkpoint`` or the shipped one for this base model; None for fresh weights
        (training, or ``untrained`` asked for); without either a one-line error naming the training command."""
        if not given and (self.options.get("untrained") or self.for_training):
            return None
        shipped = None if given else type(self).shipped_checkpoint(self.lm.name)
        return resolve_checkpoint(self.checkpoint_owner, given, self.config_file, shipped, self.lm.name,
                                  " (or --method-arg untrained=true for the untrained control)")

    @classmethod
    def shipped_checkpoint(cls, model: str) -> Path | None:
        """``results/checkpoints/<owner>-<model>`` when it holds the method's settings file (shared by the method
        and its reset control), else None."""
        shipped = SHIPPED / f"{cls.checkpoint_owner}-{model}"
        return shipped if (shipped / cls.config_file).is_file() else None
