"""Shared tensor helpers: per-token NLL from a causal LM, and the byte size of a KV cache.

Inside ``recording_greedy()`` the NLL helpers also record, for every token they score, whether it was the
model's argmax there (lm-eval's ``is_greedy``), flattened in the order scored.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from r3mem_bench.models import LoadedModel


_GREEDY: list[torch.Tensor] | None = None  # set by recording_greedy


@contextlib.contextmanager
def recording_greedy():
    """Record whether each token scored inside the block was the argmax; yields the list of flag tensors."""
    global _GREEDY
    saved, _GREEDY = _GREEDY, []
    try:
        yield _GREEDY
    finally:
        _GREEDY = saved


def _record_greedy(logits: torch.Tensor, targets: torch.Tensor) -> None:
    if _GREEDY is not None:
        _GREEDY.append((logits.detach().argmax(-1) == targets).reshape(-1).cpu())


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """NLL (nats) of ``targets`` [B, T] under ``logits`` [B, T, V] (logits already aligned to targets)."""
    _record_greedy(logits, targets)
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                           reduction="none").view(targets.shape)


@torch.no_grad()
def score_continuation(lm: LoadedModel, context: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """NLL [T] of ``target`` [T] after ``context`` [C] (C >= 1) in one forward pass."""
    ids = torch.cat([context, target]).unsqueeze(0).to(lm.device)  # [1, C+T]
    logits = lm.model(input_ids=ids).logits[0, context.numel() - 1: -1]  # [T, V]
    return token_nll(logits.unsqueeze(0), target.to(lm.device).unsqueeze(0))[0].cpu()


HEAD_ONLY_ARCHS = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")  # logits = lm_head(last hidden)
HEAD_CHUNK = 1024  # scored rows whose logits exist at once


def scored_nll(lm: LoadedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               spans: list[tuple[int, int]], chunk: int = HEAD_CHUNK) -> list[torch.Tensor]:
    """NLL of the tokens ``input_ids[i, a+1 : b+1]`` for each span ``(a, b)`` of row i, in one forward pass.

    The output projection and the log-softmax run only on the scored positions, ``chunk`` rows at a time, so a
    batch never materialises [B, L, V] logits (for architectures whose logits are ``lm_head(last hidden
    state)``; others take the full-logits path). Returns one CPU tensor [b - a] per row.
    """
    model = lm.model
    ids, mask = input_ids.to(lm.device), attention_mask.to(lm.device)
    if type(model).__name__ not in HEAD_ONLY_ARCHS:
        logits = model(input_ids=ids, attention_mask=mask).logits
        return [token_nll(logits[i: i + 1, a:b], ids[i: i + 1, a + 1: b + 1])[0].cpu()
                for i, (a, b) in enumerate(spans)]
    hidden = model.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state  # [B, L, H]
    rows = torch.cat([hidden[i, a:b] for i, (a, b) in enumerate(spans)])  # [N, H]
    targets = torch.cat([ids[i, a + 1: b + 1] for i, (a, b) in enumerate(spans)])  # [N]
    head = model.get_output_embeddings()
    pieces = []
    for k in range(0, rows.shape[0], chunk):
        logits = head(rows[k: k + chunk]).float()  # [<=chunk, V]
        _record_greedy(logits, targets[k: k + chunk])
        pieces.append(F.cross_entropy(logits, targets[k: k + chunk], reduction="none"))
    nll = torch.cat(pieces) if pieces else torch.empty(0)
    return list(nll.cpu().split([b - a for a, b in spans]))


def kv_bytes(lm: LoadedModel, n_tokens: int) -> int:
    """Bytes of the keys and values a model caches for ``n_tokens`` tokens."""
    cfg = lm.model.config
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    elem = next(lm.model.parameters()).element_size()
    return int(2 * cfg.num_hidden_layers * heads * head_dim * n_tokens * elem)
