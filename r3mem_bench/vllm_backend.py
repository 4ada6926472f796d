"""vLLM generation backend (extra ``gpu``): the ``Generator`` interface of ``r3mem_bench.generation`` on vLLM.

Same prompts as the HF backend: the user message goes through the tokenizer's chat template (``HFGenerator.encode``,
left-truncated to ``max_prompt_tokens``) and vLLM receives the token ids (``{"prompt_token_ids": ids}``, vLLM's
``TokensPrompt``), so both backends see identical inputs. Decoding is greedy: ``SamplingParams(temperature=0,
max_tokens=max_new_tokens)``, stopping at the tokenizer's EOS. vLLM loads its own copy of the weights from the
model's directory (``r3mem_bench.models.resolve_model_path``); models without one (``tiny-random``) cannot use it.
The engine is created on the first generation and shared by every generator of the process (``engine``): cells,
tasks and methods that never generate start none, and no second engine competes for GPU memory. The HF copy of
the model (for scoring and memory methods) is bf16 or fp16 on CUDA (``models.load_model``); vLLM gets that dtype.

API used (vLLM docs, ``vllm.entrypoints.llm.LLM``): ``LLM(model=..., tokenizer=..., dtype=..., seed=...,
gpu_memory_utilization=..., max_model_len=...)``, ``LLM.generate(prompts, sampling_params, use_tqdm=False)`` ->
``RequestOutput`` with ``.prompt_token_ids`` and ``.outputs[0].text`` / ``.token_ids``. Not exercised on a GPU in
this repository's CI (tests skip without CUDA and vllm).
"""

from __future__ import annotations

import importlib.util

from r3mem_bench.errors import UserError
from r3mem_bench.generation import DEFAULT_SYSTEM, Generation, HFGenerator
from r3mem_bench.models import LoadedModel, resolve_model_path


def vllm_unavailable_reason() -> str | None:
    """Why vLLM cannot run here (``None`` when it can): the package or CUDA is missing."""
    if importlib.util.find_spec("vllm") is None:
        return "vllm is not installed (pip install 'r3mem-bench[gpu]')"
    import torch

    if not torch.cuda.is_available():
        return "vLLM needs a CUDA GPU and none is available"
    return None


def serve_reason(model: str) -> str | None:
    """Why vLLM cannot serve ``model`` here (``None`` when it can): ``vllm_unavailable_reason``, or a model
    without weights on disk or on the hub (``tiny-random``)."""
    reason = vllm_unavailable_reason()
    if reason is None and model == "tiny-random":
        reason = "model 'tiny-random' exists only in memory (vLLM loads weights from a directory or hub id)"
    return reason


_ENGINES: dict[tuple, object] = {}  # one vllm.LLM per (model path, dtype, max_model_len) in this process


def engine(path: str, dtype: str, max_model_len: int, gpu_memory_utilization: float = 0.5, seed: int = 0):
    """This process's vLLM engine for a model, created on first use and shared by every generator after it.

    One engine per process: a second ``vllm.LLM`` would ask for its own share of GPU memory beside the first and
    fail to start."""
    key = (path, dtype, max_model_len)
    if key not in _ENGINES:
        from vllm import LLM

        _ENGINES[key] = LLM(model=path, tokenizer=path, dtype=dtype, seed=seed, max_model_len=max_model_len,
                            gpu_memory_utilization=gpu_memory_utilization)
    return _ENGINES[key]


class VLLMGenerator(HFGenerator):
    """Greedy generation with vLLM; prompts encoded exactly as ``HFGenerator`` encodes them."""

    name = "vllm"

    def __init__(self, lm: LoadedModel, max_new_tokens: int = 32, system: str = DEFAULT_SYSTEM,
                 max_prompt_tokens: int | None = None, batch_size: int = 256, gpu_memory_utilization: float = 0.5,
                 seed: int = 0):
        super().__init__(lm, max_new_tokens=max_new_tokens, system=system, max_prompt_tokens=max_prompt_tokens,
                         batch_size=batch_size)
        reason = serve_reason(lm.name)
        if reason:
            raise UserError(f"--backend vllm: {reason}; fix: use --backend hf, or a CUDA machine with vllm and a "
                            "model with a directory or hub id")
        self.path = resolve_model_path(lm.name)
        self.dtype = str(lm.info.get("dtype", "float32")).replace("torch.", "")
        self.gpu_memory_utilization, self.seed = gpu_memory_utilization, seed

    @property
    def llm(self):
        """The shared engine (created on the first generation, not when a method is built)."""
        return engine(self.path, self.dtype, self.lm.max_length, self.gpu_memory_utilization, self.seed)

    def sampling_params(self):
        """Greedy decoding: temperature 0, at most ``max_new_tokens`` new tokens."""
        from vllm import SamplingParams

        return SamplingParams(temperature=0.0, max_tokens=self.max_new_tokens)

    def generate(self, prompts: list[str]) -> list[Generation]:
        """Greedy answers for user messages ``prompts``, submitted to vLLM together (it schedules the batch)."""
        if not prompts:
            return []
        encoded = [self.encode(p) for p in prompts]
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in encoded], self.sampling_params(),
                                    use_tqdm=False)
        eos = self.lm.tokenizer.eos_token_id
        out = []
        for ids, res in zip(encoded, outputs):
            new = list(res.outputs[0].token_ids)
            if eos in new:
                new = new[: new.index(eos)]
            out.append(Generation(self.lm.tokenizer.decode(new, skip_special_tokens=True).strip(), len(ids), len(new)))
        return out
