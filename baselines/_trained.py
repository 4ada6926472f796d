"""What the trained baselines (RMT, ICAE, Activation Beacon) share: switching their private network and trainable
tensors between training and evaluation, token embeddings, and the attention-sink token."""

from __future__ import annotations

import torch

from r3mem_bench.method import MemoryMethod


class TrainedBaseline(MemoryMethod):
    """A memory method with a private copy of the causal LM in ``self.net`` (set by its ``_build``)."""

    net: torch.nn.Module

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
