"""Ingest cache (r3mem_bench.ingest_cache) and MemoryBank's cached, batched summaries with ingest progress."""

from __future__ import annotations

import json

import pytest
import torch
from fixtures.baselines.helpers import dialogue_fixture, qa_parts, run_qa

from r3mem_bench.baselines.memorybank import SUMMARY_CACHE, SUMMARY_SYSTEM
from r3mem_bench.errors import UserError
from r3mem_bench.generation import HFGenerator
from r3mem_bench.ingest_cache import IngestCache, IngestProgress, model_id
from r3mem_bench.method import MemoryItem
from r3mem_bench.methods import get_method_class


# ---- the cache on its own -----------------------------------------------------------------------------------------
def test_get_or_compute_computes_once_and_reuses(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"text": "été 中文", "n": [1, 2]}

    parts = {"model": "m", "options": {"a": 1}, "digest": "abc"}
    first = IngestCache(tmp_path).get_or_compute("kind", parts, compute)
    again = IngestCache(tmp_path)  # a new process: only the files
    assert again.get_or_compute("kind", dict(reversed(list(parts.items()))), compute) == first  # key order: same
    assert len(calls) == 1 and again.stats == {"hits": 1, "misses": 0, "invalid": 0, "writes": 0}
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]  # no temporary file left behind


def test_different_parts_or_kind_give_different_keys(tmp_path):
    base = {"model": "m", "options": {"summary_tokens": 64}}
    keys = {IngestCache.key("a", base), IngestCache.key("a", {**base, "options": {"summary_tokens": 32}}),
            IngestCache.key("a", {**base, "model": "m2"}), IngestCache.key("b", base)}
    assert len(keys) == 4
    cache = IngestCache(tmp_path)
    cache.put("a", base, [1])
    assert cache.get("a", {**base, "options": {"summary_tokens": 32}}) is None and cache.get("b", base) is None
    with pytest.raises(TypeError, match="not JSON-able"):
        IngestCache.key("a", {"x": object()})
    with pytest.raises(ValueError):
        IngestCache.key("../x", base)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "payload", "parts", "key_swap"])
