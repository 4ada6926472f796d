"""lm-evaluation-harness: exported tasks, full-context parity with lm-eval's HFLM, and the r3mem-bench model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from r3mem_bench.task import TaskRegistry


def _task(**overrides):
    return TaskRegistry().resolve("wikitext2", {"max_documents": 2, **overrides})[0]


def test_export_writes_lm_eval_yaml_and_truncated_jsonl(tiny_lm, tmp_path):
    from r3mem_bench.lm_eval_export import export_task

    summary = export_task(_task(max_tokens=200), tiny_lm.tokenizer, tmp_path)
    spec = yaml.safe_load((tmp_path / "r3mem_wikitext2.yaml").read_text())
    assert spec["output_type"] == "loglikelihood_rolling" and spec["dataset_path"] == "json"
    assert spec["doc_to_text"] == "" and spec["doc_to_target"] == "text"
    assert [m["metric"] for m in spec["metric_list"]] == ["word_perplexity", "byte_perplexity", "bits_per_byte"]
    rows = [json.loads(line) for line in Path(spec["dataset_kwargs"]["data_files"]["test"]).read_text().splitlines()]
    assert len(rows) == summary["documents"] == 2
    for row in rows:  # cut at exactly max_tokens tokens
        assert len(tiny_lm.tokenizer(row["text"], add_special_tokens=False)["input_ids"]) == 200


def test_export_cli_expands_sweeps_and_prints_command(cli, tmp_path):
    res = cli("export-lm-eval", "--task", "wikitext2_sweep", "--out", str(tmp_path), "--model", "tiny-random",
              "--param", "min_tokens=0", "--limit", "1")
    assert res.returncode == 0, res.stderr
    names = sorted(p.stem for p in tmp_path.glob("*.yaml"))
    assert names == ["r3mem_wikitext2_sweep_max_tokens_2048_segment_len_256",
                     "r3mem_wikitext2_sweep_max_tokens_2048_segment_len_512",
                     "r3mem_wikitext2_sweep_max_tokens_8191_segment_len_256",
                     "r3mem_wikitext2_sweep_max_tokens_8191_segment_len_512"]
    assert "lm_eval --model hf" in res.stdout and "prefix_token_id=1" in res.stdout


def test_export_rejects_warmup(tiny_lm, tmp_path):
    from r3mem_bench.errors import UserError
    from r3mem_bench.lm_eval_export import export_task

    with pytest.raises(UserError, match="warmup_segments"):
        export_task(_task(warmup_segments=1), tiny_lm.tokenizer, tmp_path)


def test_full_context_matches_lm_eval_bits_per_byte_tiny(tiny_lm, tmp_path):
    """The CI version of benchmarks/lm_eval_parity.py: same documents, same model object, within 1%."""
    from r3mem_bench.lm_eval_export import lm_eval_parity

    res = lm_eval_parity(tiny_lm, _task(max_tokens=300, segment_len=128), tmp_path)
    assert res["documents"] == 2 and res["tokens_scored"] == 600
    assert res["relative_difference"] < 0.01, res


def test_adapter_runs_exported_task_with_memory_method(tiny_lm, tmp_path):
    """lm-eval drives our no_memory method through the adapter; rolling NLL equals our LM family's."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from r3mem_bench.families import get_family
    from r3mem_bench.lm_eval_adapter import R3MemLM
    from r3mem_bench.lm_eval_export import export_task
    from r3mem_bench.methods import get_method_class

    task = _task(max_tokens=300, segment_len=64)
    export_task(task, tiny_lm.tokenizer, tmp_path)
    adapter = R3MemLM(model="tiny-random", method="no_memory", segment_len=64, device="cpu")
    res = lm_eval.simple_evaluate(model=adapter, tasks=["r3mem_wikitext2"],
                                  task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False))
    theirs = res["results"]["r3mem_wikitext2"]["bits_per_byte,none"]
    fam = get_family("lm")
    rows: list[dict] = []
    fam.evaluate(task, get_method_class("no_memory")(tiny_lm, {}), fam.examples(task, None, tiny_lm.tokenizer),
                 rows.append)
    ours = fam.aggregate(rows, task.params)["bits_per_byte"]
    assert abs(theirs - ours) / ours < 1e-4
    from lm_eval.api.instance import Instance

    text = json.loads((tmp_path / "r3mem_wikitext2.jsonl").read_text().splitlines()[0])["text"]
    full = R3MemLM(model="tiny-random", method="full_context", segment_len=64, device="cpu")
    req = Instance("loglikelihood_rolling", {}, (text,), 0)
    ll_full, ll_none = full.loglikelihood_rolling([req])[0], adapter.loglikelihood_rolling([req])[0]
    assert ll_full < 0 and ll_none < 0 and ll_full != pytest.approx(ll_none, rel=1e-6)  # the method matters


