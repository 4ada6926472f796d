"""R3Mem on the tiny random model: KV-memory layout, honest scoring, gradients, the backward path, checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

from r3mem_bench.errors import UserError
from r3mem_bench.method import MemoryItem
from r3mem_bench.methods import get_method_class
from r3mem_bench.r3mem import R3Mem, rotate_keys, rouge_l
from r3mem_bench.scoring import token_nll

TRAIN_OPTS = {"for_training": True, "segment_len": 16, "train_segments": 2, "max_memory_tokens": 8, "memory_tokens": 4,
              "train_memory_sizes": [4, 8], "train_memory_probs": [0.5, 0.5]}


def make(tiny_lm, name: str = "r3mem", **opts) -> R3Mem:
    """An untrained R3Mem variant (random slots, zero LoRA B) with small memory."""
    torch.manual_seed(0)
    return get_method_class(name)(tiny_lm, {"untrained": True, "max_memory_tokens": 8, "memory_tokens": 4,
                                            "segment_len": 16, **opts})


def trainee(tiny_lm, **opts) -> R3Mem:
    """An R3Mem in training mode, with non-zero LoRA B so every adapter path is live."""
    torch.manual_seed(0)
    m = get_method_class("r3mem")(tiny_lm, {**TRAIN_OPTS, **opts})
    m.train(True)
    with torch.no_grad():
        for n, p in m.net.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return m


def segs(n: int, length: int = 16, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(100, 5000, (length,), generator=g) for _ in range(n)]


def test_rotate_keys_moves_rope_keys_exactly(tiny_lm):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    m = make(tiny_lm)
    k = torch.randn(1, 2, 3, m.shape["head_dim"])  # [B, H, T, D], un-rotated keys

    def at(pos: int) -> torch.Tensor:  # keys as the model rotates them at position ``pos``
        cos, sin = m.rotary(k, torch.full((1, 3), pos))
        return apply_rotary_pos_emb(k, k, cos, sin)[1]

    assert torch.allclose(rotate_keys(at(37), -36, m.rotary), at(1), atol=1e-5)
    assert not torch.allclose(at(37), at(1), atol=1e-3)


def test_state_bytes_constant_and_equal_to_kv_of_m_slots(tiny_lm):
    m = make(tiny_lm)
    m.reset()
    sizes = []
    for seg in segs(6):
        nll = m.score_segment(seg)
        assert nll.shape == (16,) and torch.isfinite(nll).all()
        sizes.append(m.state_bytes())
    s = m.shape
    assert sizes == [s["layers"] * 2 * s["kv_heads"] * 4 * s["head_dim"] * 4] * 6


def test_first_token_is_scored_honestly_and_reset_matches_first_segment(tiny_lm):
    m = trainee(tiny_lm)
    m.train(False)
    a, b = segs(1)[0], segs(1, seed=2)[0]
    b[0] = a[0]
    m.reset()
    nll_a = m.score_segment(a)
    m.reset()
    nll_b = m.score_segment(b)
    assert torch.allclose(nll_a[0], nll_b[0])  # the first token does not see the rest of its segment
    assert not torch.allclose(nll_a[1:], nll_b[1:])
    reset = get_method_class("r3mem_reset")(tiny_lm, {"untrained": True, **{k: v for k, v in TRAIN_OPTS.items()
                                                                            if not k.startswith(("train", "for_"))}})
    with torch.no_grad():
        for (n, p), q in zip(reset.trainable_parameters().items(), m.trainable_parameters().values()):
            p.copy_(q)
    reset._cache = {}
    reset.reset()
    assert torch.allclose(reset.score_segment(a), nll_a, atol=1e-5)


def test_memory_carries_the_previous_segment_and_reset_does_not(tiny_lm):
    m = trainee(tiny_lm)
    m.train(False)
    first1, first2, second = segs(1, seed=3)[0], segs(1, seed=4)[0], segs(1, seed=5)[0]
    outs = []
    for first in (first1, first2):
        m.reset()
        m.score_segment(first)
        outs.append(m.score_segment(second))
    assert not torch.allclose(outs[0], outs[1], atol=1e-6)
    m.reset_each_segment = True
    outs = []
    for first in (first1, first2):
        m.reset()
        m.score_segment(first)
        outs.append(m.score_segment(second))
    assert torch.allclose(outs[0], outs[1])


@pytest.mark.parametrize("level", [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
def test_only_adapters_and_memory_embeddings_get_gradients(tiny_lm, level):
    m = trainee(tiny_lm, level_probs=level)
    text = ("Alice Smith met Bob Jones in Paris. Later Alice Smith wrote to Bob Jones about Paris.\n\n"
            "The second paragraph talks about something else entirely, at some length, with many words.")
    ids = tiny_lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    torch.manual_seed(0)
    losses = m.training_losses([torch.tensor(ids[:16]), torch.tensor(ids[16:32])])
    assert {"loss", "lm", "recon", "cycle", "kl"} <= set(losses)
    losses["loss"].backward()
    trainable = m.trainable_parameters()
    for name, p in m.net.named_parameters():
        if "lora_" not in name:
            assert p.grad is None, name
    assert m.slots.grad is not None and m.slots.grad.abs().sum() > 0
    assert m.ae_marker.grad.abs().sum() > 0
    last = f"layers.{tiny_lm.model.config.num_hidden_layers - 1}."
    for adapter in ("compress", "expand"):
        # with the expand reader, the compress pass only writes the slots' keys/values: its last layer's
        # query/output/MLP weights cannot affect anything (their gradient is exactly zero), all others must learn
        grads = {n: p.grad for n, p in trainable.items() if f".{adapter}." in n and "lora_B" in n
                 and not (adapter == "compress" and last in n and not any(k in n for k in ("k_proj", "v_proj")))}
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values()), adapter
    assert all(p.requires_grad for p in trainable.values())
    assert sum(p.requires_grad for p in tiny_lm.model.parameters()) == 0  # the shared base model is untouched


@pytest.fixture(scope="module")
def wide_lm(tiny_lm):
    """tiny-random with token embeddings scaled to std 0.5: its frozen tied head can then reach confident logits
    (at std 0.02 the final RMSNorm caps them near 1.3 and no loss can go below ~9.5 nats)."""
    import copy

    from r3mem_bench.models import LoadedModel

    model = copy.deepcopy(tiny_lm.model)
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb.mul_(0.5 / emb.std())
    return LoadedModel(name="tiny-random-wide", model=model, tokenizer=tiny_lm.tokenizer,
                       prefix_token_id=tiny_lm.prefix_token_id, max_length=tiny_lm.max_length, info={})


def test_backward_path_overfits_a_fixed_text(wide_lm):
    m = trainee(wide_lm)
    text = "The quick brown fox jumps over the lazy dog near the river bank."
    ids = torch.tensor([wide_lm.tokenizer(text, add_special_tokens=False)["input_ids"] + [m.eos]])  # [1, T]
    opt = torch.optim.Adam(list(m.trainable_parameters().values()), lr=3e-3)
    losses = []
    for step in range(80):
        opt.zero_grad()
        _, memory = m.compress(ids[:, :-1], m.empty_memory())
        loss = token_nll(m.expand_logits(memory, ids), ids).mean()  # reconstruction loss, backward path
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] <= 0.1 * losses[0], (losses[0], losses[-1])
    m.train(False)
    m.cfg["segment_len"] = ids.shape[1]  # the report compresses the text as one chunk, as it was trained
    report = m.reconstruction_report(text, greedy=False)
    assert report["token_accuracy"] > 0.75


def test_checkpoint_roundtrip_and_errors(tiny_lm, tmp_path):
    m = trainee(tiny_lm)
    m.cfg["save_dtype"] = "float32"
    m.save_checkpoint(tmp_path / "ck", {"training": {"step": 3}})
    m.train(False)
    m.reset()
    want = [m.score_segment(s) for s in segs(3)]
    loaded = get_method_class("r3mem")(tiny_lm, {"checkpoint": str(tmp_path / "ck"), "memory_tokens": 4})
    loaded.reset()
    got = [loaded.score_segment(s) for s in segs(3)]
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(want, got))
    assert loaded.config()["checkpoint"]["step"] == 3
    with torch.no_grad():  # a retrained checkpoint at the same step must not share the config (no stale resume)
        next(iter(m.trainable_parameters().values())).add_(1.0)
    m.save_checkpoint(tmp_path / "ck2", {"training": {"step": 3}})
    other = get_method_class("r3mem")(tiny_lm, {"checkpoint": str(tmp_path / "ck2"), "memory_tokens": 4})
    assert other.config()["checkpoint"]["sha256"] != loaded.config()["checkpoint"]["sha256"]
    with pytest.raises(UserError, match="memory_tokens=9"):
        get_method_class("r3mem")(tiny_lm, {"checkpoint": str(tmp_path / "ck"), "memory_tokens": 9})
    meta = json.loads((tmp_path / "ck" / "r3mem.json").read_text())
    meta["model_shape"]["hidden"] = 576
    (tmp_path / "ck" / "r3mem.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="trained for model"):
        get_method_class("r3mem")(tiny_lm, {"checkpoint": str(tmp_path / "ck"), "memory_tokens": 4})
    with pytest.raises(UserError, match="no r3mem.json"):
        get_method_class("r3mem")(tiny_lm, {"checkpoint": str(tmp_path), "memory_tokens": 4})
    with pytest.raises(UserError, match="no trained checkpoint for model 'tiny-random'"):
        get_method_class("r3mem")(tiny_lm, {})
    with pytest.raises(UserError, match="unknown option"):
        get_method_class("r3mem")(tiny_lm, {"untrained": True, "memroy_tokens": 8})


def test_qa_ingest_retrieve_hierarchy_and_state(tiny_lm):
    m = make(tiny_lm, top_k=2, recon_max_tokens=12)
    items = [MemoryItem("p1", "Marie Curie won the Nobel Prize in physics and chemistry in Paris."),
             MemoryItem("p2", "The Eiffel Tower stands in Paris and Marie Curie lived in Paris."),
             MemoryItem("p3", "Bananas are yellow fruits that grow in tropical places.")]
    m.reset()
    m.ingest(items)
    kinds = [e["kind"] for e in m.bank]
    assert kinds.count("paragraph") == 3 and "entity" in kinds
    keys = {e.get("key") for e in m.bank if e["kind"] == "entity"}
    assert {"Marie Curie", "Paris"} <= keys
    expected = sum(e["memory"].numel() * 2 + len(e.get("key", "").encode()) for e in m.bank)
    assert m.state_bytes() == expected + m.memory.numel() * 4
    context, ids = m.retrieve("Where did Marie Curie live?")
    assert isinstance(context, str) and ids and set(ids) <= {"p1", "p2", "p3"}
    assert {"p1", "p2"} <= set(ids)  # the entity memory of Marie Curie points at both of her passages
    flat = make(tiny_lm, name="r3mem_no_hier", recon_max_tokens=5)
    flat.reset()
    flat.ingest(items)
    assert flat.bank == [] and flat.state_bytes() == flat.memory.numel() * 4
    assert isinstance(flat.retrieve("Where?")[0], str)


def test_ragged_rows_compress_as_if_alone(tiny_lm):
    """compress(lengths=...): each right-padded row's memory and hidden states equal those of its text compressed
    alone, whatever the padding holds."""
    m = trainee(tiny_lm)
    m.train(False)
    lengths = [16, 9, 13, 9, 3]
    rows = torch.randint(100, 5000, (len(lengths), 16), generator=torch.Generator().manual_seed(3))
    junk = rows.clone()
    for b, n in enumerate(lengths):
        junk[b, n:] = (junk[b, n:] * 7 + 11) % 5000 + 100  # other padding: must change nothing
    with torch.no_grad():
        hidden, memory = m.compress(rows, m.empty_memory(batch=len(lengths)), lengths=lengths)
        _, memory_junk = m.compress(junk, m.empty_memory(batch=len(lengths)), lengths=lengths)
        for b, n in enumerate(lengths):
            h1, m1 = m.compress(rows[b:b + 1, :n], m.empty_memory())
            assert torch.allclose(memory[:, :, b], m1[:, :, 0], atol=1e-5)
            assert torch.allclose(hidden[b, :n], h1[0], atol=1e-5)
            assert torch.all(hidden[b, n:] == 0)
        assert torch.allclose(memory, memory_junk, atol=1e-6)


def test_batched_ingest_equals_one_item_at_a_time(tiny_lm):
    """Paragraph and entity memories compressed ``ingest_batch`` at a time equal those compressed one by one
    (float16 storage), with the same bank order and token count; items longer than a segment included."""
    words = "Marie Curie lived in Paris and Warsaw with Pierre near the river and the old tower".split()
    items = [MemoryItem(f"p{i}", " ".join(words[: 3 + (5 * i) % 13]) + f" Marie Curie item {i}.") for i in range(9)]
    items.append(MemoryItem("long", " ".join(words * 3)))  # several 16-token chunks
    banks = []
    for batch in (1, 4):
        m = make(tiny_lm)
        m.ingest_batch = batch
        m.reset()
        m.ingest(items)
        banks.append((m.bank, m.tokens_processed))
    (one, tokens_one), (four, tokens_four) = banks
    assert tokens_one == tokens_four
    assert [(e["ids"], e["kind"], e.get("key"), e["tokens"]) for e in one] == \
        [(e["ids"], e["kind"], e.get("key"), e["tokens"]) for e in four]
    assert any(e["tokens"] > 16 for e in one) and any(e["kind"] == "entity" for e in one)
    for a, b in zip(one, four):
        assert torch.allclose(a["memory"].float(), b["memory"].float(), atol=2e-3, rtol=1e-3)


def test_document_memory_reads_the_history_in_packed_segments(tiny_lm):
    """The recurrent document memory reads the items' tokens in order, a newline between items, in segments of at
    most segment_len tokens that end at item boundaries (long items split), not one pass per short turn."""
    m = make(tiny_lm, name="r3mem_no_hier")  # no hierarchy: every compress pass is the document memory's
    words = "the cat sat on the mat and looked at the old river".split()
    items = [MemoryItem(f"t{i}", " ".join(words[: 2 + i % 5])) for i in range(12)]
    items.insert(5, MemoryItem("long", " ".join(words * 4)))  # longer than a 16-token segment
    seen = []
    real = m.compress

    def recording(tokens, memory, *a, **k):
        seen.append(tokens[0].tolist())
        return real(tokens, memory, *a, **k)

    m.compress = recording
    m.reset()
    m.ingest(items)
    tok = tiny_lm.tokenizer
    sep = tok("\n", add_special_tokens=False)["input_ids"]
    ids = [tok(i.text, add_special_tokens=False)["input_ids"] for i in items]
    stream = [t for k, x in enumerate(ids) for t in (sep if k else []) + x]
    assert all(len(s) <= 16 for s in seen) and len(seen) < len(items)
    flat = [t for s in seen for t in s]
    assert [t for t in flat if t not in sep] == [t for t in stream if t not in sep]  # every token, in order
    assert len(flat) <= len(stream)  # separators only between items of one segment
    assert any(s == ids[5][:16] for s in seen)  # the long item starts a segment of its own


def test_reconstruct_returns_text_and_rouge(tiny_lm):
    m = make(tiny_lm, recon_max_tokens=6)
    _, memory = m.compress(segs(1)[0].unsqueeze(0), m.empty_memory())
    out = m.reconstruct(memory, 6)
    assert isinstance(out, str) and len(tiny_lm.tokenizer(out, add_special_tokens=False)["input_ids"]) <= 8
    assert rouge_l("a b c d", "a b c d") == 1.0 and rouge_l("a b c d", "x y") == 0.0
    assert abs(rouge_l("a b c d", "a c") - 2 * (1.0 * 0.5) / 1.5) < 1e-9


def test_variants_are_registered():
    from r3mem_bench.methods import all_methods

    methods = all_methods()
    for name in ("r3mem", "r3mem_no_hier", "r3mem_no_cycle", "r3mem_no_recon", "r3mem_reset"):
        assert methods[name].trainable
    assert methods["r3mem_reset"].families == ("lm",)


def test_ablations_each_remove_one_part_and_draw_the_same_samples(tiny_lm):
    """Matched ablations: under one seed every variant draws the same memory size and (hierarchy kept) level as
    R3Mem, and its losses differ from R3Mem's only in the part it removes."""
    out = {}
    for name in ("r3mem", "r3mem_no_cycle", "r3mem_no_recon", "r3mem_no_hier"):
        torch.manual_seed(0)
        m = get_method_class(name)(tiny_lm, {**TRAIN_OPTS, "w_cycle": 0.5})
        m.train(True)
        m.train_step = 0
        torch.manual_seed(7)
        out[name] = {k: float(v.detach()) for k, v in m.training_losses(segs(2)).items()}
    full, no_cycle, no_recon, no_hier = (out[n] for n in ("r3mem", "r3mem_no_cycle", "r3mem_no_recon", "r3mem_no_hier"))
    assert full["recon"] > 0 and full["cycle"] > 0
    assert no_cycle["recon"] == pytest.approx(full["recon"]) and no_cycle["cycle"] == 0
    assert no_recon["recon"] == 0 and no_recon["cycle"] == 0
    for ablated in (no_cycle, no_recon, no_hier):
        assert ablated["M"] == full["M"]
    level = next(k for k in full if k.startswith("level_"))
    assert no_cycle[level] == 1 and no_recon[level] == 1 and no_hier.get("level_document") == 1
    assert no_cycle["lm"] == pytest.approx(full["lm"]) and no_recon["lm"] == pytest.approx(full["lm"])
    assert no_cycle["loss"] == pytest.approx(full["loss"] - 0.5 * full["cycle"])


