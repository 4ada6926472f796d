"""Choosing a generation backend for a QA task: ``hf`` (:class:`r3mem_bench.generation.HFGenerator`), ``vllm``
(:mod:`r3mem_bench.vllm_backend`) or ``auto`` (the default: vLLM where it can serve the model, else HF).

Generators are cheap views (system prompt, answer length) over one engine per process: the HF model loaded by
:func:`r3mem_bench.models.load_model`, or one vLLM engine per model created on the first generation
(``vllm_backend.engine``), whichever cells and methods ask for it."""

from __future__ import annotations

import importlib.util
import sys

import torch

from r3mem_bench.generation import DEFAULT_SYSTEM, Generator, HFGenerator
from r3mem_bench.models import LoadedModel

BACKENDS = ("auto", "hf", "vllm")
_SAID: set[str] = set()  # fallback reasons already printed in this process


def resolve_backend(backend: str, model: str) -> str:
    """The backend that will generate: ``hf`` or ``vllm`` (``auto`` resolved; unknown names refused)."""
    from r3mem_bench.errors import UserError

    if backend not in BACKENDS:
        raise UserError(f"--backend {backend}: unknown; fix: use auto, hf or vllm")
    if backend != "auto":
        return backend
    from r3mem_bench.vllm_backend import serve_reason

    reason = serve_reason(model)
    if reason is None:
        return "vllm"
    # on a machine where vLLM could be expected (CUDA or vllm present), say once why HF generates instead
    if (torch.cuda.is_available() or importlib.util.find_spec("vllm")) and reason not in _SAID:
        _SAID.add(reason)
        print(f"note: --backend auto generates with hf: {reason}", file=sys.stderr)
    return "hf"


def make_generator(lm: LoadedModel, params: dict, backend: str = "auto") -> Generator:
    """The generation backend for a QA task: ``hf``, ``vllm`` or ``auto``."""
    from r3mem_bench.errors import UserError

    system = params.get("system_prompt") or DEFAULT_SYSTEM
    max_new = int(params.get("max_new_tokens") or 32)
    backend = resolve_backend(backend, lm.name)
    if backend == "hf":
        return HFGenerator(lm, max_new_tokens=max_new, system=system)
    try:
        from r3mem_bench.vllm_backend import VLLMGenerator
    except ImportError as exc:
        raise UserError(f"--backend vllm: not available ({exc}); fix: pip install 'r3mem-bench[gpu]' on a CUDA machine") from None
    return VLLMGenerator(lm, max_new_tokens=max_new, system=system)
