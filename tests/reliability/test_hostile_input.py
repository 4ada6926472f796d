"""Hostile and malformed input: task YAML, data files, checkpoints and hand-edited results.

Every case must end in a ``UserError`` (the CLI prints one line and exits 2, no traceback) or a counted skip; never
a crash without a message and never a wrong number. Most cases run in-process (fast); a few go through the real
CLI to check the exit code and the one-line message end to end.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import run_cli
from reliability_helpers import TINY, write_task

from r3mem_bench.errors import UserError

GOOD = "task: mine\nfamily: lm\ndataset: {loader: pydoc}\n"


def _registry(tmp_path: Path, text: str | bytes, name: str = "t.yaml"):
    from r3mem_bench.task import TaskRegistry

    d = tmp_path / "inc"
    d.mkdir(exist_ok=True)
    (d / name).write_bytes(text if isinstance(text, bytes) else text.encode())
    return TaskRegistry([str(d)])


# ---- task YAML ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, needle", [
    (GOOD + "paramz: {}\n", "unknown field 'paramz'"),
    (GOOD + "params: {segment_len: big}\n", "parameter 'segment_len' must be int"),
    (GOOD + "params: {segment_len: true}\n", "parameter 'segment_len' must be int"),
    (GOOD + "params: {segmentlen: 5}\n", "unknown parameter 'segmentlen'"),
    (GOOD + "params: [1, 2]\n", "field 'params' must be a dict"),
    (GOOD + "sweep: {segment_len: 64}\n", "sweep 'segment_len' must be a non-empty list"),
    (GOOD + "sweep: {segment_len: []}\n", "sweep 'segment_len' must be a non-empty list"),
    (GOOD + "tags: oops\n", "field 'tags' must be a list"),
    ("task: mine\nfamily: 5\ndataset: {loader: pydoc}\n", "field 'family' must be a string"),
    ("task: mine\nfamily: nope\ndataset: {loader: pydoc}\n", "unknown family 'nope'"),
    ("task: mine\nfamily: lm\ndataset: [pydoc]\n", "field 'dataset' must be a dict"),
    ("task: mine\nfamily: lm\ndataset: {loader: nope}\n", "dataset.loader 'nope' is unknown"),
    ("task: [a]\nfamily: lm\ndataset: {loader: pydoc}\n", "field 'task' must be a name"),
    ("task: a/b\nfamily: lm\ndataset: {loader: pydoc}\n", "field 'task' must be a name"),
    ("task: mine\nfamily: lm\n", "missing field 'dataset'"),
    ("- just\n- a list\n", "expected a mapping"),
    ("", "expected a mapping"),
    ("task: [unclosed\n", "not valid YAML"),
    ("task: !!python/object/apply:os.system ['echo pwned']\nfamily: lm\ndataset: {loader: pydoc}\n", "not valid YAML"),
    (b"task: caf\xe9\nfamily: lm\ndataset: {loader: pydoc}\n", "not valid YAML"),
])
def test_bad_task_yaml_is_a_user_error(tmp_path, text, needle):
    with pytest.raises(UserError, match=needle.replace("[", r"\[").replace("(", r"\(")):
        _registry(tmp_path, text)


def test_yaml_alias_bomb_is_cheap(tmp_path):
    """Billion-laughs aliases: the safe loader shares nodes, so parsing stays fast and the spec is refused."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    with pytest.raises(UserError, match="unknown field"):
        _registry(tmp_path, "\n".join(lines) + "\n" + GOOD)


def test_symlinked_task_file_outside_the_include_dir_is_refused(tmp_path):
    outside = tmp_path / "outside.yaml"
    outside.write_text(GOOD)
    inc = tmp_path / "inc"
    inc.mkdir()
    (inc / "link.yaml").symlink_to(outside)
    from r3mem_bench.task import TaskRegistry

    with pytest.raises(UserError, match="resolves outside"):
        TaskRegistry([str(inc)])


def test_symlinked_directory_outside_the_include_dir_is_not_followed(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "evil.yaml").write_text(GOOD.replace("mine", "evil"))
    inc = tmp_path / "inc"
    inc.mkdir()
    (inc / "sub").symlink_to(elsewhere, target_is_directory=True)
    from r3mem_bench.task import TaskRegistry

    try:
        reg = TaskRegistry([str(inc)])
    except UserError as exc:
        assert "resolves outside" in str(exc)
    else:
        assert "evil" not in reg.specs


