"""Fair-comparison controls: equal-state sliding windows (``window@NAME``), derived names with fixed options
(``NAME:key=value``), and RMT refusing to run untrained when no checkpoint exists."""

from __future__ import annotations

import pytest
import torch

from r3mem_bench.errors import UserError
from r3mem_bench.methods import get_method_class

R3 = {"untrained": True, "max_memory_tokens": 16}


def _kv_bytes_per_token(lm) -> int:
    """One token's key/value cache, from the tiny model's config written out (2 x layers x kv heads x head dim x 4)."""
    c = lm.model.config
    heads = c.num_key_value_heads
    return 2 * c.num_hidden_layers * heads * (c.hidden_size // c.num_attention_heads) * 4


@pytest.mark.parametrize("M", [1, 4, 16])
def test_window_at_r3mem_holds_exactly_r3mem_state_bytes(tiny_lm, M):
    r3 = get_method_class("r3mem")(tiny_lm, {**R3, "memory_tokens": M})
    seg = torch.arange(5, 37)
    r3.reset()
    r3.score_segment(seg)  # the memory the next segment reads
    carried = r3.state_bytes()
    assert carried == r3.lm_state_bytes() > 0
    window = get_method_class("window@r3mem")(tiny_lm, {**R3, "memory_tokens": M})
    assert window.window == M  # R3Mem's state is the KV of its M slots: exactly M tokens' worth
    assert window.window * _kv_bytes_per_token(tiny_lm) == carried
    four = get_method_class("window4x@r3mem")(tiny_lm, {**R3, "memory_tokens": M})
    assert four.window * _kv_bytes_per_token(tiny_lm) == 4 * carried
    assert window.config()["target_state_bytes"] == carried and window.config()["equal_state_of"] == "r3mem"


@pytest.mark.parametrize("M", [2, 8])
def test_window_at_rmt_is_the_largest_window_within_rmt_state(tiny_lm, M):
    rmt = get_method_class("rmt")(tiny_lm, {"untrained": True, "num_mem_tokens": M})
    rmt.reset()
    rmt.score_segment(torch.arange(5, 21))
    carried = rmt.state.numel() * rmt.state.element_size()  # the tensor handed to the next segment
    assert rmt.lm_state_bytes() == carried
    per_token = _kv_bytes_per_token(tiny_lm)
    for name, factor in (("window@rmt", 1), ("window4x@rmt", 4)):
        w = get_method_class(name)(tiny_lm, {"untrained": True, "num_mem_tokens": M})
        assert w.window * per_token <= factor * carried < (w.window + 1) * per_token


def test_reset_controls_carry_no_state(tiny_lm):
    assert get_method_class("r3mem_reset")(tiny_lm, {**R3, "memory_tokens": 4}).lm_state_bytes() == 0
    assert get_method_class("rmt_reset")(tiny_lm, {"untrained": True, "num_mem_tokens": 4}).lm_state_bytes() == 0
    assert get_method_class("window@rmt_reset")(tiny_lm, {"untrained": True, "num_mem_tokens": 4}).window == 0


def test_window_scores_like_no_memory_with_that_window(tiny_lm):
    segs = [torch.arange(10, 42), torch.arange(50, 82), torch.arange(90, 122)]
    w = get_method_class("window@r3mem")(tiny_lm, {**R3, "memory_tokens": 4})
    plain = get_method_class("no_memory")(tiny_lm, {"window": 4})
    none = get_method_class("no_memory")(tiny_lm, {})
    got, want, floor = w.score_stream(segs), plain.score_stream(segs), none.score_stream(segs)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert not torch.equal(got[1], floor[1])  # the window changes what the second segment sees


def test_fixed_option_names_win_over_run_options_and_keep_the_shipped_checkpoint(tiny_lm):
    cls = get_method_class("no_memory:window=3")
    assert cls is get_method_class("no_memory:window=3") and cls.name == "no_memory:window=3"
    m = cls(tiny_lm, {"window": 9})
    assert m.window == 3 and m.config()["name"] == "no_memory:window=3"
    r = get_method_class("rmt:num_mem_tokens=2")
    assert r.shipped_checkpoint("tiny-random") == get_method_class("rmt").shipped_checkpoint("tiny-random")
    assert get_method_class("window@r3mem:memory_tokens=2")(tiny_lm, R3).window == 2


@pytest.mark.parametrize("bad, words", [("no_memory:window", "key=value"), ("window@nosuch", "unknown method"),
                                        ("window@memorybank", "does not run LM streams"),
                                        ("nosuch:window=2", "unknown method")])
def test_bad_derived_names_are_one_line_errors(bad, words):
    with pytest.raises(UserError, match=words):
        get_method_class(bad)


def test_rmt_without_a_checkpoint_for_the_model_exits_2(cli, tmp_path):
    proc = cli("run", "--task", "wikitext2", "--method", "rmt", "--model", "tiny-random", "--limit", "1",
               "--param", "max_tokens=64", "--param", "segment_len=32", "--output", str(tmp_path))
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "no trained checkpoint for model 'tiny-random'" in lines[0]
    assert "Traceback" not in proc.stderr and not list(tmp_path.rglob("results.jsonl"))


def test_window_at_a_method_without_state_bytes_is_a_one_line_error(tiny_lm):
    with pytest.raises(UserError, match="reports no LM state bytes"):
        get_method_class("window@full_context")(tiny_lm, {})
