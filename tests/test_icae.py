"""ICAE: encoder/decoder layout, slots carried across segments and the reset control, spans, training step,
checkpoints, the equal-state window and the refusal to run untrained."""

from __future__ import annotations

import json

import pytest
import torch
from fixtures.baselines.helpers import LM_TEXT, qa_parts, retrieval_fixture, run_lm, run_qa

from r3mem_bench.baselines.icae import CONFIG_FILE
from r3mem_bench.errors import UserError
from r3mem_bench.methods import get_method_class

OPTS = {"num_mem_tokens": 4, "untrained": True}


def make(tiny_lm, name="icae", **opts):
    torch.manual_seed(0)
    m = get_method_class(name)(tiny_lm, {**OPTS, **opts})
    with torch.no_grad():  # LoRA B starts at zero: move every trained tensor so the adapter changes the encoder
        for p in m.trainable_parameters().values():
            p.add_(0.05 * torch.randn_like(p))
    return m


def test_the_decoder_is_the_frozen_base_model_and_the_encoder_is_adapted(tiny_lm, segments):
    m = make(tiny_lm)
    seg = segments[1].view(1, -1)
    slots = m.compress(segments[0].view(1, -1))
    assert slots.shape == (1, 4, tiny_lm.model.config.hidden_size)
    assert torch.allclose(slots.norm(dim=-1), torch.full((1, 4), m.emb_norm), rtol=1e-4)
    emb = tiny_lm.model.get_input_embeddings()
    x = torch.cat([emb(torch.tensor([[tiny_lm.prefix_token_id]])), slots, emb(seg)], dim=1)
    plain = tiny_lm.model(inputs_embeds=x).logits[:, 4: 4 + 32]  # the unadapted model, last slot predicts token 0
    assert torch.allclose(m.read(slots, seg), plain, atol=1e-5)
    adapted = m.body(inputs_embeds=x).logits[:, 4: 4 + 32]  # the adapter is on outside the decoder pass
    assert not torch.allclose(adapted, plain, atol=1e-3)


def test_slots_are_carried_and_the_reset_control_reads_an_empty_text(tiny_lm, segments):
    icae, reset = make(tiny_lm), make(tiny_lm, "icae_reset")
    a, b = icae.score_stream(segments), reset.score_stream(segments)
    assert torch.allclose(a[0], b[0])  # both read the empty text's slots before the first segment
    assert not torch.allclose(a[1], b[1])  # then icae reads segment 0's slots
    again = make(tiny_lm, "icae_reset")
    assert torch.allclose(again.score_segment(segments[2]), b[2])  # the reset control: each segment alone
    assert reset.state_bytes() == 0 and reset.lm_state_bytes() == 0
    rows = run_lm(make(tiny_lm), LM_TEXT, 32, 96)
    enc, dec = 1 + 32 + 4, 1 + 4 + 32
    assert rows[0]["n_segments"] == 3 and rows[0]["tokens_processed"] == (1 + 4) + 3 * (enc + dec)


def test_spans_concatenate_the_slots_of_earlier_segments(tiny_lm, segments):
    one, two, every = make(tiny_lm), make(tiny_lm, spans=2), make(tiny_lm, spans=0)
    a, b, c = one.score_stream(segments), two.score_stream(segments), every.score_stream(segments)
    assert torch.allclose(a[1], b[1]) and torch.allclose(b[1], c[1])  # one earlier segment: the same slots
    assert not torch.allclose(a[2], b[2])  # segment 2 reads segments 0 and 1 with spans=2
    per_segment = 4 * tiny_lm.model.config.hidden_size * 4
    assert one.state_bytes() == one.lm_state_bytes() == per_segment
    assert two.state_bytes() == two.lm_state_bytes() == 2 * per_segment
    assert every.state_bytes() == 3 * per_segment and every.lm_state_bytes() is None  # grows with the document
    assert every.carried_slots().shape[1] == 12
    with pytest.raises(UserError, match="spans"):
        get_method_class("icae")(tiny_lm, {**OPTS, "spans": -1})


def test_training_lowers_the_loss_and_touches_only_adapter_and_tokens(tiny_lm, segments):
    torch.manual_seed(0)
    m = get_method_class("icae")(tiny_lm, OPTS)
    base = {n: p.detach().clone() for n, p in tiny_lm.model.named_parameters()}
    params = m.trainable_parameters()
    assert "icae.tokens" in params and any("lora_" in n for n in params)
    m.train(True)
    opt = torch.optim.AdamW(params.values(), lr=1e-2)
    losses = []
    for _ in range(8):
        out = m.training_losses(segments)
        out["loss"].backward()
        assert m.tokens.grad is not None and m.tokens.grad[:4].abs().sum() > 0  # memory tokens learn
        assert m.tokens.grad[4].abs().sum() > 0  # and the [AE] token
        opt.step()
        opt.zero_grad()
        losses.append(float(out["loss"].detach()))
    assert set(out) == {"loss", "ae_nll", "lm_nll"}
    assert abs(float(out["loss"].detach()) - (float(out["ae_nll"]) + float(out["lm_nll"])) / 2) < 1e-4
    assert losses[-1] < losses[0] - 0.05, losses
    for n, p in tiny_lm.model.named_parameters():  # the shared base model is untouched
        assert torch.equal(p, base[n]), n


