"""Suite configs: validation with messages naming the problem, shipped configs, resumable cells, per-method args."""

from __future__ import annotations

import json
import shutil

import pytest

from r3mem_bench.errors import UserError
from r3mem_bench.suite import cells, load_suite, parse_suite, run_suite

BASE = {"suite": "t", "model": "tiny-random", "limit": 2, "threads": 1,
        "tasks": [{"task": "wikitext2", "params": {"segment_len": 48, "max_tokens": 96}}],
        "methods": ["no_memory", {"method": "full_context", "args": {"max_context": 64}}]}


@pytest.mark.parametrize("change, needle", [
    ({"methods": ["no_memory", "memory_that_does_not_exist"]}, "unknown method 'memory_that_does_not_exist'"),
    ({"tasks": ["no_such_task"]}, "unknown task 'no_such_task'"),
    ({"colour": "red"}, "unknown field 'colour'"),
    ({"methods": ["no_memory", "no_memory"]}, "method 'no_memory' is listed twice"),
    ({"seeds": "0"}, "'seeds' must be a list of integers"),
    ({"tasks": [{"task": "wikitext2", "params": {"segment_length": 4}}]}, "unknown parameter 'segment_length'"),
    ({"methods": [{"method": "no_memory", "options": {}}]}, "unknown field 'options'"),
])
def test_bad_suites_name_the_problem(tmp_path, change, needle):
    with pytest.raises(UserError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        cells(parse_suite({**BASE, **change}, str(tmp_path / "s.yaml")), str(tmp_path))


def test_shipped_suites_parse():
    ci = load_suite("ci")
    assert ci.models == ["smollm2-135m"] and ci.regress["tolerances"]
    assert {c["family"] for c in cells(ci, "/tmp/unused")} == {"lm", "rag", "dialogue"}
    quick, paper = load_suite("quick"), load_suite("paper")
    wanted = {"no_memory", "full_context", "vector_rag", "memorybank", "memorybank_noforget", "rmt", "rmt_reset",
              "window@rmt", "icae", "icae_reset", "window@icae", "beacon", "beacon_reset", "beacon:max_beacons=16",
              "window@beacon:max_beacons=16", "r3mem", "r3mem_kv", "r3mem_reset", "window@r3mem",
              "window4x@r3mem"}
    assert {m["method"] for m in quick.methods} - {"r3mem_kv:top_k=0:max_entities=0"} == wanted
    assert wanted == {m["method"] for m in paper.methods}
    assert paper.resources.get("num_gpus") == 1 and len(paper.seeds) == 3
    qa = load_suite("qa")
    assert all(t["limit"] >= 200 and t["params"]["generate_questions"] > 0 for t in qa.tasks)
    assert {"no_memory", "r3mem", "r3mem_kv", "vector_rag"} <= {m["method"] for m in qa.methods}
    with pytest.raises(UserError, match="unknown suite 'nope'"):
        load_suite("nope")


@pytest.mark.parametrize("name", ["quick", "paper", "qa"])
def test_suites_score_at_least_200_questions_per_generated_qa_task(name, tiny_lm):
    """The offline (generated) QA tasks of the shipped suites: the questions a run scores, counted from the data."""
    from r3mem_bench.families import get_family
    from r3mem_bench.task import TaskRegistry

    suite, checked = load_suite(name), 0
    for entry in suite.tasks:
        for task in TaskRegistry().resolve(entry["task"], entry.get("params")):
            if task.spec.family == "lm" or task.spec.dataset.get("loader") not in ("needle", "persona"):
                continue
            questions = get_family(task.spec.family).examples(task)[: entry.get("limit", suite.limit)]
            assert len(questions) >= 200, (name, task.name, task.variant)
            checked += 1
    assert checked >= 2


def test_a_task_entry_can_run_a_subset_of_the_methods(tmp_path):
    raw = {**BASE, "methods": ["no_memory", "full_context", "vector_rag"],
           "tasks": [{"task": "wikitext2", "params": {"segment_len": 48, "max_tokens": 96}},
                     {"task": "needle", "methods": ["no_memory", "vector_rag"]}]}
    by_task = {}
    for c in cells(parse_suite(raw, str(tmp_path / "s.yaml")), str(tmp_path)):
        by_task.setdefault(c["task"], []).append(c["method"])
    assert by_task == {"wikitext2": ["no_memory", "full_context", "vector_rag"], "needle": ["no_memory", "vector_rag"]}
    for methods, needle in ((["rmt"], "method 'rmt' is not in the suite's methods"),
                            ([], "'methods' must be a non-empty list")):
        bad = {**raw, "tasks": [{"task": "needle", "methods": methods}]}
        with pytest.raises(UserError, match=needle):
            parse_suite(bad, str(tmp_path / "s.yaml"))


def _rows(out):
    return {p.parent.name: p.read_text() for p in out.rglob("results.jsonl")}


def test_suite_resumes_and_records_method_args(tmp_path, tiny_lm):
    suite = parse_suite(BASE, str(tmp_path / "s.yaml"))
    out = tmp_path / "out"
    first = run_suite(suite, str(out), echo=lambda m: None)
    assert first["ran"] == 2 and first["skipped"] == 0 and not first["failed"]
    rows = _rows(out)
    assert set(rows) == {"no_memory", "full_context"} and all(len(v.splitlines()) == 2 for v in rows.values())
    manifest = json.loads(next(out.rglob("full_context/manifest.json")).read_text())
    assert manifest["config"]["method"]["max_context"] == 64
    again = run_suite(suite, str(out), echo=lambda m: None)
    assert again["ran"] == 0 and again["skipped"] == 2
    for marker in (out / ".suite" / "done").glob("*no_memory*"):
        marker.unlink()  # as if the process died before the marker: the cell reruns, its examples are reused
    third = run_suite(suite, str(out), echo=lambda m: None)
    assert third["ran"] == 1 and _rows(out) == rows
    shutil.rmtree(next(out.rglob("full_context/manifest.json")).parent)  # deleted to be rerun: its marker stays
    fourth = run_suite(suite, str(out), echo=lambda m: None)
    assert fourth["ran"] == 1 and fourth["skipped"] == 1  # the deleted cell ran again (new timings), once
    assert {k: len(v.splitlines()) for k, v in _rows(out).items()} == {k: 2 for k in rows}
    rows = _rows(out)
    moved = tmp_path / "moved"
    shutil.move(str(out), str(moved))  # a moved checkout: markers name the old paths, the cells are still done
    assert run_suite(suite, str(moved), echo=lambda m: None)["ran"] == 0
    out = moved
    more = parse_suite({**BASE, "limit": 3}, str(tmp_path / "s.yaml"))  # a larger limit only adds examples
    run_suite(more, str(out), echo=lambda m: None)
    grown = _rows(out)
    assert all(grown[k].startswith(rows[k]) and len(grown[k].splitlines()) == 3 for k in rows)


def test_failed_cell_does_not_stop_the_others(tmp_path, tiny_lm):
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    raw = {**BASE, "tasks": [{"task": "wikitext2", "params": {"segment_len": 48, "max_tokens": 96},
                              "data": "bad.jsonl"}, BASE["tasks"][0]]}
    raw["tasks"][1] = {"task": "pydoc_heldout", "limit": 1, "params": {"segment_len": 48, "max_tokens": 96}}
    result = run_suite(parse_suite(raw, str(tmp_path / "s.yaml")), str(tmp_path / "out"), echo=lambda m: None)
    assert len(result["failed"]) == 2 and result["ran"] == 2
    assert "bad.jsonl" in result["failed"][0][1], result["failed"]


def test_cell_key_follows_the_shipped_weights(tmp_path, monkeypatch):
    from r3mem_bench.r3mem import R3Mem

    suite = parse_suite({**BASE, "methods": ["no_memory", "r3mem", {"method": "rmt", "checkpoint": "ckpt"}]},
                        str(tmp_path / "s.yaml"))

    def keys(weights):
        monkeypatch.setattr(R3Mem, "shipped_weights_id", classmethod(lambda cls, model: weights))
        return {c["method"]: c["key"] for c in cells(suite, str(tmp_path))}

    old, new, none = keys("aaaa"), keys("bbbb"), keys(None)
    assert old["r3mem"] != new["r3mem"] != none["r3mem"]  # retrained shipped weights: the cell runs again
    assert old["no_memory"] == new["no_memory"] and old["rmt"] == new["rmt"]  # explicit --checkpoint: key as given


def test_shipped_weights_id_hashes_the_weight_files(tmp_path, monkeypatch):
    import r3mem_bench.r3mem.model as r3mem_module

    ck = tmp_path / "r3mem-tiny"
    ck.mkdir()
    (ck / "r3mem.json").write_text("{}")
    (ck / "r3mem.safetensors").write_bytes(b"one")
    monkeypatch.setattr(r3mem_module, "SHIPPED", tmp_path)
    first = r3mem_module.R3Mem.shipped_weights_id("tiny")
    (ck / "r3mem.safetensors").write_bytes(b"two")
    assert first and r3mem_module.R3Mem.shipped_weights_id("tiny") != first
    assert r3mem_module.R3Mem.shipped_weights_id("other-model") is None


def test_suite_refuses_at_start_with_one_line_per_missing_piece(tmp_path, cli, monkeypatch):
    """Checkpoints to train (grouped by the checkpoint they need, with the command), data files, offline hub
    models: all named before any cell runs, exit 2, nothing written."""
    (tmp_path / "s.yaml").write_text(
        "suite: s\nmodels: [tiny-random, someone/not-cached-model]\nlimit: 1\n"
        "tasks:\n  - task: wikitext2\n  - {task: locomo, data: missing/locomo10.json}\n"
        "methods: [no_memory, rmt, rmt_reset, r3mem]\n")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    res = cli("suite", str(tmp_path / "s.yaml"), "--output", str(tmp_path / "out"))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    lines = [x.strip() for x in res.stderr.splitlines() if x.startswith("  ")]
    assert sum("rmt, rmt_reset on tiny-random: no trained checkpoint; fix: r3mem-bench train --method rmt "
               "--model tiny-random" in x for x in lines) == 1
    assert sum(x.startswith("r3mem on tiny-random: no trained checkpoint") for x in lines) == 1
    assert sum(x.startswith("task locomo: data file") and "missing/locomo10.json" in x for x in lines) == 1
    assert sum(x.startswith("model someone/not-cached-model: not in the local Hugging Face cache") for x in lines) == 1
    assert not (tmp_path / "out").exists()
