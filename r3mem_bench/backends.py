"""Choosing a generation backend for a QA task: ``hf`` (:class:`r3mem_bench.generation.HFGenerator`), ``vllm``
(:mod:`r3mem_bench.vllm_backend`) or ``auto``."""

from __future__ import annotations

import torch

from r3mem_bench.generation import DEFAULT_SYSTEM, Generator, HFGenerator
from r3mem_bench.models import LoadedModel


def make_generator(lm: LoadedModel, params: dict, backend: str = "hf") -> Generator:
    """The generation backend for a QA task: ``hf``, ``vllm`` or ``auto`` (vLLM when CUDA and vllm exist)."""
    from r3mem_bench.errors import UserError

    system = params.get("system_prompt") or DEFAULT_SYSTEM
    max_new = int(params.get("max_new_tokens") or 32)
    if backend == "auto":
        import importlib.util

        backend = "vllm" if torch.cuda.is_available() and importlib.util.find_spec("vllm") else "hf"
    if backend == "hf":
        return HFGenerator(lm, max_new_tokens=max_new, system=system)
    if backend == "vllm":
        try:
            from r3mem_bench.vllm_backend import VLLMGenerator
        except ImportError as exc:
            raise UserError(f"--backend vllm: not available ({exc}); fix: pip install 'r3mem-bench[gpu]' on a CUDA machine") from None
        return VLLMGenerator(lm, max_new_tokens=max_new, system=system)
    raise UserError(f"--backend {backend}: unknown; fix: use auto, hf or vllm")
