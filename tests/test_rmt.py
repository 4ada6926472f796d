"""RMT: memory layout and recurrence, truncated BPTT and curriculum, training step, checkpoints, LM and QA."""

from __future__ import annotations

import json

import pytest
import torch
from fixtures.baselines.helpers import LM_TEXT, qa_parts, retrieval_fixture, run_lm, run_qa

from r3mem_bench.baselines.rmt import CONFIG_FILE, truncate_gradient
from r3mem_bench.errors import UserError
from r3mem_bench.methods import get_method_class

OPTS = {"num_mem_tokens": 4, "untrained": True}


def make(tiny_lm, name="rmt", **opts):
    torch.manual_seed(0)
    return get_method_class(name)(tiny_lm, {**OPTS, **opts})


def test_truncated_bptt_follows_the_released_condition():
    # babilong-release manage_gradients: never seg 0 or k2 = -1; detach while seg_num + k2 <= n (0-based seg_num)
    assert [truncate_gradient(i, 6, 2) for i in range(6)] == [False, True, True, True, True, False]
    assert [truncate_gradient(i, 6, 4) for i in range(6)] == [False, True, True, False, False, False]
    assert [truncate_gradient(i, 3, 4) for i in range(3)] == [False, False, False]
    assert not any(truncate_gradient(i, 6, -1) for i in range(6))


def test_curriculum_splits_the_step_budget(tiny_lm):
    m = make(tiny_lm, train_segments=4, train_steps=9)
    assert m.curriculum == [2, 3, 4]
    got = []
    for step in range(9):
        m.train_step = step
        got.append(m.n_segments_now(4))
    assert got == [2, 2, 2, 3, 3, 3, 4, 4, 4]
    assert m.n_segments_now(1) == 1


def test_cell_layout_and_memory_scale(tiny_lm, segments):
    m = make(tiny_lm)
    logits, mem = m.cell(segments[0].view(1, -1), m.initial_memory(1))
    assert logits.shape == (1, 32, tiny_lm.model.config.vocab_size)
    assert mem.shape == (1, 4, tiny_lm.model.config.hidden_size)
    assert torch.allclose(mem.norm(dim=-1), torch.full((1, 4), m.emb_norm), rtol=1e-4)
    assert m.state_bytes() == 4 * tiny_lm.model.config.hidden_size * 4


def test_memory_is_carried_and_reset_variant_forgets(tiny_lm, segments):
    rmt, reset = make(tiny_lm), make(tiny_lm, "rmt_reset")
    a, b = rmt.score_stream(segments), reset.score_stream(segments)
    assert torch.allclose(a[0], b[0])  # same learned initial memory on segment 0
    assert not torch.allclose(a[1], b[1])  # then rmt reads what segment 0 wrote
    again = make(tiny_lm, "rmt_reset")
    assert torch.allclose(again.score_segment(segments[1]), b[1])  # reset: segment 1 alone
    rows = run_lm(make(tiny_lm), LM_TEXT, 32, 96)
    assert rows[0]["n_segments"] == 3 and rows[0]["tokens_processed"] == 3 * (1 + 2 * 4 + 32)


def test_training_step_lowers_the_loss_and_touches_only_adapter_and_memory(tiny_lm, segments):
    m = make(tiny_lm, train_segments=3, train_steps=0)
    base = {n: p.detach().clone() for n, p in tiny_lm.model.named_parameters()}
    params = m.trainable_parameters()
    assert "rmt.memory" in params and any("lora_" in n for n in params)
    m.train(True)
    opt = torch.optim.AdamW(params.values(), lr=1e-2)
    losses = []
    for _ in range(6):
        out = m.training_losses(segments)
        out["loss"].backward()
        assert m.memory.grad is not None and m.memory.grad.abs().sum() > 0
        opt.step()
        opt.zero_grad()
        losses.append(float(out["loss"].detach()))
    assert out["n_segments"] == 3
    assert losses[-1] < losses[0] - 0.05, losses
    for n, p in tiny_lm.model.named_parameters():  # the shared base model is untouched
        assert torch.equal(p, base[n]), n


def test_checkpoint_round_trip(tiny_lm, segments, tmp_path):
    m = make(tiny_lm)
    with torch.no_grad():
        for p in m.trainable_parameters().values():
            p.add_(0.05 * torch.randn_like(p))
    m.save_checkpoint(tmp_path, {"training": {"steps": 1}})
    cfg = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert cfg["num_mem_tokens"] == 4 and cfg["training"] == {"steps": 1}
    loaded = get_method_class("rmt")(tiny_lm, {"checkpoint": str(tmp_path)})
    assert loaded.num_mem == 4 and loaded.checkpoint_id.startswith(str(tmp_path))
    for x, y in zip(m.score_stream(segments), loaded.score_stream(segments)):
        assert torch.allclose(x, y, atol=1e-5)
    cfg["base_model"] = "smollm2-135m"
    (tmp_path / CONFIG_FILE).write_text(json.dumps(cfg))
    with pytest.raises(UserError):
        get_method_class("rmt")(tiny_lm, {"checkpoint": str(tmp_path)})
    with pytest.raises(UserError):
        get_method_class("rmt")(tiny_lm, {"checkpoint": str(tmp_path / "nowhere")})