def test_bad_yaml_through_the_cli_is_one_line_exit_2(tmp_path):
    inc = tmp_path / "inc"
    inc.mkdir()
    (inc / "bad.yaml").write_text(GOOD + "params: {max_tokens: lots}\n")
    proc = run_cli("run", "--task", "mine", "--method", "no_memory", "--include-path", str(inc), *TINY,
                   "--output", str(tmp_path / "out"))
    assert proc.returncode == 2 and "max_tokens" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


# ---- data rows ---------------------------------------------------------------------------------------------
def _lm_examples(path: Path, tmp_path: Path):
    from r3mem_bench.families import get_family
    from r3mem_bench.task import TaskRegistry

    tasks = write_task(tmp_path / "t")
    task = TaskRegistry([str(tasks)]).resolve("reltask")[0]
    return get_family("lm").examples(task, str(path))


@pytest.mark.parametrize("content, needle", [
    (b'{"text": "fine"}\n{"txt": "missing field"}\n', "line 2 has no string field 'text'"),
    (b'{"text": 5}\n', "line 1 has no string field 'text'"),
    (b'{"text": null}\n', "line 1 has no string field 'text'"),
    (b'["text"]\n', "line 1 has no string field 'text'"),
    (b'{"text": "fine"}\n{broken\n', "line 2 is not JSON"),
    (b'{"text": "caf\xe9"}\n', "not UTF-8"),
    (b'{"text": ""}\n{"text": "   "}\n', "no documents to score"),
])
def test_malformed_lm_rows(tmp_path, content, needle):
    path = tmp_path / "docs.jsonl"
    path.write_bytes(content)
    with pytest.raises(UserError, match=needle):
        _lm_examples(path, tmp_path)


def test_empty_documents_are_skipped_and_counted(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"id": "a", "text": ""}\n{"id": "b", "text": "real words here"}\n{"id": "c", "text": "\\n"}\n')
    docs = _lm_examples(path, tmp_path)
    assert [d["id"] for d in docs] == ["b"]


def test_non_utf8_plain_text_file(tmp_path):
    path = tmp_path / "doc.txt"
    path.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(UserError, match="not UTF-8"):
        _lm_examples(path, tmp_path)


def test_huge_document_runs_truncated_through_the_cli(tmp_path):
    """A 2 MB single-line document with odd characters: scored up to --max-tokens, with exact byte accounting."""
    text = ("\u00e9\u00e8 \U0001f600 z\u0301 \u4e2d " * 100_000)[:2_000_000]
    (tmp_path / "big.txt").write_text(text, encoding="utf-8")
    proc = run_cli("run", "--task", "lm", "--method", "no_memory", "--data", str(tmp_path / "big.txt"),
                   "--max-tokens", "96", "--segment-len", "32", *TINY, "--output", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    row = json.loads(next((tmp_path / "out").rglob("results.jsonl")).read_text())
    assert sum(row["segment_tokens"]) == 96 and row["n_segments"] == 3
    assert 0 < sum(row["segment_bytes"]) < len(text.encode("utf-8"))


@pytest.mark.parametrize("obj, needle", [
    ({"data": [{"title": "t"}]}, "has no 'paragraphs' list"),
    ({"data": [{"title": "t", "paragraphs": [{"context": "c", "qas": [{"question": "q?", "answers": []}]}]}]},
     "has no string 'id'"),
    ({"data": [{"title": "t", "paragraphs": [{"context": "c", "qas": [{"id": "1", "question": "q?",
                                                                     "answers": []}]}]}]}, "no non-empty answer"),
    ({"data": [{"title": "t", "paragraphs": [{"context": "", "qas": []}]}]}, "no non-empty string field 'context'"),
    ({"data": [{"title": "t", "paragraphs": [{"context": "c", "qas": [{"id": "1", "question": 7,
                                                                     "answers": [{"text": "a"}]}]}]}]},
     "no non-empty string field 'question'"),
    ({"version": "1.1"}, "not SQuAD v1.1 JSON"),
])
def test_malformed_qa_rows(tmp_path, obj, needle):
    from r3mem_bench.families import all_families, get_family
    from r3mem_bench.task import TaskRegistry

    assert "rag" in all_families(), "the rag family is missing"
    path = tmp_path / "dev.json"
    path.write_text(json.dumps(obj))
    task = TaskRegistry().resolve("squad")[0]
    with pytest.raises(UserError, match=needle):
        get_family("rag").examples(task, str(path))


# ---- checkpoints -------------------------------------------------------------------------------------------
def _method(name: str):
    from r3mem_bench.methods import all_methods

    assert name in all_methods(), f"method '{name}' is not registered"
    return all_methods()[name]


@pytest.fixture
def own_lm(tiny_lm):
    """A private copy of tiny-random: trainable methods wrap the model, the session's copy must stay clean."""
    return copy.deepcopy(tiny_lm)


def test_r3mem_checkpoint_wrong_model_shapes_and_junk(own_lm, tmp_path):
    from safetensors.torch import load_file, save_file

    cls = _method("r3mem")
    ckpt = tmp_path / "ckpt"
    cls(own_lm, {"untrained": True}).save_checkpoint(ckpt)
    cls(copy.deepcopy(own_lm), {"checkpoint": str(ckpt)})  # the pristine checkpoint loads
    meta = json.loads((ckpt / "r3mem.json").read_text())
    cases = []
    bad = copy.deepcopy(meta)
    bad["model_shape"] = {"other": 1}
    bad["model"] = "smollm2-135m"
    cases.append(("wrong model", bad, None, "trained for model"))
    tensors = load_file(str(ckpt / "r3mem.safetensors"))
    name = sorted(tensors)[0]
    wrong = dict(tensors)
    wrong[name] = wrong[name].new_zeros(*[s + 1 for s in wrong[name].shape])
    cases.append(("wrong shape", meta, wrong, "has shape"))
    cases.append(("missing tensor", meta, {k: v for k, v in tensors.items() if k != name}, "do not match"))
    for label, m, t, needle in cases:
        d = tmp_path / label.replace(" ", "_")
        shutil.copytree(ckpt, d)
        (d / "r3mem.json").write_text(json.dumps(m))
        if t is not None:
            save_file(t, str(d / "r3mem.safetensors"))
        with pytest.raises(UserError, match=needle):
            cls(copy.deepcopy(own_lm), {"checkpoint": str(d)})
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "r3mem.json").write_text("{not json")
    for d, needle in ((tmp_path / "junk", "unreadable"), (tmp_path / "none", "no r3mem.json")):
        with pytest.raises(UserError, match=needle):
            cls(copy.deepcopy(own_lm), {"checkpoint": str(d)})


