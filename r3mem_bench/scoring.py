"""Shared tensor helpers: per-token NLL from a causal LM, and the byte size of a KV cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from r3mem_bench.models import LoadedModel


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """NLL (nats) of ``targets`` [B, T] under ``logits`` [B, T, V] (logits already aligned to targets)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                           reduction="none").view(targets.shape)


@torch.no_grad()
def score_continuation(lm: LoadedModel, context: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """NLL [T] of ``target`` [T] after ``context`` [C] (C >= 1) in one forward pass."""
    ids = torch.cat([context, target]).unsqueeze(0).to(lm.device)  # [1, C+T]
    logits = lm.model(input_ids=ids).logits[0, context.numel() - 1: -1]  # [T, V]
    return token_nll(logits.unsqueeze(0), target.to(lm.device).unsqueeze(0))[0].cpu()


def kv_bytes(lm: LoadedModel, n_tokens: int) -> int:
    """Bytes of the keys and values a model caches for ``n_tokens`` tokens."""
    cfg = lm.model.config
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    elem = next(lm.model.parameters()).element_size()
    return int(2 * cfg.num_hidden_layers * heads * head_dim * n_tokens * elem)
