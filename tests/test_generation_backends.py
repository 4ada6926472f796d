"""One generation engine per process, questions submitted in batches, ``--backend auto`` (CPU, fake vLLM)."""

from __future__ import annotations

import functools
import json
import sys
import types

import pytest

from r3mem_bench.runner import RunConfig, run

EOS_TEXT = " paris"


class FakeVLLM:
    """The surface of ``vllm`` the backend uses: ``LLM(...)``, ``LLM.generate``, ``SamplingParams``."""

    def __init__(self, tokenizer):
        self.engines: list[dict] = []  # kwargs of every LLM(...) created
        self.batches: list[int] = []  # prompts per LLM.generate call
        fake = self
        answer = tokenizer(EOS_TEXT, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]

        class LLM:
            def __init__(self, **kwargs):
                fake.engines.append(kwargs)

            def generate(self, prompts, sampling_params, use_tqdm=True):
                fake.batches.append(len(prompts))
                assert all("prompt_token_ids" in p for p in prompts) and sampling_params.temperature == 0
                return [types.SimpleNamespace(prompt_token_ids=p["prompt_token_ids"],
                                              outputs=[types.SimpleNamespace(token_ids=list(answer))]) for p in prompts]

        class SamplingParams:
            def __init__(self, temperature=1.0, max_tokens=16):
                self.temperature, self.max_tokens = temperature, max_tokens

        self.module = types.ModuleType("vllm")
        self.module.LLM, self.module.SamplingParams = LLM, SamplingParams


@pytest.fixture
def fake_vllm(monkeypatch, tiny_lm):
    import r3mem_bench.vllm_backend as vb

    fake = FakeVLLM(tiny_lm.tokenizer)
    monkeypatch.setitem(sys.modules, "vllm", fake.module)
    monkeypatch.setattr(vb, "serve_reason", lambda model: None)  # as if tiny-random had a directory
    monkeypatch.setattr(vb, "resolve_model_path", lambda name: "/models/fake")
    monkeypatch.setattr(vb, "_ENGINES", {})
    return fake


def _rows(root) -> dict[str, list[dict]]:
    out = {}
    for path in sorted(root.rglob("results.jsonl")):
        rel = path.parent.relative_to(root)
        out[str(rel)] = [json.loads(x) for x in path.read_text().splitlines()]
    return out


QA = {"needle": {"n_corpora": 2, "questions_per_corpus": 2, "n_passages": 3, "passage_words": 40, "max_new_tokens": 3},
      "persona": {"conversations": 1, "max_new_tokens": 3}}


def _run(tmp_path, name, backend, tasks=("needle", "persona"), methods=("full_context", "vector_rag"), limit=4):
    for task in tasks:
        run(RunConfig(tasks=[task], methods=list(methods), model="tiny-random", limit=limit, output=str(tmp_path / name),
                      overrides=dict(QA[task]), backend=backend, threads=1))
    return _rows(tmp_path / name)


def test_one_engine_serves_every_task_and_method_and_gets_batches(tmp_path, fake_vllm):
    rows = _run(tmp_path, "vllm", "vllm")
    assert len(fake_vllm.engines) == 1, fake_vllm.engines  # two tasks x two methods, one engine
    assert fake_vllm.engines[0]["model"] == "/models/fake"
    # every cell's questions went to the engine together: 4 questions per cell, 4 cells
    assert fake_vllm.batches == [4, 4, 4, 4]
    assert len(rows) == 4 and all(len(r) == 4 for r in rows.values())
    assert {row["prediction"] for r in rows.values() for row in r} == {EOS_TEXT.strip()}


def test_no_engine_for_methods_that_never_generate(tmp_path, fake_vllm):
    run(RunConfig(tasks=["needle"], methods=["no_memory", "full_context"], model="tiny-random", limit=2,
                  output=str(tmp_path / "lik"), overrides={**QA["needle"], "generate": False}, backend="vllm", threads=1))
    assert fake_vllm.engines == [] and fake_vllm.batches == []


