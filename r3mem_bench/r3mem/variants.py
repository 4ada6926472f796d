"""R3Mem's registered variants: the QA reader that reads memories directly, the ablations and the reset control."""

from __future__ import annotations

from r3mem_bench.methods.registry import register_method
from r3mem_bench.r3mem.model import R3Mem


@register_method
class R3MemNoHier(R3Mem):
    """Ablation: no hierarchy. Trained on document-level pairs only (a recipe's QA share is kept: the paragraph and
    entity shares go to the document level); QA keeps only the recurrent document memory."""

    name = "r3mem_no_hier"
    description = "R3Mem without hierarchy (document-level memory only; train it separately for training effects)"
    hierarchy = False
    own_weights = True


@register_method
class R3MemNoRecon(R3Mem):
    """Ablation: no backward path in training (w_recon = w_cycle = 0); meaningful only with its own training run."""

    name = "r3mem_no_recon"
    description = "R3Mem trained without the reconstruction and cycle losses (needs its own `train --method r3mem_no_recon`)"
    loss_overrides = {"w_recon": 0.0, "w_cycle": 0.0}
    own_weights = True


@register_method
class R3MemNoCycle(R3Mem):
    """Ablation: reconstruction kept, cycle loss off (w_cycle = 0); meaningful only with its own training run."""

    name = "r3mem_no_cycle"
    description = "R3Mem trained without the cycle loss (needs its own `train --method r3mem_no_cycle`)"
    loss_overrides = {"w_cycle": 0.0}
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
