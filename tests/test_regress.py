"""``r3mem-bench regress``: a reference written by the command holds on a rerun, a genuinely degraded model fails
with exit 1 naming the metric, and a changed model or data set is refused (exit 2). Tiny suites on tiny-random."""

from __future__ import annotations

import json
from pathlib import Path
import xml.etree.ElementTree as ET

import pytest
from conftest import invoke_cli

from r3mem_bench import models

SUITE = """
suite: tinyreg
model: {model}
limit: 2
threads: 1
include_paths: [tasks]
tasks:
  - {{task: {task}, params: {{segment_len: 32, max_tokens: 96}}}}
methods: [no_memory, full_context]
"""

TASK = """
task: local_text
family: lm
description: a local text file
dataset: {loader: text_file, path: PATH}
"""


@pytest.fixture
def workdir(tmp_path, tiny_lm):
    """A local copy of tiny-random, a local text task, and a suite over them."""
    model_dir = tmp_path / "model"
    tiny_lm.model.save_pretrained(model_dir)
    tiny_lm.tokenizer.save_pretrained(model_dir)
    (tmp_path / "tasks").mkdir()
    text = tmp_path / "doc.jsonl"
    words = "the cat sat on the mat and looked at the dog who was sleeping near the door of the old house".split()
    text.write_text("\n".join(json.dumps({"id": f"d{i}", "text": " ".join(words[i:] + words[:i]) * 4})
                              for i in range(2)) + "\n")
    (tmp_path / "tasks" / "local_text.yaml").write_text(TASK.replace("PATH", str(text)))
    (tmp_path / "suite.yaml").write_text(SUITE.format(model=model_dir, task="local_text"))
    yield tmp_path
    models._CACHE.pop((str(model_dir), "cpu"), None)


def test_reference_holds_twice_and_writes_junit_and_summary(workdir, capsys, monkeypatch):
    ref = workdir / "ref.json"
    suite = str(workdir / "suite.yaml")
    code, out = invoke_cli(capsys, monkeypatch, "regress", "--suite", suite, "--reference", str(ref), "--update-reference")
    assert code == 0, out
    data = json.loads(ref.read_text())
    assert {c["method"] for c in data["cells"]} == {"no_memory", "full_context"}
    assert all(set(c["setup"]) == {"model", "data", "config"} for c in data["cells"])
    for _ in range(2):
        code, out = invoke_cli(capsys, monkeypatch, "regress", "--suite", suite, "--reference", str(ref),
                           "--junit", str(workdir / "j.xml"), "--summary", str(workdir / "s.md"))
        assert code == 0, out
        assert "all 8 checks hold" in out  # ppl, ppl_after_first, ppl_beyond_16, bits_per_byte x 2 methods
    root = ET.parse(workdir / "j.xml").getroot()
    assert root.get("tests") == "8" and root.get("failures") == "0"
    assert "All 8 checks hold" in (workdir / "s.md").read_text()


def test_degraded_model_is_a_regression(workdir, capsys, monkeypatch):
    ref = workdir / "ref.json"
    suite = str(workdir / "suite.yaml")
    assert invoke_cli(capsys, monkeypatch, "regress", "--suite", suite, "--reference", str(ref), "--update-reference")[0] == 0
    model_dir = workdir / "model"
    from safetensors.torch import load_file, save_file

    weights = load_file(model_dir / "model.safetensors")
    weights = {k: (v * 6 if "embed_tokens" in k else v) for k, v in weights.items()}  # sharper, wrong logits
    save_file(weights, model_dir / "model.safetensors", metadata={"format": "pt"})
    models._CACHE.pop((str(model_dir), "cpu"), None)
    for extra in (["--use-ci"], []):  # fixed tolerances last: its JUnit file is checked below
        code, out = invoke_cli(capsys, monkeypatch, "regress", "--suite", suite, "--reference", str(ref),
                           "--junit", str(workdir / "j.xml"), *extra)
        assert code == 1, out
        assert "regression(s)" in out and "local_text/no_memory/ppl" in out and "REGRESSION" in out
    failed = [tc.get("name") for tc in ET.parse(workdir / "j.xml").getroot().iter("testcase")
              if tc.find("failure") is not None]
    assert {"ppl", "ppl_after_first", "bits_per_byte"} <= set(failed)


def test_changed_model_or_data_is_refused(workdir, capsys, monkeypatch):
    ref = workdir / "ref.json"
    suite = workdir / "suite.yaml"
    assert invoke_cli(capsys, monkeypatch, "regress", "--suite", str(suite), "--reference", str(ref),
                  "--update-reference")[0] == 0
    other = workdir / "other.yaml"
    other.write_text(SUITE.format(model="tiny-random", task="local_text"))
    code, out = invoke_cli(capsys, monkeypatch, "regress", "--suite", str(other), "--reference", str(ref))
    assert code == 2 and "different setup" in out and "model differs" in out, out
    code, out = invoke_cli(capsys, monkeypatch, "regress", "--suite", str(other), "--reference", str(ref), "--force")
    # compared anyway: the reference's model is a saved copy of tiny-random, so the numbers match and it passes
    assert code == 0 and "warning (--force)" in out
    doc = workdir / "doc.jsonl"
    doc.write_text(doc.read_text().replace("cat", "cow"))
    code, out = invoke_cli(capsys, monkeypatch, "regress", "--suite", str(suite), "--reference", str(ref))
    assert code == 2 and "data differs" in out, out


