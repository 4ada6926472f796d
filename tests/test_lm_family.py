"""LM stream protocol: segmentation and byte accounting, sweeps, user files, windowing and determinism."""

from __future__ import annotations

import json
import math

import pytest
import torch

from r3mem_bench.errors import UserError
from r3mem_bench.families import get_family
from r3mem_bench.families.lm import LMFamily, segment_document, truncate_text
from r3mem_bench.methods import get_method_class
from r3mem_bench.runner import RunConfig, run
from r3mem_bench.store import read_rows
from r3mem_bench.task import TaskRegistry

from conftest import FIXTURES

TEXT = "Caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u2014 " + "The quick brown fox jumps over the lazy dog. " * 30


def test_segments_cover_document_bytes_exactly(tiny_lm):
    segs, nbytes = segment_document(TEXT, tiny_lm.tokenizer, 16)
    ids = tiny_lm.tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert torch.cat(segs).tolist() == ids
    assert all(s.numel() == 16 for s in segs[:-1]) and 1 <= segs[-1].numel() <= 16
    assert sum(nbytes) == len(TEXT.encode("utf-8")) and all(b > 0 for b in nbytes)


def test_truncation_bytes_match_exported_text(tiny_lm):
    segs, nbytes = segment_document(TEXT, tiny_lm.tokenizer, 16, max_tokens=50)
    assert sum(s.numel() for s in segs) == 50
    cut = truncate_text(TEXT, tiny_lm.tokenizer, 50)
    assert sum(nbytes) == len(cut.encode("utf-8"))
    assert truncate_text(TEXT, tiny_lm.tokenizer, 0) == TEXT


def test_doc_metrics_and_aggregate_are_consistent():
    rows = [{"segment_nll_sum": [20.0, 10.0], "segment_tokens": [10, 10], "segment_bytes": [40, 40],
             "tokens_processed": 21, "state_bytes_peak": 8, "seconds_per_segment": 0.5},
            {"segment_nll_sum": [5.0], "segment_tokens": [5], "segment_bytes": [20],
             "tokens_processed": 6, "state_bytes_peak": 16, "seconds_per_segment": 1.5}]
    agg = LMFamily().aggregate(rows, {"warmup_segments": 0})
    assert agg["ppl"] == pytest.approx(math.exp(35 / 25))
    assert agg["bits_per_byte"] == pytest.approx(35 / math.log(2) / 100)
    assert agg["ppl_after_first"] == pytest.approx(math.exp(1.0))
    assert agg["tokens_scored"] == 25 and agg["tokens_processed"] == 27 and agg["state_bytes"] == 16
    assert agg["seconds_per_segment"] == pytest.approx(1.0)
    warm = LMFamily().aggregate(rows, {"warmup_segments": 1})
    assert warm["tokens_scored"] == 10 and warm["ppl"] == pytest.approx(math.e)
    assert LMFamily.position_curve(rows) == pytest.approx([25 / 15, 1.0])


def _run(tmp_path, name="out", **kw):
    cfg = RunConfig(tasks=kw.pop("tasks", ["wikitext2"]), methods=kw.pop("methods", ["full_context", "no_memory"]),
                    model="tiny-random", output=str(tmp_path / name), quiet=True, **kw)
    return run(cfg)


def test_user_txt_is_one_document_with_cli_flags(cli, tmp_path):
    res = cli("run", "--task", "lm", "--data", str(FIXTURES / "lm" / "user_doc.txt"), "--model", "tiny-random",
              "--method", "full_context", "--segment-len", "32", "--max-tokens", "100", "--output", str(tmp_path), "-q")
    assert res.returncode == 0, res.stderr
    (row,) = read_rows(tmp_path / "wikitext2" / "full_context" / "results.jsonl")
    assert row["id"] == "user_doc" and row["segment_tokens"] == [32, 32, 32, 4] and row["n_segments"] == 4


def test_user_jsonl_is_one_document_per_line(tmp_path):
    dirs = _run(tmp_path, data=str(FIXTURES / "lm" / "user_docs.jsonl"), tasks=["pydoc_heldout"],
                overrides={"segment_len": 64}, methods=["no_memory"])
    rows = read_rows(dirs[0] / "results.jsonl")
    assert [r["id"] for r in rows] == ["a", "user_docs/00002"]
    assert all(max(r["segment_tokens"]) <= 64 for r in rows)


def test_bad_user_files_are_user_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "x"}\n')
    with pytest.raises(UserError, match="no string field 'text'"):
        _run(tmp_path, data=str(bad))
    with pytest.raises(UserError, match="segment-len"):
        _run(tmp_path, overrides={"segment_len": 0})


def test_sweep_gives_one_row_set_per_setting(tmp_path):
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "mini_sweep.yaml").write_text(
        "task: mini_sweep\nfamily: lm\ndataset: {loader: bundled_text, name: wikitext2_test}\n"
        "params: {max_documents: 1}\nsweep: {segment_len: [32, 64], max_tokens: [64, 128], memory_budget: [0, 16]}\n")
    dirs = _run(tmp_path, tasks=["mini_sweep"], include_paths=[str(tmp_path / "tasks")], methods=["no_memory"])
    assert len(dirs) == 8
    for d in dirs:
        manifest = json.loads((d / "manifest.json").read_text())
        p = manifest["config"]["task"]["params"]
        (row,) = read_rows(d / "results.jsonl")
        assert sum(row["segment_tokens"]) == p["max_tokens"]
        assert max(row["segment_tokens"]) == p["segment_len"]
        assert manifest["config"]["method"].get("memory_budget", 0) == p["memory_budget"]


