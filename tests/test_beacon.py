"""Activation Beacon: interleaving and routing, memory carried and capped, the reset control, training step,
checkpoints, QA from the beacons of a corpus and the refusal to run untrained."""

from __future__ import annotations

import json

import pytest
import torch
from fixtures.baselines.helpers import LM_TEXT, qa_parts, retrieval_fixture, run_lm, run_qa

from r3mem_bench.baselines.beacon import CONFIG_FILE
from r3mem_bench.errors import UserError
from r3mem_bench.methods import get_method_class

OPTS = {"untrained": True, "ratio": 8}


def make(tiny_lm, name="beacon", parts=None, **opts):
    torch.manual_seed(0)
    m = get_method_class(name)(tiny_lm, {**OPTS, **opts}, **(parts or {}))
    with torch.no_grad():  # move the beacon copies off the base weights
        for p in m.trainable_parameters().values():
            p.add_(0.05 * torch.randn_like(p))
    return m


def test_only_beacon_positions_use_the_beacon_projections(tiny_lm, segments):
    m = make(tiny_lm)
    seg = segments[0].view(1, -1)
    sink_kv, first = m._run_sink(1)
    hidden, beacons = m.window(seg, None, sink_kv, ratio=8)
    assert hidden.shape == (1, 32, tiny_lm.model.config.hidden_size) and beacons.shape[-2] == 4
    # raw tokens before the first beacon see no beacon: they equal the plain model on [sink][those tokens]
    plain = tiny_lm.model(input_ids=torch.cat([torch.tensor([[tiny_lm.prefix_token_id]]), seg[:, :8]], dim=1),
                          output_hidden_states=True).hidden_states[-1][:, 1:]
    assert torch.allclose(hidden[:, :8], plain, atol=1e-5)
    assert torch.allclose(first, tiny_lm.model(input_ids=torch.tensor([[tiny_lm.prefix_token_id]])).logits[:, -1],
                          atol=1e-5)
    # the ninth raw token comes after a beacon, whose routed projections change what it sees
    copy = make(tiny_lm)
    with torch.no_grad():
        for n, p in copy.trainable_parameters().items():
            if n != "beacon.embed":
                p.mul_(0.5)
    other, _ = copy.window(seg, None, copy._run_sink(1)[0], ratio=8)
    assert torch.allclose(other[:, :8], hidden[:, :8], atol=1e-6) and not torch.allclose(other[:, 8:], hidden[:, 8:])


def test_memory_is_carried_grows_by_segment_over_ratio_and_can_be_capped(tiny_lm, segments):
    beacon, reset = make(tiny_lm), make(tiny_lm, "beacon_reset")
    a, b = beacon.score_stream(segments), reset.score_stream(segments)
    assert torch.allclose(a[0], b[0])
    assert torch.allclose(a[1][0], b[1][0])  # first token: the previous window's last raw token, in both
    assert not torch.allclose(a[1][1:], b[1][1:])  # then beacon reads segment 0's beacons
    per_entry = 2 * tiny_lm.model.config.num_hidden_layers * 2 * 16 * 4  # 2 kv heads x head dim 16, fp32
    assert beacon.memory.shape[-2] == 3 * 4 and beacon.state_bytes() == 12 * per_entry
    assert reset.state_bytes() == 0 and reset.lm_state_bytes() == 0 and beacon.lm_state_bytes() is None
    capped = make(tiny_lm, max_beacons=4)
    c = capped.score_stream(segments)
    assert capped.memory.shape[-2] == 4 and capped.lm_state_bytes() == 4 * per_entry
    assert torch.allclose(c[1], a[1]) and not torch.allclose(c[2], a[2])  # the cap bites from segment 2 on
    coarse = make(tiny_lm, ratio=16)
    coarse.score_stream(segments)
    assert coarse.memory.shape[-2] == 3 * 2
    rows = run_lm(make(tiny_lm), LM_TEXT, 32, 96)
    assert rows[0]["tokens_processed"] == 1 + 3 * (32 + 4)