def test_no_hier_moves_the_hierarchy_levels_to_the_document_and_keeps_the_qa_share(tiny_lm):
    flat = get_method_class("r3mem_no_hier")(tiny_lm, {**TRAIN_OPTS, "level_probs": [0.42, 0.14, 0.14, 0.3]})
    assert flat.cfg["level_probs"] == pytest.approx([0.7, 0.0, 0.0, 0.3])
    assert get_method_class("r3mem_no_hier")(tiny_lm, dict(TRAIN_OPTS)).cfg["level_probs"] == [1.0, 0.0, 0.0]


def test_recon_warmup_stage_trains_only_the_autoencoder(tiny_lm):
    m = trainee(tiny_lm, recon_warmup_steps=2)
    m.train_step = 0
    losses = m.training_losses(segs(2))
    assert losses["level_warmup"] == 1 and float(losses["lm"]) == 0 and float(losses["kl"]) == 0
    assert float(losses["recon"]) > 0
    losses["loss"].backward()
    assert m.slots.grad.abs().sum() > 0
    m.train_step = 2  # past the warm-up: every loss again
    losses = m.training_losses(segs(2))
    assert "level_warmup" not in losses and float(losses["lm"]) > 0


def test_reader_reads_the_memory_and_counts_its_passes(tiny_lm):
    m = trainee(tiny_lm)
    m.train(False)
    first1, first2, second = segs(3)
    outs = []
    for first in (first1, first2):
        m.reset()
        m.score_segment(first)
        before = m.tokens_processed
        outs.append(m.score_segment(second))
        assert m.tokens_processed - before == (1 + 16) + (1 + 16 + 4)  # read pass, then the write pass
    assert not torch.allclose(outs[0], outs[1], atol=1e-6)