def test_trainer_writes_a_checkpoint_rmt_loads(tiny_lm, tmp_path, segments):
    from r3mem_bench.train import TrainConfig, train

    cfg = TrainConfig(method="rmt", model="tiny-random", steps=2, warmup=1, segment_len=32, segments=2,
                      output=str(tmp_path / "ck"), checkpoint_every=1, method_options={"num_mem_tokens": 4})
    root = train(cfg, quiet=True)
    saved = json.loads((root / CONFIG_FILE).read_text())
    assert saved["training"]["step"] == 2 and saved["curriculum"] == [2]
    m = get_method_class("rmt")(tiny_lm, {"checkpoint": str(root)})
    assert m.num_mem == 4 and len(m.score_stream(segments)) == 3


def test_qa_protocol_reads_the_corpus_into_memory(tiny_lm):
    items, questions = retrieval_fixture()
    m = get_method_class("rmt")(tiny_lm, {**OPTS, "segment_len": 32}, **qa_parts(tiny_lm))
    rows = run_qa(m, items, questions[:2])
    corpus_tokens = len(tiny_lm.tokenizer("\n".join(i.text for i in items), add_special_tokens=False)["input_ids"])
    n_seg = -(-corpus_tokens // 32)
    assert rows[0]["ingest_tokens"] == n_seg * (1 + 8) + corpus_tokens
    assert all(r["retrieved_ids"] == [] and r["prompt_tokens"] > 4 for r in rows)
    assert "recall" not in rows[0]["metrics"]  # RMT retrieves no item ids, so it claims no retrieval recall


def test_reset_control_answers_from_the_initial_memory_without_reading_the_corpus(tiny_lm):
    items, questions = retrieval_fixture()
    rmt = get_method_class("rmt")(tiny_lm, {**OPTS, "segment_len": 32}, **qa_parts(tiny_lm))
    reset = get_method_class("rmt_reset")(tiny_lm, {**OPTS, "segment_len": 32}, **qa_parts(tiny_lm))
    rmt_rows, reset_rows = run_qa(rmt, items, questions[:1]), run_qa(reset, items, questions[:1])
    assert rmt_rows[0]["ingest_tokens"] > 0 and reset_rows[0]["ingest_tokens"] == 0
    assert torch.equal(reset.carried_memory(), reset.initial_memory(1))
    assert not torch.equal(rmt.carried_memory(), rmt.initial_memory(1))


def test_training_starts_from_scratch_even_when_a_shipped_checkpoint_exists(tiny_lm, tmp_path, monkeypatch):
    import r3mem_bench.baselines.rmt as rmt_module

    m = make(tiny_lm, lora_r=4)
    m.save_checkpoint(tmp_path / "rmt-tiny-random")
    monkeypatch.setattr(rmt_module, "SHIPPED", tmp_path)
    shipped = get_method_class("rmt")(tiny_lm, {})
    assert shipped.checkpoint_id.startswith("shipped/rmt-tiny-random@") and shipped.lora["r"] == 4
    fresh = get_method_class("rmt")(tiny_lm, {"for_training": True, "train_segments": 2, "lora_r": 16})  # trainer's
    assert fresh.checkpoint_id == "" and fresh.lora["r"] == 16 and "for_training" not in fresh.config()
    at_run_time = get_method_class("rmt")(tiny_lm, {"train_segments": 2})  # a run option, not a training flag
    assert at_run_time.checkpoint_id == shipped.checkpoint_id  # path-free: the same in any checkout


def test_each_memory_size_loads_its_own_shipped_checkpoint_or_is_refused(tiny_lm, tmp_path, monkeypatch):
    """``rmt-<model>`` holds the default 16 memory tokens, ``rmt-m<M>-<model>`` size M: `rmt:num_mem_tokens=M`
    (and --method-arg num_mem_tokens=M) load that one, suite keys hash its weights, a size without one is refused."""
    import r3mem_bench.baselines.rmt as rmt_module

    make(tiny_lm, lora_r=4, num_mem_tokens=16).save_checkpoint(tmp_path / "rmt-tiny-random")
    make(tiny_lm, lora_r=4, num_mem_tokens=2).save_checkpoint(tmp_path / "rmt-m2-tiny-random")
    make(tiny_lm, lora_r=4, num_mem_tokens=3).save_checkpoint(tmp_path / "rmt-m8-tiny-random")  # mislabelled
    monkeypatch.setattr(rmt_module, "SHIPPED", tmp_path)
    assert get_method_class("rmt")(tiny_lm, {}).num_mem == 16
    small = get_method_class("rmt:num_mem_tokens=2")
    assert small(tiny_lm, {}).num_mem == 2 and get_method_class("rmt")(tiny_lm, {"num_mem_tokens": 2}).num_mem == 2
    assert small.shipped_checkpoint("tiny-random") == tmp_path / "rmt-m2-tiny-random"
    assert small.shipped_weights_id("tiny-random") != get_method_class("rmt").shipped_weights_id("tiny-random")
    assert get_method_class("rmt_reset:num_mem_tokens=2")(tiny_lm, {}).num_mem == 2
    with pytest.raises(UserError, match="num_mem_tokens=8"):
        get_method_class("rmt:num_mem_tokens=8")(tiny_lm, {})
