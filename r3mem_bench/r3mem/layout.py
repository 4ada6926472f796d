"""R3Mem's options and the geometry of its memory: which options a checkpoint fixes, where the slots sit among
the text (``slot_order``), how a key moves to another position (``rotate_keys``) and a decoder pass after a given
key/value memory (``kv_pass``, also Activation Beacon's) and answering after one (``greedy_after``,
``continuation_nll_after``)."""

from __future__ import annotations

import torch

from r3mem_bench.generation import batched_nll, in_place, padded_continuations

CHECKPOINT_FORMAT = "r3mem-checkpoint/1"
WEIGHTS, META = "r3mem.safetensors", "r3mem.json"

# Options: architecture (fixed by a checkpoint) and behaviour (free at run time).
ARCH_DEFAULTS = {"max_memory_tokens": 64, "lora_r": 8, "lora_alpha": 16, "lora_targets": "all-linear",
                 "reader": "expand", "slot_layout": "anchored", "slot_positions": "ordered"}
SLOT_POSITIONS = ("ordered", "collapsed")
ONE_VALUE_ARCH = {"reader": "expand", "slot_layout": "anchored"}  # options kept in configs; one value implemented


def trained_arch(config: dict, key: str):
    """The value of architecture option ``key`` a checkpoint was trained with (its JSON ``config``).

    A checkpoint written before ``slot_positions`` existed keyed every written slot at position 1 (``collapsed``).
    ``reader`` and ``slot_layout`` have one implemented value each; a checkpoint without them predates both (a
    one-pass reader with slots after the text) and is refused when loaded (``arch_problem``).
    """
    if key in config:
        return config[key]
    return "collapsed" if key == "slot_positions" else None


def arch_problem(config: dict) -> str | None:
    """Why a checkpoint's architecture cannot be run by this code (None when it can)."""
    for key, value in ONE_VALUE_ARCH.items():
        trained = trained_arch(config, key)
        if trained != value:
            return (f"trained with {key}={trained or 'unset'}, which this version does not implement "
                    f"(only {key}={value}); "
                    "fix: retrain with `r3mem-bench train --method r3mem`")
    return None


RUN_DEFAULTS = {
    "memory_tokens": 16, "segment_len": 128, "train_segments": 3, "train_memory_sizes": [8, 16, 32, 64],
    "train_memory_probs": [0.2, 0.5, 0.2, 0.1], "level_probs": [0.6, 0.2, 0.2], "w_lm": 1.0, "w_kl": 1.0,
    "w_recon": 1.0, "w_cycle": 0.2, "lr_compress_scale": 0.3, "top_k": 3, "max_entities": 32,
    "entity_extractor": "capitalised", "max_item_tokens": 512, "recon_max_tokens": 160, "save_dtype": "float16",
    "recon_warmup_steps": 0, "recon_no_repeat_ngram": 0, "qa_reader": "reconstruct",
    "train_cycle": "argmax", "train_recon_segments": "last", "w_qa": 1.0,
}
TRAIN_CHOICES = {"train_cycle": ("argmax", "soft"), "train_recon_segments": ("last", "all")}
QA_READERS = ("reconstruct", "memory")
LEVELS = ("document", "paragraph", "entity", "qa")  # "qa" only with a fourth level_probs entry


def rotate_keys(keys: torch.Tensor, shift: int | torch.Tensor, rotary) -> torch.Tensor:
    """Move RoPE keys by ``shift`` positions, exactly: keys [..., T, D] by an int or one shift per key
    (LongTensor [T]); or keys [L, B, H, T, D] by one shift per row and key (LongTensor [B, T])."""
    shift = torch.as_tensor(shift, dtype=torch.long, device=keys.device)
    per_row = shift.dim() == 2
    cos, sin = rotary(keys, shift if per_row else shift.reshape(1, -1))  # [B or 1, T or 1, D]
    cos, sin = (cos.unsqueeze(1), sin.unsqueeze(1)) if per_row else (cos[0], sin[0])  # [B, 1, T, D] or [T, D]
    half = keys.shape[-1] // 2
    rotated = torch.cat((-keys[..., half:], keys[..., :half]), dim=-1)
    return keys * cos + rotated * sin


def kv_cache(past: torch.Tensor):
    """A transformers ``DynamicCache`` holding ``past`` KV [L, 2, B, H, P, D] (unbound, not indexed: the backward of
    unbind stacks the layers' gradients once instead of writing each into zeros of the whole tensor)."""
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=[kv.unbind(0) for kv in past.unbind(0)])