def test_batched_hf_generation_gives_the_same_rows_as_one_question_at_a_time(tmp_path, monkeypatch):
    """A cell's questions generated together (HF batch 8) or one by one: the same rows."""
    import r3mem_bench.backends as backends
    from r3mem_bench.generation import HFGenerator

    calls = []
    generate = HFGenerator.generate

    def spy(self, prompts):
        calls.append(len(prompts))
        return generate(self, prompts)

    monkeypatch.setattr(HFGenerator, "generate", spy)
    batched = _run(tmp_path, "batched", "hf")
    assert calls == [4, 4, 4, 4]
    calls.clear()
    monkeypatch.setattr(backends, "HFGenerator", functools.partial(HFGenerator, batch_size=1))
    single = _run(tmp_path, "single", "hf")
    assert calls == [1] * 16
    volatile = {"answer_s", "ingest_s", "likelihood_s"}
    strip = {k: [{f: v for f, v in row.items() if f not in volatile} for row in r] for k, r in batched.items()}
    assert strip == {k: [{f: v for f, v in row.items() if f not in volatile} for row in r] for k, r in single.items()}


def test_left_padded_batches_give_smollm2_the_same_greedy_answers(smollm2):
    """Greedy answers of SmolLM2 on CPU do not depend on the batch they are generated in."""
    from r3mem_bench.generation import HFGenerator

    prompts = ["Question: What is the capital of France?\nAnswer:", "Question: Name a colour.\nAnswer:",
               "Context:\nThe secret code of the vault is 4471. The vault is in Oslo.\n\nQuestion: What is the "
               "secret code of the vault?\nAnswer:", "Question: Who wrote Hamlet?\nAnswer:",
               "Context:\nMaria moved to Lisbon in 2019 and works as a nurse.\n\nQuestion: Where does Maria live?\nAnswer:"]
    one = HFGenerator(smollm2, max_new_tokens=8, batch_size=1).generate(prompts)
    together = HFGenerator(smollm2, max_new_tokens=8, batch_size=len(prompts)).generate(prompts)
    assert [g.text for g in together] == [g.text for g in one]
    assert [(g.prompt_tokens, g.new_tokens) for g in together] == [(g.prompt_tokens, g.new_tokens) for g in one]
    assert len({g.text for g in one}) >= 4  # real, different answers


def test_auto_backend_falls_back_to_hf_and_says_why_where_vllm_was_expected(tiny_lm, monkeypatch, capsys):
    import r3mem_bench.backends as backends

    monkeypatch.setattr(backends, "_SAID", set())
    assert backends.make_generator(tiny_lm, {}, "auto").name == "hf"
    monkeypatch.setattr(backends.torch.cuda, "is_available", lambda: True)  # a GPU machine: tiny-random cannot use vLLM
    monkeypatch.setattr("r3mem_bench.vllm_backend.vllm_unavailable_reason", lambda: None)
    assert backends.make_generator(tiny_lm, {}, "auto").name == "hf"
    assert backends.make_generator(tiny_lm, {}, "auto").name == "hf"
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["note: --backend auto generates with hf: model 'tiny-random' exists only in memory (vLLM loads "
                   "weights from a directory or hub id)"]


def test_auto_backend_picks_vllm_when_it_can_serve_the_model(monkeypatch):
    import r3mem_bench.backends as backends

    monkeypatch.setattr("r3mem_bench.vllm_backend.vllm_unavailable_reason", lambda: None)
    assert backends.resolve_backend("auto", "smollm2-135m") == "vllm"
    assert backends.resolve_backend("hf", "smollm2-135m") == "hf"


def test_weights_dtype_follows_the_device(monkeypatch):
    import torch

    from r3mem_bench.models import default_dtype

    assert default_dtype("cpu") == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert default_dtype("cuda") == torch.bfloat16 and default_dtype("cuda:1") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert default_dtype("cuda") == torch.float16
