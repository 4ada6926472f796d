"""What the trainable memory methods (R3Mem, RMT) share: LoRA adapters on a private copy of the base model, where
the shipped checkpoints live, which one a run loads, and a name for it that does not depend on where the
repository is checked out."""

from __future__ import annotations

from pathlib import Path

from r3mem_bench.errors import UserError

SHIPPED = Path(__file__).resolve().parents[2] / "results" / "checkpoints"  # one directory per shipped checkpoint


def lora_copy(lm, adapter_name: str = "default", **lora):
    """A private deep copy of ``lm.model`` (the shared model stays untouched for the run's other methods) with one
    LoRA adapter (``peft.LoraConfig(**lora)``) named ``adapter_name``; more adapters via ``add_adapter``."""
    import copy

    from peft import LoraConfig, get_peft_model

    return get_peft_model(copy.deepcopy(lm.model), LoraConfig(**lora), adapter_name=adapter_name)


def resolve_checkpoint(method: str, given, marker: str, shipped: Path | None, model: str, untrained_hint: str = "") -> Path:
    """The checkpoint directory a run loads: ``given`` (``--checkpoint``; it must hold ``marker``), else ``shipped``.

    Without either, a one-line error naming the training command for ``method`` on ``model``."""
    if given:
        path = Path(given)
        if not (path / marker).is_file():
            raise UserError(f"--checkpoint {path}: no {marker} there, so it is not a {method} checkpoint; fix: give a "
                            f"directory written by `r3mem-bench train --method {method}`")
        return path
    if shipped is None:
        raise UserError(f"{method}: no trained checkpoint for model '{model}'; fix: train one with `r3mem-bench train "
                        f"--method {method} --model {model} --output DIR` and pass --checkpoint DIR{untrained_hint}")
    return shipped


def checkpoint_name(path: Path, shipped_root: Path = SHIPPED) -> str:
    """``shipped/<dir>`` for a checkpoint under ``shipped_root``, else the path as given."""
    path = Path(path)
    return f"shipped/{path.name}" if path.resolve().parent == Path(shipped_root).resolve() else str(path)