def test_checkpoint_round_trip_bit_for_bit(tiny_lm, segments, tmp_path):
    m = make(tiny_lm, spans=2)
    m.save_checkpoint(tmp_path, {"training": {"steps": 1}})
    cfg = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert cfg["num_mem_tokens"] == 4 and cfg["spans"] == 2 and cfg["training"] == {"steps": 1}
    loaded = get_method_class("icae")(tiny_lm, {"checkpoint": str(tmp_path)})
    assert loaded.num_mem == 4 and loaded.spans == 2 and loaded.checkpoint_id.startswith(str(tmp_path))
    saved, back = m.trainable_parameters(), loaded.trainable_parameters()
    assert sorted(saved) == sorted(back) and all(torch.equal(saved[n], back[n]) for n in saved)
    assert all(torch.equal(x, y) for x, y in zip(m.score_stream(segments), loaded.score_stream(segments)))
    cfg["base_model"] = "smollm2-135m"
    (tmp_path / CONFIG_FILE).write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="smollm2-135m"):
        get_method_class("icae")(tiny_lm, {"checkpoint": str(tmp_path)})


def test_trainer_writes_a_checkpoint_icae_loads(tiny_lm, tmp_path, segments):
    from r3mem_bench.train import TrainConfig, train

    cfg = TrainConfig(method="icae", model="tiny-random", steps=2, warmup=1, segment_len=32, segments=2,
                      micro_batch=2, output=str(tmp_path / "ck"), checkpoint_every=1,
                      method_options={"num_mem_tokens": 4})
    root = train(cfg, quiet=True)
    saved = json.loads((root / CONFIG_FILE).read_text())
    assert saved["training"]["step"] == 2 and saved["training"]["samples"] == 4
    m = get_method_class("icae")(tiny_lm, {"checkpoint": str(root)})
    assert m.num_mem == 4 and len(m.score_stream(segments)) == 3


def test_untrained_for_a_model_without_a_checkpoint_is_refused(tiny_lm):
    with pytest.raises(UserError, match="train --method icae"):
        get_method_class("icae")(tiny_lm, {})
    with pytest.raises(UserError, match="train --method icae"):
        get_method_class("icae_reset")(tiny_lm, {})


@pytest.mark.parametrize("M", [2, 8])
def test_window_at_icae_is_the_largest_window_within_its_slots(tiny_lm, M):
    m = make(tiny_lm, num_mem_tokens=M)
    m.score_segment(torch.arange(5, 21))
    carried = m.slots[-1].numel() * m.slots[-1].element_size()  # the slots handed to the next segment
    assert m.lm_state_bytes() == carried
    c = tiny_lm.model.config
    per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads) * 4
    for name, factor in (("window@icae", 1), ("window4x@icae", 4)):
        w = get_method_class(name)(tiny_lm, {**OPTS, "num_mem_tokens": M})
        assert w.window * per_token <= factor * carried < (w.window + 1) * per_token


def test_qa_reads_every_segment_of_the_corpus_through_the_frozen_model(tiny_lm):
    items, questions = retrieval_fixture()
    torch.manual_seed(0)
    m = get_method_class("icae")(tiny_lm, {**OPTS, "segment_len": 32}, **qa_parts(tiny_lm))
    rows = run_qa(m, items, questions[:2])
    corpus_tokens = len(tiny_lm.tokenizer("\n".join(i.text for i in items), add_special_tokens=False)["input_ids"])
    n_seg = -(-corpus_tokens // 32)
    assert rows[0]["ingest_tokens"] == n_seg * (1 + 4) + corpus_tokens
    assert len(m.passage_slots) == n_seg and m.state_bytes() == n_seg * 4 * tiny_lm.model.config.hidden_size * 4
    assert all(r["retrieved_ids"] == [] for r in rows) and "recall" not in rows[0]["metrics"]
    q = questions[0]["question"]
    full = m.answer_nll(q, ["Paris"]).nll[0]
    m.passage_slots = m.passage_slots[:1]
    assert m.answer_nll(q, ["Paris"]).nll[0] != pytest.approx(full, abs=1e-6)  # the answer reads the slots
    reset = get_method_class("icae_reset")(tiny_lm, {**OPTS, "segment_len": 32}, **qa_parts(tiny_lm))
    reset_rows = run_qa(reset, items, questions[:2])
    assert reset.passage_slots == [] and reset.state_bytes() == 0
    assert reset_rows[0]["ingest_tokens"] == 1 + 4  # the empty text's slots, computed once with the ingest