def test_wikitext2_sweep_yaml_expands():
    tasks = TaskRegistry().resolve("wikitext2_sweep")
    assert sorted(t.name for t in tasks) == [f"wikitext2_sweep@max_tokens={m},segment_len={s}"
                                             for m in (2048, 8191) for s in (256, 512)]
    assert all(t.params["min_tokens"] == 8191 for t in tasks)


def test_two_runs_give_identical_metrics(tmp_path):
    kw = dict(overrides={"max_tokens": 96, "segment_len": 32}, limit=2)
    a, b = _run(tmp_path, "a", **kw), _run(tmp_path, "b", **kw)
    for da, db in zip(a, b):
        ra, rb = read_rows(da / "results.jsonl"), read_rows(db / "results.jsonl")
        for x, y in zip(ra, rb):
            assert x["metrics"] == y["metrics"] and x["segment_nll_sum"] == y["segment_nll_sum"]
            assert x["tokens_processed"] == y["tokens_processed"] and x["state_bytes_series"] == y["state_bytes_series"]


def test_full_context_single_pass_and_windows(tiny_lm):
    """One forward when the document fits; with a small window, the first window's NLLs are unchanged."""
    segs, _ = segment_document(TEXT, tiny_lm.tokenizer, 16)
    full_cls = get_method_class("full_context")
    one = full_cls(tiny_lm, {})
    ref = torch.cat(one.score_stream(segs))
    n = sum(s.numel() for s in segs)
    assert one.tokens_processed == n + 1
    win = full_cls(tiny_lm, {"max_context": 64, "stride": 32})
    got = torch.cat(win.score_stream(segs))
    assert got.shape == ref.shape
    assert torch.allclose(got[:32], ref[:32], atol=1e-4)
    assert not torch.allclose(got[64:], ref[64:], atol=1e-4)  # later tokens lost their far context
    assert win.tokens_processed > n + 1


def test_full_context_and_no_memory_score_the_same_positions(tiny_lm):
    """Both methods score exactly the same token positions (the comparison is apples to apples)."""
    task = TaskRegistry().resolve("wikitext2", {"max_tokens": 80, "segment_len": 32, "max_documents": 1})[0]
    fam = get_family("lm")
    docs = fam.examples(task, None, tiny_lm.tokenizer)
    rows = {}
    for name in ("full_context", "no_memory"):
        out: list[dict] = []
        fam.evaluate(task, get_method_class(name)(tiny_lm, {}), docs, out.append)
        rows[name] = out[0]
    for key in ("segment_tokens", "segment_bytes", "n_segments"):
        assert rows["full_context"][key] == rows["no_memory"][key]
    # the first segment has the same context (prefix token only) under both methods
    assert rows["full_context"]["segment_nll_sum"][0] == pytest.approx(rows["no_memory"]["segment_nll_sum"][0], rel=1e-5)


class _OffsetNLL:
    """A stand-in method whose NLL of the token at in-segment offset i is 1 + i / 100 (and 9 in segment 0)."""

    name = "offset_nll"
    tokens_processed = 0

    def __init__(self, lm):
        self.lm = lm

    def begin(self, key):
        pass

    def reset(self):
        pass

    def score_stream(self, segments):
        return [torch.full((len(s),), 9.0) if k == 0 else 1 + torch.arange(len(s), dtype=torch.float64) / 100
                for k, s in enumerate(segments)]

    def state_bytes(self):
        return 0


def test_ppl_beyond_w_scores_only_offsets_at_least_w_after_the_first_segment(tiny_lm):
    (task,) = TaskRegistry().resolve("wikitext2", {"segment_len": 80, "max_tokens": 240})
    fam = get_family("lm")
    docs = fam.examples(task, None, tiny_lm.tokenizer)[:2]
    rows = []
    fam.evaluate(task, _OffsetNLL(tiny_lm), docs, rows.append)
    agg = fam.aggregate(rows, task.params)
    # segments 1 and 2 of each document (80 tokens each): offsets 16..79 -> mean NLL 1 + (16 + 79) / 2 / 100
    assert agg["ppl_beyond_16"] == pytest.approx(math.exp(1 + 47.5 / 100))
    assert agg["ppl_beyond_64"] == pytest.approx(math.exp(1 + 71.5 / 100))
    assert agg["ppl_after_first"] == pytest.approx(math.exp(1 + 39.5 / 100))
    from r3mem_bench import stats

    doc = stats.lm_units(rows, "ppl_beyond_16")
    assert doc.value() == pytest.approx(agg["ppl_beyond_16"]) and list(doc.den) == [128, 128]
    seg = stats.lm_units(rows, "ppl_beyond_64", unit="segment")
    assert seg.value() == pytest.approx(agg["ppl_beyond_64"]) and len(seg.ids) == 4
    old = [{k: v for k, v in r.items() if not k.startswith("segment_tail")} for r in rows]  # rows from before
    assert "ppl_beyond_16" not in fam.aggregate(old, task.params) and stats.lm_units(old, "ppl_beyond_16").ids == []