def test_damaged_json_entry_is_recomputed_not_trusted(tmp_path, damage):
    cache = IngestCache(tmp_path)
    parts, other = {"doc": 1}, {"doc": 2}
    cache.put("k", parts, {"v": "right"})
    cache.put("k", other, {"v": "other"})
    path = next(p for p in tmp_path.rglob("*.json") if json.loads(p.read_text())["parts"] == parts)
    text = path.read_text()
    if damage == "truncate":
        path.write_text(text[: len(text) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x00\xff not json")
    elif damage == "payload":  # parses, header right, payload edited: the checksum catches it
        path.write_text(text.replace('"right"', '"wrong"'))
    elif damage == "parts":
        path.write_text(text.replace('"doc":1', '"doc":3'))
    else:  # another entry's file under this key's name
        other_path = next(p for p in tmp_path.rglob("*.json") if p != path)
        path.write_text(other_path.read_text())
    fresh = IngestCache(tmp_path)
    assert fresh.get_or_compute("k", parts, lambda: {"v": "recomputed"}) == {"v": "recomputed"}
    assert fresh.stats["invalid"] == 1 and fresh.stats["writes"] == 1
    assert IngestCache(tmp_path).get("k", parts) == {"v": "recomputed"}  # rewritten whole


def test_tensor_payloads_round_trip_and_corruption_is_caught(tmp_path):
    cache = IngestCache(tmp_path)
    state = {"mem": torch.arange(12, dtype=torch.float32).reshape(3, 4), "ids": torch.tensor([1, 2, 3])}
    cache.put("r3mem-state", {"conv": "c"}, state)
    cache.put("r3mem-one", {"conv": "c"}, torch.ones(2, 2))
    got = IngestCache(tmp_path).get("r3mem-state", {"conv": "c"})
    assert set(got) == {"mem", "ids"} and all(torch.equal(got[k], state[k]) for k in state)
    assert torch.equal(IngestCache(tmp_path).get("r3mem-one", {"conv": "c"}), torch.ones(2, 2))
    path = next(tmp_path.joinpath("r3mem-state").rglob("*.safetensors"))
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # flip a bit of the last tensor's data
    path.write_bytes(bytes(data))
    fresh = IngestCache(tmp_path)
    assert fresh.get("r3mem-state", {"conv": "c"}) is None and fresh.stats["invalid"] == 1


def test_unwritable_cache_warns_once_and_goes_on(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    said = []
    cache = IngestCache(blocker / "cache", log=said.append)  # a path below a file cannot be created
    assert cache.get_or_compute("k", {"a": 1}, lambda: [1]) == [1]
    assert cache.get_or_compute("k", {"a": 2}, lambda: [2]) == [2]
    assert len(said) == 1 and "going on without caching" in said[0]


def test_progress_lines_are_throttled_and_end_with_the_total():
    lines, now = [], [0.0]
    p = IngestProgress("mb ingest c", 6, "summaries", lines.append, every_s=5.0, clock=lambda: now[0])
    for t, n in ((1.0, 1), (2.0, 1), (7.0, 2), (8.0, 2)):
        now[0] = t
        p.update(n, tokens=100, cached=1 if t == 2.0 else 0)
    assert lines[0].startswith("mb ingest c: [1/6] summaries") and "100 tok/s" in lines[0]
    assert [line.split(":")[1].split("]")[0] for line in lines] == [" [1/6", " [4/6", " [6/6"]
    assert "1 from cache" in lines[-1] and "50 tok/s" in lines[-1]


def test_model_id_names_the_weights(tiny_lm):
    ident = model_id(tiny_lm)
    assert ident == model_id(tiny_lm) and len(ident["weights"]) == 64 and ident["model"] == "tiny-random"


# ---- MemoryBank's summaries through the cache -------------------------------------------------------------------
@pytest.fixture
def summary_calls(monkeypatch):
    """Batches the summariser sends to the model (HFGenerator.generate with the summary system prompt)."""
    calls: list[list[str]] = []
    real = HFGenerator.generate

    def counting(self, prompts):
        if self.system == SUMMARY_SYSTEM:
            calls.append(list(prompts))
        return real(self, prompts)

    monkeypatch.setattr(HFGenerator, "generate", counting)
    return calls


def bank_method(lm, cache=None, name="memorybank", **opts):
    m = get_method_class(name)(lm, {"summary_tokens": 2, **opts}, **qa_parts(lm))
    m.ingest_cache = cache
    return m


def summaries_of(m) -> dict:
    return {"days": m.bank["days"], "history": m.bank["overall_history"], "portrait": m.bank["overall_personality"]}


def test_cache_hit_skips_generation_and_rows_are_unchanged(tiny_lm, tmp_path, summary_calls):
    items, questions = dialogue_fixture()
    cold = bank_method(tiny_lm, IngestCache(tmp_path))
    cold_rows = run_qa(cold, items, questions[:1])
    assert len(summary_calls) == 3 * 2 + 2  # 3 days x (events, personality) + history + portrait, one at a time
    summary_calls.clear()
    warm = bank_method(tiny_lm, IngestCache(tmp_path))  # a rerun: only the cache files are shared
    warm_rows = run_qa(warm, items, questions[:1])
    assert summary_calls == [] and warm.ingest_cache.stats["hits"] == 8
    assert summaries_of(warm) == summaries_of(cold)
    assert warm_rows[0]["ingest_tokens"] == cold_rows[0]["ingest_tokens"]  # cached summaries count what they cost
    assert warm_rows[0]["state_bytes"] == cold_rows[0]["state_bytes"]
    assert warm.summary_stats["cached"] == 8 and warm.summary_stats["generated"] == 0


def test_options_that_shape_summaries_change_the_key(tiny_lm, tmp_path, summary_calls):
    items, _ = dialogue_fixture()
    bank_method(tiny_lm, IngestCache(tmp_path)).ingest(items)
    summary_calls.clear()
    bank_method(tiny_lm, IngestCache(tmp_path), forgetting="none", top_k=2).ingest(items)  # retrieval only: reused
    assert summary_calls == []
    bank_method(tiny_lm, IngestCache(tmp_path), summary_tokens=1).ingest(items)
    assert len(summary_calls) == 8
    summary_calls.clear()
    bank_method(tiny_lm, IngestCache(tmp_path), summary_prompt_tokens=512).ingest(items)
    assert len(summary_calls) == 8


def test_corrupted_summary_entry_is_recomputed_alone(tiny_lm, tmp_path, summary_calls):
    items, _ = dialogue_fixture()
    first = bank_method(tiny_lm, IngestCache(tmp_path))
    first.ingest(items)
    files = sorted((tmp_path / SUMMARY_CACHE).rglob("*.json"))
    assert len(files) == 8
    files[0].write_text(files[0].read_text()[:40])  # torn
    doc = json.loads(files[1].read_text())
    doc["payload"]["summaries"] = "not a list"  # well-formed JSON of the wrong shape, checksum recomputed
    from r3mem_bench.ingest_cache import digest

    doc["payload_sha256"] = digest(doc["payload"])
    files[1].write_text(json.dumps(doc))
    summary_calls.clear()
    again = bank_method(tiny_lm, IngestCache(tmp_path))
    again.ingest(items)
    assert len(summary_calls) == 2 and again.ingest_cache.stats["invalid"] == 2
    assert summaries_of(again) == summaries_of(first)


def test_kill_during_ingest_resumes_from_the_finished_batches(tiny_lm, tmp_path, summary_calls, monkeypatch):
    items, _ = dialogue_fixture()
    real = HFGenerator.generate

    def dies_on_the_fourth(self, prompts):
        if self.system == SUMMARY_SYSTEM and len(summary_calls) == 3:
            raise KeyboardInterrupt  # the process is stopped while it writes the 4th summary
        return real(self, prompts)

    monkeypatch.setattr(HFGenerator, "generate", dies_on_the_fourth)
    with pytest.raises(KeyboardInterrupt):
        bank_method(tiny_lm, IngestCache(tmp_path)).ingest(items)
    monkeypatch.setattr(HFGenerator, "generate", real)
    resumed = bank_method(tiny_lm, IngestCache(tmp_path))
    resumed.ingest(items)
    assert resumed.summary_stats == {"generated": 5, "cached": 3, "seconds": resumed.summary_stats["seconds"]}
    fresh = bank_method(tiny_lm)
    fresh.ingest(items)
    assert summaries_of(resumed) == summaries_of(fresh)


def test_batched_summaries_equal_unbatched_ones(tiny_lm, tmp_path, summary_calls):
    items, _ = dialogue_fixture()
    one = bank_method(tiny_lm, summary_tokens=6)
    one.ingest(items)
    summary_calls.clear()
    four = bank_method(tiny_lm, IngestCache(tmp_path), summary_tokens=6, summary_batch_size=4)
    four.ingest(items)
    assert [len(c) for c in summary_calls] == [4, 2, 2]  # 6 day prompts in fixed order, then the overall two
    assert summaries_of(four) == summaries_of(one) and four.tokens_processed == one.tokens_processed
    summary_calls.clear()
    bank_method(tiny_lm, IngestCache(tmp_path), summary_tokens=6, summary_batch_size=4).ingest(items)
    assert summary_calls == []  # the batches are cached as they were generated


def test_hf_generator_left_padding_gives_unbatched_greedy_outputs(tiny_lm):
    prompts = ["Summarise: the cat sat.", "Summarise: " + "a long day at the office with many meetings " * 6,
               "Hi", "Tell me about the river and the mill in winter, when the wheel freezes."]
    one = HFGenerator(tiny_lm, max_new_tokens=10, batch_size=1).generate(prompts)
    four = HFGenerator(tiny_lm, max_new_tokens=10, batch_size=4).generate(prompts)
    assert [(g.text, g.prompt_tokens, g.new_tokens) for g in four] == [(g.text, g.prompt_tokens, g.new_tokens)
                                                                       for g in one]


def test_ingest_progress_is_logged(tiny_lm, tmp_path):
    items, _ = dialogue_fixture()
    lines: list[str] = []
    m = bank_method(tiny_lm, IngestCache(tmp_path), summary_batch_size=2)
    m.ingest_log = lines.append
    m.begin("conv")
    m.ingest(items)
    assert lines[0].startswith("memorybank ingest conv: [2/8] summaries (1/3 days)")
    assert lines[-1].startswith("memorybank ingest conv: [8/8] summaries (3/3 days)") and "tok/s" in lines[-1]
    lines.clear()
    warm = bank_method(tiny_lm, IngestCache(tmp_path), summary_batch_size=2)
    warm.ingest_log = lines.append
    warm.ingest(items)
    assert lines[-1].startswith("memorybank ingest corpus: [8/8]") and "8 from cache" in lines[-1]


@pytest.mark.parametrize("bad", [0, -2, "x", 1.5])
def test_bad_summary_batch_size(tiny_lm, bad):
    items, _ = dialogue_fixture()
    with pytest.raises(UserError, match="summary_batch_size"):
        bank_method(tiny_lm, summary_batch_size=bad).ingest(items)


# ---- the runner: one cache per run directory, reused on rerun, resume, more questions and more methods ----------
def test_runner_reuses_the_cache_across_reruns_limits_and_methods(tmp_path, summary_calls, capsys):
    from r3mem_bench.runner import RunConfig, run

    def cfg(limit, methods, quiet=True):
        return RunConfig(tasks=["persona"], methods=methods, model="tiny-random", limit=limit, output=str(tmp_path),
                         overrides={"conversations": 1, "max_new_tokens": 2,
                                    "likelihood": False},
                         method_options={"summary_tokens": 3, "time_unit_days": 30}, threads=1, quiet=quiet)

    run(cfg(1, ["memorybank"], quiet=False))
    assert len(summary_calls) == 4 * 2 + 2  # 4 sessions on 4 days (the estimate's probe is not a summary)
    err = capsys.readouterr().err
    assert "persona · memorybank: ingest of 1 corpus" in err and "10 summaries in 10 batches of <= 1" in err
    assert "memorybank ingest persona-s0-000: [10/10] summaries (4/4 days)" in err
    entries = list((tmp_path / ".cache" / "ingest" / SUMMARY_CACHE).rglob("*.json"))
    assert len(entries) == 10
    summary_calls.clear()
    run(cfg(3, ["memorybank", "memorybank_noforget"]))  # more questions (a resumed cell) and another method
    assert summary_calls == []
    rows = [json.loads(x) for x in (tmp_path / "persona" / "memorybank" / "results.jsonl").read_text().splitlines()]
    other = [json.loads(x) for x in
             (tmp_path / "persona" / "memorybank_noforget" / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and len(other) == 3
    assert {r["ingest_tokens"] for r in rows} == {r["ingest_tokens"] for r in other}  # same summaries, same cost


# ---- ingest estimates and the --max-ingest-minutes guard ----------------------------------------------------------
def test_estimates_count_what_ingest_will_compute_and_nothing_that_is_cached(tiny_lm, tmp_path, summary_calls):
    """MemoryBank's estimate covers the summaries it will generate (none once cached), R3Mem's the compress passes;
    estimating changes neither the method's state nor its token count."""
    items, _ = dialogue_fixture()
    bank = bank_method(tiny_lm, IngestCache(tmp_path / "a"), summary_batch_size=4)
    seconds, how = bank.ingest_estimate([items])
    assert seconds > 0 and how.startswith("8 summaries in 3 batches of <= 4")  # 3 days x 2 in [4, 2], then 2 overall
    assert bank.tokens_processed == 0 and bank.bank["memories"] == []
    assert getattr(bank, "summary_stats", {}).get("generated", 0) == 0
    summary_calls.clear()
    bank.ingest(items)
    assert len(summary_calls) == 3  # the probe generated nothing through the summariser's own calls
    again = bank_method(tiny_lm, IngestCache(tmp_path / "a"), summary_batch_size=4)
    assert again.ingest_estimate([items]) == (0.0, "summaries cached")
    assert bank_method(tiny_lm, summaries="off").ingest_estimate([items]) is None
    undated = [MemoryItem(i.id, i.text) for i in items]  # a RAG corpus: no days, so no summaries to estimate
    assert bank_method(tiny_lm, IngestCache(tmp_path / "b")).ingest_estimate([undated]) is None

    r3 = get_method_class("r3mem")(tiny_lm, {"untrained": True, "max_memory_tokens": 8, "memory_tokens": 4,
                                             "segment_len": 16}, **qa_parts(tiny_lm))
    seconds, how = r3.ingest_estimate([items])
    ids = tiny_lm.tokenizer([i.text for i in items], add_special_tokens=False)["input_ids"]
    assert how.startswith(f"{sum(-(-len(x) // 16) for x in ids)} compress passes x") and seconds > 0
    assert r3.tokens_processed == 0 and r3.memory is None and r3.bank == []


def _persona_run(out, *extra):
    from conftest import run_cli

    return run_cli("run", "--task", "persona", "--method", "memorybank", "--limit", "2", "--param", "generate=false",
                   "--method-arg", "summary_tokens=2", "--model", "tiny-random", "--threads", "1",
                   "--output", str(out), *extra)


def test_run_prints_the_estimate_and_refuses_a_cell_over_the_budget(tmp_path):
    over = _persona_run(tmp_path / "over", "--quiet", "--max-ingest-minutes", "0.00001")
    assert over.returncode == 2
    lines = [line for line in over.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "persona · memorybank: ingest estimated at" in lines[0]
    assert "--max-ingest-minutes" in lines[0] and "fix:" in lines[0] and "Traceback" not in over.stderr
    assert not list((tmp_path / "over").rglob("results.jsonl"))  # refused before anything ran
    ok = _persona_run(tmp_path / "ok", "--max-ingest-minutes", "600")
    assert ok.returncode == 0, ok.stderr
    assert "persona · memorybank: ingest of 1 corpus" in ok.stderr and "estimated at" in ok.stderr
    quiet = _persona_run(tmp_path / "quiet", "--quiet")  # no estimate at all: the rows must not depend on it
    rows = [[json.loads(x)["metrics"] for x in p.read_text().splitlines()]
            for p in (next((tmp_path / d).rglob("memorybank/results.jsonl")) for d in ("ok", "quiet"))]
    assert quiet.returncode == 0 and rows[0] == rows[1] and len(rows[0]) == 2