def test_bad_reference_file_is_a_usage_error(workdir, capsys, monkeypatch):
    bad = workdir / "bad.json"
    bad.write_text("{not json")
    code, out = invoke_cli(capsys, monkeypatch, "regress", "--suite", str(workdir / "suite.yaml"), "--reference", str(bad))
    assert code == 2 and "not valid JSON" in out
    code, out = invoke_cli(capsys, monkeypatch, "regress", "--suite", str(workdir / "suite.yaml"),
                       "--reference", str(workdir / "none.json"))
    assert code == 2 and "--update-reference" in out


def test_timing_metrics_are_checked_only_when_configured():
    from r3mem_bench.regress import checked_metrics, compare

    entry = {"model": "m", "task": "t", "family": "lm", "method": "x",
             "metrics": {"ppl": {"value": 10.0, "ci": [9.0, 11.0]}, "seconds_per_segment": {"value": 1.0}}}
    assert checked_metrics(entry, None) == ["ppl"]
    assert checked_metrics(entry, ["seconds_per_segment"]) == ["seconds_per_segment"]
    slower = [{**entry, "metrics": {"ppl": {"value": 10.5}, "seconds_per_segment": {"value": 3.0}}}]
    ref = {"cells": [entry]}
    by_metric = {c.metric: c.verdict for c in compare(ref, slower, {}, None, False)}
    assert by_metric == {"ppl": "REGRESSION"}  # 5% worse, default tolerance 0.2%
    assert {c.metric: c.verdict for c in compare(ref, slower, {}, None, True)} == {"ppl": "ok"}  # inside the CI
    assert {c.metric: c.verdict for c in compare(ref, slower, {"ppl": {"rel": 0.1}}, None, False)} == {"ppl": "ok"}
    timed = compare(ref, slower, {"seconds_per_segment": {"rel": 0.5}}, ["seconds_per_segment"], False)
    assert [(c.metric, c.verdict) for c in timed] == [("seconds_per_segment", "REGRESSION")]


def test_output_is_rerun_fresh_unless_resumed(workdir, capsys, monkeypatch):
    ref, out = workdir / "ref.json", workdir / "out"
    suite = str(workdir / "suite.yaml")
    assert invoke_cli(capsys, monkeypatch, "regress", "--suite", suite, "--reference", str(ref), "--update-reference")[0] == 0
    code, text = invoke_cli(capsys, monkeypatch, "regress", "--suite", suite, "--reference", str(ref), "--output", str(out))
    assert code == 0 and "2 to run" in text
    code, text = invoke_cli(capsys, monkeypatch, "regress", "--suite", suite, "--reference", str(ref), "--output", str(out))
    assert code == 0 and "cleared the earlier run" in text and "2 to run" in text
    code, text = invoke_cli(capsys, monkeypatch, "regress", "--suite", suite, "--reference", str(ref), "--output", str(out),
                        "--resume")
    assert code == 0 and "0 to run" in text
    (workdir / "other").mkdir()
    (workdir / "other" / "precious.txt").write_text("keep")
    code, text = invoke_cli(capsys, monkeypatch, "regress", "--suite", suite, "--reference", str(ref),
                        "--output", str(workdir / "other"))
    assert code == 2 and "not a suite run" in text and (workdir / "other" / "precious.txt").exists()


def test_a_broken_memory_is_caught(workdir, capsys, monkeypatch):
    """R3Mem's written memory replaced by the empty memory: regress exits 1 and names an R3Mem metric."""
    from r3mem_bench.r3mem import R3Mem

    suite = workdir / "suite.yaml"
    suite.write_text(SUITE.format(model=workdir / "model", task="local_text").replace(
        "methods: [no_memory, full_context]",
        "methods: [no_memory, {method: r3mem, args: {untrained: true, max_memory_tokens: 8, memory_tokens: 8}}]"))
    ref = workdir / "ref.json"
    assert invoke_cli(capsys, monkeypatch, "regress", "--suite", str(suite), "--reference", str(ref),
                  "--update-reference")[0] == 0
    code, out = invoke_cli(capsys, monkeypatch, "regress", "--suite", str(suite), "--reference", str(ref))
    assert code == 0, out  # the unbroken code holds
    compress = R3Mem.compress

    def forgetful(self, tokens, memory, write=True):
        hidden, new = compress(self, tokens, memory, write)
        return hidden, (None if new is None else self.empty_memory(memory.shape[-2], tokens.shape[0]))

    monkeypatch.setattr(R3Mem, "compress", forgetful)
    code, out = invoke_cli(capsys, monkeypatch, "regress", "--suite", str(suite), "--reference", str(ref))
    assert code == 1, out
    verdict = next(line for line in out.splitlines() if "regression(s):" in line)
    named = verdict.split("regression(s):")[1].replace(",", " ").split()
    assert "local_text/r3mem/ppl_after_first" in named, out
    assert all(name.startswith("local_text/r3mem/") for name in named), out  # no_memory is untouched


def test_committed_reference_does_not_name_the_checkout_path():
    """CI checks a clean clone elsewhere: a config naming this checkout's path would never match there."""
    root = Path(__file__).resolve().parents[1]
    ref = root / "results" / "reference" / "ci.json"
    configs = json.dumps([c["config"] for c in json.loads(ref.read_text())["cells"]])
    assert str(root) not in configs and '"/' not in configs