def kv_pass(decoder, past: torch.Tensor | None, embeds: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``decoder`` (a transformers decoder stack) over ``embeds`` [B, T, d] at positions start.. after ``past`` KV
    [L, 2, B, H, P, D] (RoPE'd keys). Returns the last hidden states [B, T, d] and the new keys/values
    [L, 2, B, H, T, D]."""
    from transformers import DynamicCache

    T = embeds.shape[1]
    cache = kv_cache(past) if past is not None else DynamicCache()
    positions = torch.arange(start, start + T, device=embeds.device).unsqueeze(0).expand(embeds.shape[0], -1)
    out = decoder(inputs_embeds=embeds, cache=cache, position_ids=positions, use_cache=True)
    new_kv = torch.stack([torch.stack([layer.keys[:, :, -T:], layer.values[:, :, -T:]]) for layer in cache.layers])
    return out.last_hidden_state, new_kv


def greedy_after(step, embed, head, past: torch.Tensor, logits: torch.Tensor, pos: int, max_new: int,
                 eos: int | None) -> list[int]:
    """Greedy tokens after a prompt whose KV is ``past`` [L, 2, 1, H, P, D] and whose last position gave ``logits``
    [1, V]; the next token sits at position ``pos``. ``step(past, embeds, start)`` is a ``kv_pass``-like decoder
    pass, ``embed`` maps ids [1, T] to embeddings, ``head`` hidden states to logits. Stops at ``eos``."""
    out: list[int] = []
    for _ in range(max_new):
        nxt = int(logits.argmax(-1))
        if nxt == eos:
            break
        out.append(nxt)
        hidden, kv = step(past, embed(torch.tensor([[nxt]], device=past.device)), pos)
        past, pos, logits = torch.cat([past, kv], dim=-2), pos + 1, head(hidden[:, -1])
    return out


def continuation_nll_after(step, embed, head, past: torch.Tensor, last: torch.Tensor, pos: int,
                           continuations: list[list[int]]) -> list[tuple[float, int]]:
    """(mean per-token NLL, token count) of each continuation (token ids) after the prompt of ``greedy_after``
    (its KV ``past`` [L, 2, 1, H, P, D], the logits ``last`` [1, V] of its last position, the next position
    ``pos``), all continuations in one right-padded pass; an empty continuation gives ``(nan, 0)``."""

    def batch(filled: list[list[int]]) -> list[float]:
        inputs, targets = padded_continuations(filled, pad=0)  # [N, C-1], [N, C]
        step_logits = None
        if inputs.shape[1]:
            rows = past.expand(-1, -1, len(filled), -1, -1, -1)  # [L, 2, N, H, P, D] (a view)
            hidden, _ = step(rows, embed(inputs.to(past.device)), pos)
            step_logits = head(hidden)  # [N, C-1, V]
        return batched_nll(last, step_logits, targets)

    return in_place(continuations, batch)


def repeated_ngram_ends(seq: list[int], n: int) -> list[int]:
    """Tokens that would repeat an n-gram already in ``seq`` if appended (n <= 0: none); greedy decoding's
    no-repeat-n-gram rule, as ``no_repeat_ngram_size`` in transformers' ``generate``."""
    if n <= 0 or len(seq) < n - 1:
        return []
    prefix = seq[len(seq) - n + 1:] if n > 1 else []
    return sorted({seq[i + n - 1] for i in range(len(seq) - n + 1) if seq[i:i + n - 1] == prefix})


def slot_order(T: int, M: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the M slots go among T text tokens: (permutation of ``[text, slots]`` into pass order [T+M],
    sequence index of each slot [M]). Slot j sits right after text token ceil((j+1)*T/M)-1, so each slot follows
    the span it summarises (Activation Beacon's layout)."""
    after = torch.tensor([-(-(j + 1) * T // M) for j in range(M)], dtype=torch.long)  # text tokens before slot j
    slot_index = after + torch.arange(M)  # [M]
    is_slot = torch.zeros(T + M, dtype=torch.bool)
    is_slot[slot_index] = True
    order = torch.empty(T + M, dtype=torch.long)
    order[~is_slot] = torch.arange(T)
    order[is_slot] = T + torch.arange(M)
    return order, slot_index