def test_training_lowers_the_loss_and_touches_only_the_beacon_parameters(tiny_lm, segments):
    torch.manual_seed(0)
    m = get_method_class("beacon")(tiny_lm, {**OPTS, "train_ratios": "4,8"})
    base = {n: p.detach().clone() for n, p in tiny_lm.model.named_parameters()}
    params = m.trainable_parameters()
    assert "beacon.embed" in params and sum(".beacon." in n for n in params) == 3 * 2  # q, k, v in 2 layers
    m.train(True)
    opt = torch.optim.AdamW(params.values(), lr=1e-2)
    losses = []
    for _ in range(8):
        out = m.training_losses(segments)
        out["loss"].backward()
        assert m.beacon_embed.grad is not None and m.beacon_embed.grad.abs().sum() > 0
        opt.step()
        opt.zero_grad()
        losses.append(float(out["loss"].detach()))
    assert losses[-1] < losses[0] - 0.05, losses
    for n, p in tiny_lm.model.named_parameters():
        assert torch.equal(p, base[n]), n
    frozen = [p for n, p in m.model.named_parameters() if ".beacon." not in n]
    assert frozen and not any(p.requires_grad for p in frozen)


def test_checkpoint_round_trip(tiny_lm, segments, tmp_path):
    m = make(tiny_lm)
    m.save_checkpoint(tmp_path, {"training": {"steps": 1}})
    cfg = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert cfg["training"] == {"steps": 1} and cfg["train_ratios"] == [2, 4, 8, 16, 32]
    loaded = get_method_class("beacon")(tiny_lm, {"checkpoint": str(tmp_path), "ratio": 8})
    saved, back = m.trainable_parameters(), loaded.trainable_parameters()
    assert all(torch.equal(saved[n].to(torch.float16).float(), back[n]) for n in saved)  # stored in float16
    loaded.save_checkpoint(tmp_path / "again")
    again = get_method_class("beacon")(tiny_lm, {"checkpoint": str(tmp_path / "again"), "ratio": 8})
    assert all(torch.equal(back[n], again.trainable_parameters()[n]) for n in back)  # then bit for bit
    assert all(torch.equal(x, y) for x, y in zip(loaded.score_stream(segments), again.score_stream(segments)))
    cfg["base_model"] = "smollm2-135m"
    (tmp_path / CONFIG_FILE).write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="smollm2-135m"):
        get_method_class("beacon")(tiny_lm, {"checkpoint": str(tmp_path)})


def test_untrained_without_a_checkpoint_is_refused_and_bad_options_are_one_line(tiny_lm):
    with pytest.raises(UserError, match="train --method beacon"):
        get_method_class("beacon")(tiny_lm, {})
    with pytest.raises(UserError, match="ratio"):
        get_method_class("beacon")(tiny_lm, {"untrained": True, "ratio": 0})
    with pytest.raises(UserError, match="max_beacons"):
        get_method_class("beacon")(tiny_lm, {"untrained": True, "max_beacons": -1})


def test_qa_answers_from_the_beacons_of_the_whole_corpus(tiny_lm):
    items, questions = retrieval_fixture()
    m = make(tiny_lm, segment_len=32, parts=qa_parts(tiny_lm))
    rows = run_qa(m, items, questions[:2])
    ids = tiny_lm.tokenizer("\n".join(i.text for i in items), add_special_tokens=False)["input_ids"]
    n_beacons = sum(len(ids[i:i + 32]) // 8 for i in range(0, len(ids), 32))
    assert n_beacons > 4 and m.memory.shape[-2] == n_beacons
    per_entry = 2 * tiny_lm.model.config.num_hidden_layers * 2 * 16 * 4
    assert m.state_bytes() == n_beacons * per_entry
    assert rows[0]["ingest_tokens"] == 1 + len(ids) + n_beacons
    assert all(r["retrieved_ids"] == [] for r in rows) and "recall" not in rows[0]["metrics"]
    q = questions[0]["question"]
    full = m.answer_nll(q, ["Paris"]).nll[0]
    m.memory = m.memory[..., :4, :]
    assert m.answer_nll(q, ["Paris"]).nll[0] != pytest.approx(full, abs=1e-6)  # the answer reads the beacons
    # no memory: the plain model on [prefix token][closed-book prompt][answer] (no beacon position is routed)
    reset = make(tiny_lm, "beacon_reset", segment_len=32, parts=qa_parts(tiny_lm))
    run_qa(reset, items, questions[:1])
    assert reset.memory is None and reset.state_bytes() == 0
    prompt = qa_parts(tiny_lm)["generator"].encode(reset.prompt.render(question=q, context=""))
    answer = tiny_lm.tokenizer("Paris", add_special_tokens=False)["input_ids"]
    x = torch.tensor([[tiny_lm.prefix_token_id, *prompt, *answer]])
    logits = tiny_lm.model(input_ids=x).logits[0, -len(answer) - 1:-1]
    expected = float(torch.nn.functional.cross_entropy(logits, torch.tensor(answer)))
    assert reset.answer_nll(q, ["Paris"]).nll[0] == pytest.approx(expected, abs=1e-5)