def _mc_task(tmp_path: Path) -> str:
    rows = [{"ctx": "The sky on a clear day is", "choices": [" blue", " green"], "label": 0},
            {"ctx": "Two plus two equals", "choices": [" four", " nine"], "label": 0}]
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "mc.yaml").write_text(yaml.safe_dump({
        "task": "r3mem_tiny_mc", "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(tmp_path / "mc.jsonl")}}, "test_split": "test",
        "output_type": "multiple_choice", "doc_to_text": "{{ctx}}", "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{label}}", "metric_list": [{"metric": "acc"}], "metadata": {"version": 1.0}}))
    return "r3mem_tiny_mc"


def test_adapter_loglikelihood_matches_direct_scoring(tiny_lm, tmp_path):
    """A multiple-choice lm-eval task: each choice's log-likelihood is the method's NLL after the context."""
    import lm_eval
    from lm_eval.api.instance import Instance
    from lm_eval.tasks import TaskManager

    from r3mem_bench.lm_eval_adapter import R3MemLM
    from r3mem_bench.scoring import score_continuation

    adapter = R3MemLM(model="tiny-random", method="full_context", segment_len=4, device="cpu")
    req = Instance("loglikelihood", {}, ("The sky on a clear day is", " blue"), 0)
    (ll, greedy), = adapter.loglikelihood([req])
    tok = tiny_lm.tokenizer
    ctx = [tiny_lm.prefix_token_id] + tok("The sky on a clear day is", add_special_tokens=False)["input_ids"]
    import torch

    direct = score_continuation(tiny_lm, torch.tensor(ctx), torch.tensor(tok(" blue", add_special_tokens=False)["input_ids"]))
    assert ll == pytest.approx(-float(direct.sum()), rel=1e-5) and greedy is False
    name = _mc_task(tmp_path)
    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)
    sent = []  # every (context, continuation) lm-eval asked for, in order, with the adapter's answer
    real = adapter.loglikelihood

    def recording(requests, *a, **k):
        out = real(requests, *a, **k)
        sent.extend((r.args, o[0]) for r, o in zip(requests, out))
        return out

    adapter.loglikelihood = recording
    res = lm_eval.simple_evaluate(model=adapter, tasks=[name], task_manager=manager)
    assert len(sent) == 4  # 2 documents x 2 choices
    for (context, continuation), ll_sent in sent:  # each answer equals direct scoring of that request
        c = [tiny_lm.prefix_token_id] + tok(context, add_special_tokens=False)["input_ids"]
        x = tok(continuation, add_special_tokens=False)["input_ids"]
        assert ll_sent == pytest.approx(-float(score_continuation(tiny_lm, torch.tensor(c), torch.tensor(x)).sum()),
                                        rel=1e-5)
    by_doc = {}
    for (context, continuation), ll in sent:
        by_doc.setdefault(context, []).append(ll)
    expected = sum(max(range(2), key=lambda i: lls[i]) == 0 for lls in by_doc.values()) / 2  # label 0 in both
    assert res["results"][name]["acc,none"] == pytest.approx(expected)


def test_adapter_generate_until_qa_and_raw(tiny_lm):
    from lm_eval.api.instance import Instance

    from r3mem_bench.lm_eval_adapter import R3MemLM

    req = Instance("generate_until", {}, ("Paris is in France.\n\nQuestion: Where is Paris?", {"until": ["\n"], "max_gen_toks": 5}), 0)
    qa = R3MemLM(model="tiny-random", method="full_context", device="cpu")
    out = qa.generate_until([req])
    assert len(out) == 1 and isinstance(out[0], str) and "\n" not in out[0]
    assert qa.method.items and "Paris is in France." in qa.method.items[0].text
    raw = R3MemLM(model="tiny-random", method="full_context", device="cpu")
    raw.qa = False
    assert isinstance(raw.generate_until([req])[0], str)


def test_adapter_is_registered_and_cli_wrapper_knows_it(cli, tmp_path):
    import r3mem_bench.lm_eval_adapter  # noqa: F401
    from lm_eval.api.registry import get_model

    assert get_model("r3mem-bench").__name__ == "R3MemLM"
    name = _mc_task(tmp_path)
    res = cli("lm-eval", "--model", "r3mem-bench", "--model_args", "model=tiny-random,method=nonexistent",
              "--include_path", str(tmp_path), "--tasks", name, "--device", "cpu")
    # lm-eval resolved `r3mem-bench` and built it: our one-line error about the method comes back
    assert res.returncode == 2 and "unknown method 'nonexistent'" in res.stderr and "Traceback" not in res.stderr