def test_rmt_checkpoint_wrong_model_shapes_and_junk(own_lm, tmp_path):
    from safetensors.torch import load_file, save_file

    cls = _method("rmt")
    ckpt = tmp_path / "ckpt"
    cls(own_lm, {"untrained": True}).save_checkpoint(ckpt)
    cls(copy.deepcopy(own_lm), {"checkpoint": str(ckpt)})  # the pristine checkpoint loads
    cfg_name = "rmt_config.json"
    config = json.loads((ckpt / cfg_name).read_text())

    def variant(label: str) -> Path:
        d = tmp_path / label
        shutil.copytree(ckpt, d)
        return d

    d = variant("other_model")
    (d / cfg_name).write_text(json.dumps({**config, "base_model": "smollm2-135m"}))
    cases = [(d, "trained on 'smollm2-135m'")]
    d = variant("memory_shape")
    mem = load_file(str(d / "memory.safetensors"))["memory"]
    save_file({"memory": mem.new_zeros(mem.shape[0] + 3, *mem.shape[1:])}, str(d / "memory.safetensors"))
    cases.append((d, "memory shape"))
    d = variant("adapter_shape")
    adapter = next(d.rglob("adapter_model.safetensors"))
    tensors = load_file(str(adapter))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].new_zeros(*[s + 2 for s in tensors[name].shape])
    save_file(tensors, str(adapter))
    cases.append((d, "shape"))
    d = variant("junk_config")
    (d / cfg_name).write_text("{not json")
    cases.append((d, cfg_name))
    d = variant("no_memory_file")
    os.unlink(d / "memory.safetensors")
    cases.append((d, "memory"))
    cases.append((tmp_path / "none", "no "))
    failures = []
    for path, needle in cases:
        try:
            cls(copy.deepcopy(own_lm), {"checkpoint": str(path)})
            failures.append(f"{path.name}: accepted")
        except UserError as exc:
            if needle not in str(exc):
                failures.append(f"{path.name}: unclear message {exc}")
        except Exception as exc:  # noqa: BLE001 - the point: anything but UserError is a crash without a message
            failures.append(f"{path.name}: {type(exc).__name__}: {str(exc)[:100]}")
    assert not failures, failures


