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


ADAPTER_DIR = "adapter"  # the peft LoRA adapter inside a checkpoint directory (RMT, ICAE; Beacon has none)


def read_checkpoint_config(path: Path, config_file: str, method: str) -> dict:
    """The settings JSON ``config_file`` of a checkpoint directory; unreadable or not an object is a ``UserError``."""
    import json

    try:
        cfg = json.loads((Path(path) / config_file).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"--checkpoint {path}: {config_file} is unreadable ({type(exc).__name__}); fix: give a "
                        f"directory written by `r3mem-bench train --method {method}`") from None
    if not isinstance(cfg, dict):
        raise UserError(f"--checkpoint {path}: {config_file} is not a JSON object; fix: retrain")
    return cfg


def save_checkpoint_files(path, peft, tensors: dict, tensor_file: str, config: dict, config_file: str) -> None:
    """Write a LoRA adapter (``peft.save_pretrained``; None: the method has none), the method's own tensors
    (safetensors, in their dtype) and its settings JSON."""
    import json

    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if peft is not None:
        peft.save_pretrained(str(path / ADAPTER_DIR))
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path / tensor_file))
    (path / config_file).write_text(json.dumps(config, indent=2) + "\n")


def load_checkpoint_files(path, peft, tensors: dict, tensor_file: str, config_file: str, method: str,
                          model: str, shipped_root: Path = SHIPPED) -> str:
    """Load what ``save_checkpoint_files`` wrote into ``peft`` (None: no adapter) and the parameters ``tensors``
    (name -> tensor of the expected shape, filled in place, cast to its dtype); returns the checkpoint id
    ``<name>@<sha256 of the weight files>``, the name as ``checkpoint_name(path, shipped_root)`` gives it.

    A checkpoint for another base model, with other shapes or with unreadable files is a one-line ``UserError``."""
    import hashlib

    import torch
    from peft import set_peft_model_state_dict
    from safetensors import SafetensorError
    from safetensors.torch import load as load_safetensors

    path = Path(path)
    cfg = read_checkpoint_config(path, config_file, method)
    if cfg.get("base_model") and cfg["base_model"] != model:
        raise UserError(f"--checkpoint {path}: trained on '{cfg['base_model']}', not '{model}'; "
                        f"fix: run with --model {cfg['base_model']} or train a checkpoint for this model")
    try:
        blob = (path / tensor_file).read_bytes()
        saved = load_safetensors(blob)
        missing = [k for k in tensors if k not in saved]
        if missing:
            raise KeyError(missing[0])
    except (OSError, KeyError, SafetensorError) as exc:
        raise UserError(f"--checkpoint {path}: cannot read {tensor_file} ({type(exc).__name__}: {exc}); "
                        f"fix: give a directory written by `r3mem-bench train --method {method}`") from None
    for key, target in tensors.items():
        if tuple(saved[key].shape) != tuple(target.shape):
            raise UserError(f"--checkpoint {path}: {key} shape {tuple(saved[key].shape)} does not fit "
                            f"{tuple(target.shape)}; fix: use the checkpoint's memory size and base model")
    adapter_blob = b""
    try:
        if peft is not None:
            adapter_blob = (path / ADAPTER_DIR / "adapter_model.safetensors").read_bytes()
            set_peft_model_state_dict(peft, load_safetensors(adapter_blob))
    except (OSError, RuntimeError, SafetensorError) as exc:
        first = str(exc).strip().splitlines()
        raise UserError(f"--checkpoint {path}: its LoRA adapter does not fit this model or is unreadable "
                        f"({first[-1].strip()[:160] if first else type(exc).__name__}); fix: use the checkpoint's "
                        "base model and lora settings, or retrain") from None
    with torch.no_grad():
        for key, target in tensors.items():
            target.copy_(saved[key].to(target.device, target.dtype))
    digest = hashlib.sha256(adapter_blob + blob).hexdigest()[:16]
    return f"{checkpoint_name(path, shipped_root)}@{digest}"  # the same in every checkout