@pytest.mark.parametrize("key,old", [("reader", "compress"), ("slot_layout", "append"), ("slot_layout", None)])
def test_checkpoints_of_unimplemented_architectures_are_refused(tiny_lm, tmp_path, key, old):
    """A checkpoint trained with a reader or slot layout this code does not implement (or written before the
    option existed) is refused with one line naming the option, at load and as an --init-from stage."""
    m = trainee(tiny_lm)
    m.save_checkpoint(tmp_path / "ck")
    meta = json.loads((tmp_path / "ck" / "r3mem.json").read_text())
    if old is None:
        del meta["config"][key]
    else:
        meta["config"][key] = old
    (tmp_path / "ck" / "r3mem.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match=f"trained with {key}={old or 'unset'}"):
        get_method_class("r3mem")(tiny_lm, {"checkpoint": str(tmp_path / "ck"), "memory_tokens": 4})
    with pytest.raises(UserError, match=key):
        trainee(tiny_lm).load_checkpoint(tmp_path / "ck")
    with pytest.raises(UserError, match=f"{key}='sideways' is not implemented"):
        get_method_class("r3mem")(tiny_lm, {"untrained": True, key: "sideways"})


def test_ablations_prefer_their_own_shipped_checkpoint(tiny_lm, tmp_path, monkeypatch):
    import r3mem_bench.r3mem.model as r3mem_module

    m = trainee(tiny_lm)
    m.save_checkpoint(tmp_path / "r3mem-tiny-random", {"training": {"step": 1}})
    with torch.no_grad():
        next(iter(m.trainable_parameters().values())).add_(1.0)
    m.save_checkpoint(tmp_path / "r3mem_no_cycle-tiny-random", {"training": {"step": 2}})
    monkeypatch.setattr(r3mem_module, "SHIPPED", tmp_path)
    step = {name: get_method_class(name)(tiny_lm, {"memory_tokens": 4}).config()["checkpoint"]["step"]
            for name in ("r3mem", "r3mem_reset", "r3mem_no_cycle", "r3mem_no_hier")}
    assert step == {"r3mem": 1, "r3mem_reset": 1, "r3mem_no_cycle": 2, "r3mem_no_hier": 1}


def test_slot_order_places_each_slot_after_its_span():
    from r3mem_bench.r3mem import slot_order

    for T, M in [(16, 4), (128, 16), (10, 3), (3, 5)]:
        order, slot_index = slot_order(T, M)
        assert sorted(order.tolist()) == list(range(T + M))  # a permutation of [text, slots]
        assert order[slot_index].tolist() == [T + j for j in range(M)]  # slots in order, at slot_index
        text_before = (slot_index - torch.arange(M)).tolist()
        assert text_before == [-(-(j + 1) * T // M) for j in range(M)]
    assert slot_order(16, 4)[1].tolist() == [4, 9, 14, 19]


def test_slots_see_only_their_prefix(tiny_lm):
    m = make(tiny_lm)
    a = segs(1)[0].unsqueeze(0)  # [1, 16]
    b = a.clone()
    b[0, -1] = (b[0, -1] + 7) % 5000 + 100  # only the last token differs
    with torch.no_grad():
        mem_a = m.compress(a, m.empty_memory())[1]  # [L,2,1,H,4,D]
        mem_b = m.compress(b, m.empty_memory())[1]
    assert torch.allclose(mem_a[..., 0, :], mem_b[..., 0, :], atol=1e-6)  # slot 0 sits after tokens 0..3 only
    assert not torch.allclose(mem_a[..., -1, :], mem_b[..., -1, :], atol=1e-6)  # the last slot saw the change
    with torch.no_grad():  # the memory still reads as a memory: scores are finite and it differs from the empty one
        logits, _ = m.read(a, mem_a, write=False)
    assert torch.isfinite(logits).all()
    assert not torch.allclose(mem_a, m.empty_memory(), atol=1e-4)


def test_second_stage_with_other_slot_positions_is_refused(tiny_lm, tmp_path):
    m = trainee(tiny_lm, slot_positions="collapsed")
    m.save_checkpoint(tmp_path / "ck")
    with pytest.raises(UserError, match="slot_positions='collapsed'"):
        get_method_class("r3mem")(tiny_lm, {"checkpoint": str(tmp_path / "ck"), "slot_positions": "ordered"})
    fresh = get_method_class("r3mem")(tiny_lm, {**TRAIN_OPTS, "slot_positions": "ordered"})
    with pytest.raises(UserError, match="slot_positions"):
        fresh.load_checkpoint(tmp_path / "ck")


def test_no_repeat_ngram_rule_and_decoding():
    from r3mem_bench.r3mem import repeated_ngram_ends

    assert repeated_ngram_ends([5, 6, 7, 5, 6], 3) == [7]  # "5 6 7" exists, so 7 may not follow "5 6" again
    assert repeated_ngram_ends([5, 6, 7, 5, 6], 0) == []
    assert repeated_ngram_ends([5, 5], 1) == [5]
    assert repeated_ngram_ends([5], 3) == []


def test_greedy_reconstruction_without_repeated_ngrams(tiny_lm):
    m = make(tiny_lm, recon_no_repeat_ngram=2, recon_max_tokens=40)
    with torch.no_grad():
        ids = m.reconstruct_ids(m.compress(segs(1)[0].unsqueeze(0), m.empty_memory())[1])[0]
    bigrams = list(zip(ids, ids[1:]))
    assert len(ids) > 5 and len(bigrams) == len(set(bigrams))


@pytest.mark.parametrize("positions", ["ordered", "collapsed"])
def test_slot_keys_sit_at_their_documented_positions(tiny_lm, positions):
    """Layer 0's key of a slot depends only on its input embedding, so each stored key must equal that key
    rotated (RoPE) to the slot's documented position: 1+j for written slots (``ordered``) or 1 (``collapsed``),
    and 1+j for the empty memory's slots."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    M, T = 4, 8
    m = get_method_class("r3mem")(tiny_lm, {"untrained": True, "max_memory_tokens": M, "memory_tokens": M,
                                            "slot_positions": positions})
    layer = m.decoder.layers[0]
    heads, dim = m.shape["kv_heads"], m.shape["head_dim"]

    def expected_keys(inputs: torch.Tensor, where: list[int]) -> torch.Tensor:  # inputs [M, d] -> [H, M, D]
        with torch.no_grad():
            k = layer.self_attn.k_proj(layer.input_layernorm(inputs.unsqueeze(0)))  # [1, M, H*D]
            k = k.view(1, M, heads, dim).transpose(1, 2)  # [1, H, M, D]
            cos, sin = m.rotary(k, torch.tensor([where]))
            return apply_rotary_pos_emb(k, k, cos, sin)[1][0]

    tokens = torch.arange(100, 100 + T).view(1, T)
    with torch.no_grad():
        empty = m.empty_memory(M)
        _, written = m.compress(tokens, empty)
    slots = m.slots[:M].detach()
    assert torch.allclose(empty[0, 0, 0], expected_keys(slots, list(range(1, M + 1))), atol=1e-5)
    before = [-(-(j + 1) * T // M) - 1 for j in range(M)]  # slot j also carries the embedding of the token before it
    slots = slots + m.embed(tokens[0, before]).detach()
    where = list(range(1, M + 1)) if positions == "ordered" else [1] * M
    assert torch.allclose(written[0, 0, 0], expected_keys(slots, where), atol=1e-5)


def test_checkpoints_without_slot_positions_load_as_trained():
    from r3mem_bench.r3mem import trained_arch

    assert trained_arch({"slot_layout": "anchored"}, "slot_positions") == "collapsed"  # written before the option
    assert trained_arch({"slot_layout": "anchored", "slot_positions": "ordered"}, "slot_positions") == "ordered"


def test_memory_reader_answers_from_the_chosen_memories(tiny_lm):
    """qa_reader=memory: the answer's likelihood is read after the chosen memories' key/values (not text), and the
    cached continuation equals one uncached pass over the same sequence."""
    from r3mem_bench.generation import HFGenerator, PromptTemplate

    gen = HFGenerator(tiny_lm, max_new_tokens=3)
    torch.manual_seed(0)
    m = get_method_class("r3mem")(tiny_lm, {"untrained": True, "max_memory_tokens": 8, "memory_tokens": 4,
                                            "segment_len": 16, "top_k": 2, "qa_reader": "memory"},
                                  generator=gen, prompt=PromptTemplate())
    with torch.no_grad():  # live adapters, so the memories differ from the empty one
        for n, p in m.net.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    m._cache = {}
    items = [MemoryItem("p1", "The vault code is 4417 and only Ada knows it."),
             MemoryItem("p2", "Bananas are yellow fruits that grow in tropical places."),
             MemoryItem("p3", "The river floods every spring near the old mill.")]
    m.reset()
    m.ingest(items)
    question, texts = "What is the vault code?", ["4417", "9000 and more"]
    scored = m.answer_nll(question, texts)
    memory, ids = m._answer_memory(question)
    assert memory.shape[-2] == 8 and len(ids) == 2 and scored.retrieved_ids == ids  # two 4-slot memories fit in 8
    # the same sequence in one uncached pass: [BOS][memories][read marker][prompt][answer]
    prompt = gen.encode(m.prompt.render(question=question, context=""))
    for text, nll in zip(texts, scored.nll):
        cont = gen.continuation_ids(text)
        seq = torch.tensor([prompt + cont])
        m._use("expand")
        past = torch.cat([m._bos_kv("expand", 1), memory], dim=-2)
        embeds = torch.cat([m.embed(torch.full((1, 1), m.bos)), m.embed(seq[:, :-1])], dim=1)
        hidden, _ = m._forward(past, embeds, memory.shape[-2] + 1)
        logits = m.lm_head(hidden)[:, len(prompt):]  # hidden i predicts seq[i]: the answer starts at len(prompt)
        direct = float(torch.nn.functional.cross_entropy(logits[0], torch.tensor(cont)))
        assert abs(direct - nll) < 1e-4
    # the memories matter: with every stored memory emptied the same texts score differently
    empty = m.empty_memory()[:, :, 0].half()
    for e in m.bank:
        e["memory"] = empty.clone()
    assert max(abs(a - b) for a, b in zip(m.answer_nll(question, texts).nll, scored.nll)) > 1e-4
    # the answer reads the same positions: BOS, the memories' slots, the read marker, the prompt
    ans = m.answer(question)
    assert ans.retrieved_ids and ans.context == "" and ans.prompt_tokens == 1 + 8 + 1 + len(prompt)


def test_empty_memory_control_computes_and_reads_no_memory(tiny_lm):
    """``top_k=0:max_entities=0`` (the QA reader's empty-memory control): ingest computes only the document memory
    (no paragraph or entity memory that nothing could read), and the answer reads the empty memory."""
    from r3mem_bench.generation import HFGenerator, PromptTemplate

    gen = HFGenerator(tiny_lm, max_new_tokens=3)
    opts = {"untrained": True, "max_memory_tokens": 8, "memory_tokens": 4, "segment_len": 16, "qa_reader": "memory"}
    items = [MemoryItem("p1", "The vault code is 4417 and only Ada knows it. Ada lives in Paris."),
             MemoryItem("p2", "Ada rode to Paris on a yellow bicycle in spring.")]
    full = get_method_class("r3mem")(tiny_lm, {**opts, "top_k": 2}, generator=gen, prompt=PromptTemplate())
    control = get_method_class("r3mem")(tiny_lm, {**opts, "top_k": 0, "max_entities": 0}, generator=gen,
                                        prompt=PromptTemplate())
    full.ingest(items)
    control.ingest(items)
    assert [e["kind"] for e in full.bank].count("paragraph") == 2
    assert control.bank == [] and control.memory is not None
    assert control.tokens_processed < full.tokens_processed
    memory, ids = control._answer_memory("Where does Ada live?")
    assert ids == [] and torch.equal(memory, control.empty_memory())


def test_qa_reader_is_validated_and_default_keeps_config(tiny_lm):
    with pytest.raises(UserError, match="qa_reader"):
        make(tiny_lm, qa_reader="peek")
    assert "qa_reader" not in make(tiny_lm).config() and make(tiny_lm, qa_reader="memory").config()["qa_reader"] == "memory"


def test_ingest_is_cached_per_checkpoint_options_and_items(tiny_lm, tmp_path):
    """With the run's ingest cache, a second ingest of the same items reads the memories back: no compress pass,
    identical memories and bank, the same tokens counted; other items, options or weights are computed again."""
    from r3mem_bench.ingest_cache import IngestCache

    make(tiny_lm).save_checkpoint(tmp_path / "ckpt")
    opts = {"checkpoint": str(tmp_path / "ckpt"), "max_memory_tokens": 8, "memory_tokens": 4, "segment_len": 16}
    items = [MemoryItem("p1", "Marie Curie won the Nobel Prize in physics and chemistry in Paris."),
             MemoryItem("p2", "The Eiffel Tower stands in Paris and Marie Curie lived in Paris.")]

    def ingest(options, its, cache):
        m = get_method_class("r3mem")(tiny_lm, options)
        m.ingest_cache = cache
        calls = []
        real = m.compress
        m.compress = lambda *a, **k: calls.append(1) or real(*a, **k)
        m.reset()
        m.ingest(its)
        return m, len(calls)

    cache = IngestCache(tmp_path / "cache")
    cold, n_cold = ingest(opts, items, cache)
    warm, n_warm = ingest(opts, items, cache)
    assert n_cold > 0 and n_warm == 0 and cache.stats["hits"] >= 2
    assert torch.equal(cold.memory, warm.memory) and warm.tokens_processed == cold.tokens_processed > 0
    assert [{k: v for k, v in e.items() if k != "memory"} for e in cold.bank] == \
           [{k: v for k, v in e.items() if k != "memory"} for e in warm.bank]
    assert all(torch.equal(a["memory"], b["memory"]) for a, b in zip(cold.bank, warm.bank))
    assert ingest(opts, items[:1], cache)[1] > 0  # other items
    assert ingest({**opts, "memory_tokens": 2}, items, cache)[1] > 0  # other memory size
    for f in (tmp_path / "cache").rglob("*.safetensors"):  # a damaged entry is recomputed, never trusted
        f.write_bytes(f.read_bytes()[:-7] + b"garbage")
    assert ingest(opts, items, cache)[1] > 0


@pytest.mark.parametrize("cycle", ["argmax", "soft"])
def test_soft_cycle_trains_both_adapters_and_argmax_only_the_writer(tiny_lm, cycle):
    """The cycle loss alone: its gradient reaches the expand adapter only through the soft reconstruction."""
    m = trainee(tiny_lm, level_probs=[1.0, 0.0, 0.0], w_recon=0.0, w_cycle=1.0, train_cycle=cycle)
    m.train_step = 0
    torch.manual_seed(0)
    losses = m.training_losses(segs(2))
    assert float(losses["cycle"]) > 0
    losses["cycle"].backward()

    def grad_sum(adapter: str) -> float:
        return sum(float(p.grad.abs().sum()) for n, p in m.trainable_parameters().items()
                   if f".{adapter}." in n and p.grad is not None)

    assert grad_sum("compress") > 0
    assert (grad_sum("expand") > 0) == (cycle == "soft")


def test_reconstruction_of_every_segment_from_the_memory_that_absorbed_it(tiny_lm):
    m = trainee(tiny_lm, level_probs=[1.0, 0.0, 0.0], w_cycle=0.0, train_recon_segments="all")
    m.train_step = 0
    segments = segs(3)
    torch.manual_seed(0)
    losses = m.training_losses(segments)
    M = int(losses["M"])
    memory, nlls = m.empty_memory(M), []
    for seg in segments:  # one segment at a time, as a reader would check it
        _, memory = m.compress(seg.unsqueeze(0), memory)
        full = torch.cat([seg, torch.tensor([m.eos])]).unsqueeze(0)
        nlls.append(token_nll(m.expand_logits(memory, full), full).mean())
    assert float(losses["recon"]) == pytest.approx(float(torch.stack(nlls).mean()), rel=1e-5)
    last_only = trainee(tiny_lm, level_probs=[1.0, 0.0, 0.0], w_cycle=0.0)
    last_only.train_step = 0
    torch.manual_seed(0)
    assert float(last_only.training_losses(segments)["recon"]) == pytest.approx(float(nlls[-1]), rel=1e-5)


def test_training_choices_are_validated(tiny_lm):
    with pytest.raises(UserError, match="train_cycle"):
        make(tiny_lm, train_cycle="gumbel")
    with pytest.raises(UserError, match="train_recon_segments"):
        make(tiny_lm, train_recon_segments="first")


def test_qa_level_reads_the_answer_as_the_memory_reader_does(tiny_lm):
    """QA pairs (fourth level_probs entry): the loss is the gold answer's NLL after the passages' memories and the
    closed-book prompt exactly as ``qa_reader=memory`` reads it, and it trains both adapters and the slots."""
    from r3mem_bench.generation import HFGenerator, PromptTemplate

    m = trainee(tiny_lm, level_probs=[0.0, 0.0, 0.0, 1.0])
    pair = {"question": "what is the vault code?", "answer": "4417 exactly",
            "passages": ["the vault code is 4417 and nobody else knows it.", "bananas are yellow fruits."]}
    template = PromptTemplate()
    gen = HFGenerator(tiny_lm, system=template.system)
    m._qa_data = ([pair], template, gen)
    m.train_step = 0
    torch.manual_seed(0)
    losses = m.training_losses(segs(2))
    assert losses["level_qa"] == 1 and float(losses["lm"]) == 0 and float(losses["recon"]) == 0
    assert float(losses["loss"]) == pytest.approx(float(losses["qa"]))
    M = int(losses["M"])
    with torch.no_grad():  # the same sequence built by hand, as the memory reader's test does
        memories = []
        for j, passage in enumerate(pair["passages"]):
            ids = torch.tensor([tiny_lm.tokenizer(passage, add_special_tokens=False)["input_ids"][:16]])
            mem = m.compress(ids, m.empty_memory(M))[1]
            memories.append(torch.stack([rotate_keys(mem[:, 0], j * M, m.rotary), mem[:, 1]], dim=1))
        memory = torch.cat(memories, dim=-2)[..., : max(1, 8 // M) * M, :]
        prompt, cont = gen.encode(template.render(question=pair["question"], context="")), gen.continuation_ids(pair["answer"])
        seq = torch.tensor([prompt + cont])
        m._use("expand")
        past = torch.cat([m._bos_kv("expand", 1), memory], dim=-2)
        embeds = torch.cat([m.embed(torch.full((1, 1), m.bos)), m.embed(seq[:, :-1])], dim=1)
        hidden, _ = m._forward(past, embeds, memory.shape[-2] + 1)
        direct = torch.nn.functional.cross_entropy(m.lm_head(hidden)[0, len(prompt):], torch.tensor(cont))
    assert float(losses["qa"]) == pytest.approx(float(direct), abs=1e-5)
    losses["loss"].backward()
    for adapter in ("compress", "expand"):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in m.trainable_parameters().items()
                   if f".{adapter}." in n), adapter
    assert m.slots.grad.abs().sum() > 0
    with pytest.raises(UserError, match="level_probs"):
        make(tiny_lm, level_probs=[0.5, 0.5])
