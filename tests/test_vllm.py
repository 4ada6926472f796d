"""vLLM backend: same interface and prompts as the HF backend. GPU-only parts skip with the reason on CPU."""

from __future__ import annotations

import pytest

from r3mem_bench.errors import UserError
from r3mem_bench.backends import make_generator
from r3mem_bench.vllm_backend import VLLMGenerator, vllm_unavailable_reason

REASON = vllm_unavailable_reason()


def test_backend_vllm_without_gpu_is_a_user_error(tiny_lm):
    if REASON is None:
        pytest.skip("vLLM and CUDA are available here: the CPU error path does not apply")
    with pytest.raises(UserError, match="--backend vllm"):
        make_generator(tiny_lm, {}, "vllm")


def test_backend_auto_falls_back_to_hf_without_vllm(tiny_lm):
    if REASON is None:
        pytest.skip("vLLM and CUDA are available here: auto picks vLLM")
    assert make_generator(tiny_lm, {}, "auto").name == "hf"


@pytest.mark.skipif(REASON is not None, reason=f"vLLM backend needs GPU + vllm: {REASON}")
def test_vllm_matches_hf_greedy_answers():
    """Greedy vLLM and HF answers agree on SmolLM2 with the chat template (same prompt token ids)."""
    from r3mem_bench.generation import HFGenerator
    from r3mem_bench.models import load_model

    lm = load_model("smollm2-135m")
    prompts = ["Question: What is the capital of France?\nAnswer:", "Question: 2 + 2 = ?\nAnswer:"]
    hf = HFGenerator(lm, max_new_tokens=16).generate(prompts)
    vl = VLLMGenerator(lm, max_new_tokens=16).generate(prompts)
    assert [g.prompt_tokens for g in vl] == [g.prompt_tokens for g in hf]
    assert all(g.new_tokens <= 16 for g in vl)
    assert [g.text for g in vl] == [g.text for g in hf]