# ---- results edited by hand --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_lm):
    """A finished in-process run (full_context and no_memory, 3 documents) to copy and damage."""
    from r3mem_bench.runner import RunConfig, run

    root = tmp_path_factory.mktemp("finished")
    tasks = write_task(root / "data", docs=3)
    run(RunConfig(tasks=["reltask"], methods=["full_context", "no_memory"], model="tiny-random",
                  include_paths=[str(tasks)], output=str(root / "out"), threads=1, quiet=True))
    return root / "out"


def _damaged(finished: Path, tmp_path: Path, edit) -> Path:
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    results = out / "reltask" / "no_memory" / "results.jsonl"
    lines = results.read_bytes().splitlines(keepends=True)
    results.write_bytes(edit(lines))
    return out


def _retype(lines: list[bytes], i: int, key: str, value) -> bytes:
    row = json.loads(lines[i])
    if value is KeyError:
        del row[key]
    else:
        row[key] = value
    lines[i] = (json.dumps(row) + "\n").encode()
    return b"".join(lines)


DAMAGE = [
    ("corrupt middle line", lambda ls: ls[0] + b'{"id": "doc1", "segm\n' + ls[2], "2: corrupt result line"),
    ("duplicate id", lambda ls: b"".join(ls) + ls[1], "duplicate result for example 'doc1'"),
    ("no id", lambda ls: _retype(ls, 1, "id", 17), "no string 'id'"),
    ("not an object", lambda ls: ls[0] + b"[1, 2]\n" + ls[2], "no string 'id'"),
    ("non-UTF-8", lambda ls: ls[0] + ls[1].replace(b'"doc1"', b'"doc\xff"') + ls[2], "2: corrupt result line"),
    ("string number", lambda ls: _retype(ls, 1, "segment_nll_sum", ["12.5"]), "'segment_nll_sum' must be list[num]"),
    ("number as string", lambda ls: _retype(ls, 1, "tokens_processed", "100"), "'tokens_processed' must be count"),
    ("bool count", lambda ls: _retype(ls, 1, "segment_tokens", [True, True]), "'segment_tokens' must be list[count]"),
    ("negative count", lambda ls: _retype(ls, 1, "segment_tokens", [-5] * 4), "'segment_tokens' must be list[count]"),
    ("missing field", lambda ls: _retype(ls, 2, "segment_bytes", KeyError), "has no field 'segment_bytes'"),
    ("ragged lists", lambda ls: _retype(ls, 0, "segment_nll_sum", [1.0]), "lists of different lengths"),
]


@pytest.mark.parametrize("label, edit, needle", DAMAGE, ids=[d[0] for d in DAMAGE])
def test_hand_edited_results_give_a_clear_error(finished, tmp_path, label, edit, needle):
    from r3mem_bench.report import collect

    out = _damaged(finished, tmp_path, edit)
    with pytest.raises(UserError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        collect([str(out)])


@pytest.mark.parametrize("manifest", [b"{broken", b"[]", b'{"task": "x"}', b"\xff\xfe", b'{"task": "x", "family": "lm", '
                                      b'"method": "m", "model": "m", "seed": 0, "config": {"task": {"params": 3}}}'])
def test_hand_edited_manifest_gives_a_clear_error(finished, tmp_path, manifest):
    from r3mem_bench.report import collect

    out = tmp_path / "out"
    shutil.copytree(finished, out)
    (out / "reltask" / "no_memory" / "manifest.json").write_bytes(manifest)
    with pytest.raises(UserError, match="manifest"):
        collect([str(out)])


def test_hand_edited_results_through_the_cli(finished, tmp_path):
    """``report`` and a resuming ``run`` both stop with one line (exit 2) and leave the file as it was."""
    out = _damaged(finished, tmp_path, lambda ls: _retype(ls, 1, "segment_nll_sum", "oops"))
    before = (out / "reltask" / "no_memory" / "results.jsonl").read_bytes()
    rep = run_cli("report", str(out))
    assert rep.returncode == 2 and "segment_nll_sum" in rep.stderr and "Traceback" not in rep.stderr
    assert len(rep.stderr.strip().splitlines()) == 1
    tasks = finished.parent / "data" / "tasks"
    proc = run_cli("run", "--task", "reltask", "--method", "no_memory", "--include-path", str(tasks), *TINY,
                   "--output", str(out))
    assert proc.returncode == 2 and "segment_nll_sum" in proc.stderr and "Traceback" not in proc.stderr
    assert (out / "reltask" / "no_memory" / "results.jsonl").read_bytes() == before
