"""R3Mem's options and the geometry of its memory: which options a checkpoint fixes, where the slots sit among
the text (``slot_order``) and how a key moves to another position (``rotate_keys``)."""

from __future__ import annotations

import torch

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