def test_adapter_rejects_bad_segment_len():
    from r3mem_bench.errors import UserError
    from r3mem_bench.lm_eval_adapter import R3MemLM

    with pytest.raises(UserError, match="segment_len"):
        R3MemLM(model="tiny-random", method="no_memory", segment_len=0, device="cpu")


@pytest.mark.slow
def test_full_context_matches_lm_eval_bits_per_byte_smollm2(tmp_path):
    """SmolLM2 on two WikiText-2 articles (2048 tokens each): lm-eval and our protocol within 1%."""
    from r3mem_bench.lm_eval_export import lm_eval_parity
    from r3mem_bench.models import load_model

    res = lm_eval_parity(load_model("smollm2-135m", device="cpu"), _task(max_tokens=2048), tmp_path)
    assert res["relative_difference"] < 0.01, res


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="CUDA is available: no fallback to test")
def test_adapter_falls_back_to_cpu_when_lm_eval_asks_for_cuda_without_it():
    from r3mem_bench.lm_eval_adapter import R3MemLM

    with pytest.warns(UserWarning, match="CUDA is not available; using cpu"):
        adapter = R3MemLM(model="tiny-random", method="no_memory", segment_len=8, device="cuda")  # lm-eval's default
    assert str(adapter.lm.device) == "cpu"


def test_adapter_refuses_likelihood_requests_for_a_qa_only_method():
    from lm_eval.api.instance import Instance

    from r3mem_bench.errors import UserError
    from r3mem_bench.lm_eval_adapter import R3MemLM

    adapter = R3MemLM(model="tiny-random", method="memorybank", segment_len=8, device="cpu", summary_tokens=4)
    req = Instance("loglikelihood", {}, ("The sky is", " blue"), 0)
    with pytest.raises(UserError, match="scores no token likelihoods"):
        adapter.loglikelihood([req])


def test_adapter_agrees_with_lm_eval_hf_model_on_likelihood_and_is_greedy(tiny_lm):
    """Multiple-choice and lambada-style requests: log-likelihood within 1e-4 and the same is_greedy as lm-eval's
    own HF model on the same weights and the same tokens (BOS, then the context)."""
    import torch
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from r3mem_bench.lm_eval_adapter import R3MemLM

    tok = tiny_lm.tokenizer
    context = "The sky on a clear day is"
    ids = [tiny_lm.prefix_token_id] + tok(context, add_special_tokens=False)["input_ids"]
    with torch.no_grad():  # the greedy next two tokens, for a continuation that is_greedy must accept
        for _ in range(2):
            ids.append(int(tiny_lm.model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    greedy_text = tok.decode(ids[-2:])
    assert tok(context + greedy_text, add_special_tokens=False)["input_ids"][-2:] == ids[-2:]
    pairs = [(context, " blue"), (context, " green"), (context, greedy_text), ("Two plus two equals", " four")]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    ours = R3MemLM(model="tiny-random", method="full_context", segment_len=4, device="cpu").loglikelihood(requests)
    # this tokenizer adds no BOS itself: lm-eval's HF model gets it as text, the adapter's streams start with it
    assert tok(context)["input_ids"][0] != tiny_lm.prefix_token_id
    bos = tok.convert_ids_to_tokens(tiny_lm.prefix_token_id)
    theirs = HFLM(pretrained=tiny_lm.model, tokenizer=tok, batch_size=1, device="cpu").loglikelihood(
        [Instance("loglikelihood", {}, (bos + c, t), i) for i, (c, t) in enumerate(pairs)])
    for (ll, greedy), (ref_ll, ref_greedy) in zip(ours, theirs):
        assert ll == pytest.approx(ref_ll, abs=1e-4) and greedy == ref_greedy
    assert [g for _, g in ours] == [False, False, True, False]
    windowed = R3MemLM(model="tiny-random", method="no_memory", segment_len=4, device="cpu").loglikelihood(requests[2:3])
    assert windowed[0][0] != pytest.approx(ours[2][0], abs=1e-3)  # the method still matters


def test_adapter_generate_until_passes_lm_eval_prompts_through_unchanged(tiny_lm, monkeypatch):
    """No chat template or system text of ours around lm-eval's prompt (QA and LM-only methods alike)."""
    from lm_eval.api.instance import Instance

    from r3mem_bench.generation import HFGenerator
    from r3mem_bench.lm_eval_adapter import R3MemLM

    seen = []
    encode = HFGenerator.encode
    monkeypatch.setattr(HFGenerator, "encode", lambda self, p: seen.append(encode(self, p)) or seen[-1])
    prompt = "Q: Where is Paris?\nA:"
    R3MemLM(model="tiny-random", method="no_memory", device="cpu").generate_until(
        [Instance("generate_until", {}, (prompt, {"until": ["\n"], "max_gen_toks": 3}), 0)])
    assert seen == [tiny_lm.tokenizer(prompt, add_special_tokens=True)["input_ids"]]
