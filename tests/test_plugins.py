"""Methods from outside the package: --method-path files, entry points, suite method_path, the new-method scaffold
and the check-method conformance checks (tiny-random)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import run_cli
from r3mem_bench.errors import UserError

TINY = ["--model", "tiny-random", "--threads", "1"]

PLUGIN = '''
from r3mem_bench.methods import register_method
from r3mem_bench.methods.reference import NoMemory


@register_method
class PlugWindow(NoMemory):
    """no_memory with a 16-token window, from a plugin file."""

    name = "plug_window"
    families = ("lm",)
    description = "plugin: 16-token window"

    def __init__(self, lm, options=None, generator=None, prompt=None):
        super().__init__(lm, {"window": 16, **(options or {})}, generator, prompt)
'''

BROKEN_METHODS = '''
import torch

from r3mem_bench.method import MemoryMethod
from r3mem_bench.methods import register_method
from r3mem_bench.scoring import token_nll


class _Window(MemoryMethod):
    families = ("lm",)

    def __init__(self, lm, options=None, generator=None, prompt=None):
        super().__init__(lm, options, generator, prompt)
        self.memory = torch.empty(0, dtype=torch.long)

    def reset(self):
        self.memory = torch.empty(0, dtype=torch.long)

    def state_bytes(self):
        return int(self.memory.numel() * 8)

    @torch.no_grad()
    def score_segment(self, seg):
        ids = torch.cat([torch.tensor([self.lm.prefix_token_id]), self.memory, seg])
        logits = self.lm.model(input_ids=ids.unsqueeze(0)).logits[:, ids.numel() - seg.numel() - 1: -1]
        self.tokens_processed += ids.numel()
        self.memory = torch.cat([self.memory, seg])[-32:]
        return token_nll(logits, seg.unsqueeze(0))[0]


@register_method
class ShortNll(_Window):
    name = "short_nll"

    def score_segment(self, seg):
        return super().score_segment(seg)[:-1]  # one NLL short


@register_method
class Leaky(_Window):
    name = "leaky"

    def reset(self):
        pass  # keeps the previous document's tokens


@register_method
class Peeking(_Window):
    name = "peeking"

    def score_stream(self, segments):
        out = []
        for i, seg in enumerate(segments):
            ahead = segments[i + 1] if i + 1 < len(segments) else seg[:0]
            self.memory = torch.cat([self.memory, ahead])[-32:]  # reads the next segment before scoring this one
            out.append(self.score_segment(seg))
        return out
'''


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def _one_line_error(proc: subprocess.CompletedProcess, code: int = 2) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_plugin_file_runs_and_appears_in_report(tmp_path):
    plugin = _write(tmp_path / "plugins" / "plug.py", PLUGIN)
    out = tmp_path / "out"
    proc = run_cli("run", "--task", "wikitext2", "--method", "plug_window,no_memory", "--method-path", str(plugin),
                   "--limit", "1", "--max-tokens", "128", "--segment-len", "32", "--output", str(out), "--quiet",
                   *TINY)
    assert proc.returncode == 0, proc.stderr
    rep = run_cli("report", str(out), "--format", "json")
    assert rep.returncode == 0, rep.stderr
    records = {r["method"]: r for r in json.loads(rep.stdout)}
    assert set(records) == {"plug_window", "no_memory"}
    assert records["plug_window"]["n"] == 1 and records["plug_window"]["metrics"]["ppl"] > 1
    # the window is real: the plugin's numbers differ from no_memory's (window 0)
    assert records["plug_window"]["metrics"]["ppl"] != records["no_memory"]["metrics"]["ppl"]
    listing = run_cli("list", "--method-path", str(plugin.parent))  # a folder of plugin files
    assert listing.returncode == 0, listing.stderr
    assert "plug_window  [lm]  plugin: 16-token window" in listing.stdout


def test_every_method_command_takes_method_path(tmp_path):
    plugin = _write(tmp_path / "plug.py", PLUGIN)
    for cmd in ("run", "suite", "list", "regress", "train", "check-method"):
        proc = run_cli(cmd, "--help")
        assert "--method-path" in proc.stdout, cmd
    # train finds the plugin (then refuses it: it has nothing to train)
    proc = run_cli("train", "--method", "plug_window", "--method-path", str(plugin), "--output",
                   str(tmp_path / "ck"), *TINY)
    assert "method 'plug_window' has nothing to train" in _one_line_error(proc)


def test_name_clash_with_builtin_is_one_line(tmp_path):
    plugin = _write(tmp_path / "clash.py", PLUGIN.replace('name = "plug_window"', 'name = "full_context"'))
    line = _one_line_error(run_cli("list", "--method-path", str(plugin)))
    assert f"plugin file {plugin}" in line and "built-in module r3mem_bench.methods.reference" in line
    assert "'full_context'" in line and "fix:" in line


@pytest.mark.parametrize("body, needle", [
    ("import no_such_module_xyz\n", "ModuleNotFoundError: No module named 'no_such_module_xyz'"),
    ("def broken(:\n    pass\n", "SyntaxError"),
    ("raise RuntimeError('first line\\nlast line')\n", "RuntimeError: last line"),
    ("x = 1\n", "registers no memory method"),
])
def test_broken_plugin_file_is_one_line(tmp_path, body, needle):
    plugin = _write(tmp_path / "broken.py", body)
    line = _one_line_error(run_cli("run", "--task", "wikitext2", "--method", "no_memory", "--method-path",
                                   str(plugin), "--output", str(tmp_path / "out"), "--quiet", *TINY))
    assert str(plugin) in line and needle in line and "fix:" in line
    assert not (tmp_path / "out").exists()


def test_missing_method_path_is_one_line(tmp_path):
    line = _one_line_error(run_cli("list", "--method-path", str(tmp_path / "nope.py")))
    assert "--method-path" in line and "nope.py" in line and "no such file" in line


def test_suite_method_path_key(tmp_path):
    _write(tmp_path / "methods" / "plug.py", PLUGIN)
    suite = {"suite": "plug", "model": "tiny-random", "limit": 1, "method_path": "methods/",
             "tasks": [{"task": "wikitext2", "params": {"segment_len": 32, "max_tokens": 64}}],
             "methods": ["no_memory", "plug_window"]}
    (tmp_path / "s.yaml").write_text(json.dumps(suite))
    proc = run_cli("suite", str(tmp_path / "s.yaml"), "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "wikitext2\tplug_window" in proc.stdout
    (tmp_path / "bad.yaml").write_text(json.dumps({**suite, "method_paths": "methods/"}))
    assert "unknown field 'method_paths'" in _one_line_error(run_cli("suite", str(tmp_path / "bad.yaml"), "--dry-run"))
    from r3mem_bench.suite import parse_suite

    with pytest.raises(UserError, match="'method_path' must be a path or a list of paths"):
        parse_suite({**suite, "method_path": 3}, str(tmp_path / "s.yaml"))
    parsed = parse_suite(suite, str(tmp_path / "s.yaml"))
    assert parsed.method_path == [str((tmp_path / "methods").resolve())]


@pytest.mark.parametrize("trainable", [False, True])
def test_new_method_passes_check_method_and_its_own_test(tmp_path, trainable):
    out = tmp_path / "mine"
    proc = run_cli("new-method", "my_memory", "--out", str(out), *(["--trainable"] if trainable else []))
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["my_memory.py", "my_memory_suite.yaml", "test_my_memory.py"]
    assert ("def save_checkpoint" in (out / "my_memory.py").read_text()) == trainable
    if not trainable:
        check = run_cli("check-method", "my_memory", "--method-path", str(out), *TINY)
        assert check.returncode == 0, check.stdout + check.stderr
        lines = check.stdout.strip().splitlines()
        assert sum(line.startswith("PASS") for line in lines) >= 15 and not any("FAIL" in line for line in lines)
        dry = run_cli("suite", str(out / "my_memory_suite.yaml"), "--dry-run")
        assert dry.returncode == 0 and "\tmy_memory" in dry.stdout, dry.stderr
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("R3MEM_BENCH_METHOD_PATH", None)
    test = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_my_memory.py"],
                          cwd=out, capture_output=True, text=True, env=env, timeout=600)
    assert test.returncode == 0, test.stdout[-3000:] + test.stderr[-2000:]
    assert ("3 passed" if trainable else "2 passed") in test.stdout


def test_new_method_refuses_overwrite_bad_names_and_clashes(tmp_path):
    out = tmp_path / "mine"
    assert run_cli("new-method", "my_memory", "--out", str(out)).returncode == 0
    before = {p.name: p.read_text() for p in out.iterdir()}
    (out / "my_memory.py").write_text(before["my_memory.py"] + "# edited\n")
    line = _one_line_error(run_cli("new-method", "my_memory", "--out", str(out)))
    assert "already exists" in line and "my_memory" in line
    assert (out / "my_memory.py").read_text().endswith("# edited\n")  # untouched
    from r3mem_bench.scaffold import write_scaffold

    for name, needle in (("1abc", "not a valid Python identifier"), ("class", "not a valid Python identifier"),
                         ("my-mem", "not a valid Python identifier"), ("no_memory", "already exists"),
                         ("json", "importable Python module")):
        with pytest.raises(UserError, match=needle):
            write_scaffold(name, tmp_path / "other")
    assert not (tmp_path / "other").exists()


def test_check_method_fails_a_broken_method_naming_the_check(tmp_path):
    plugin = _write(tmp_path / "broken_methods.py", BROKEN_METHODS)
    short = run_cli("check-method", "short_nll", "--method-path", str(plugin), *TINY)
    assert short.returncode == 1, short.stdout + short.stderr
    assert "FAIL  lm: one NLL per token: got [(15,), (15,), (15,)] for segments of [16, 16, 16] tokens" in short.stdout
    assert "lm: one NLL per token" in short.stderr and "Traceback" not in short.stderr
    leaky = run_cli("check-method", "leaky", "--method-path", str(plugin), *TINY)
    assert leaky.returncode == 1, leaky.stdout + leaky.stderr
    assert "PASS  lm: one NLL per token" in leaky.stdout
    assert "FAIL  lm: reset() makes documents independent" in leaky.stdout
    assert "reset() makes documents independent" in leaky.stderr
    peeking = run_cli("check-method", "peeking", "--method-path", str(plugin), *TINY)
    assert peeking.returncode == 1, peeking.stdout + peeking.stderr
    assert "PASS  lm: reset() makes documents independent" in peeking.stdout
    assert "FAIL  lm: no future tokens leak" in peeking.stdout and "reads tokens after it" in peeking.stdout
    assert "unknown method 'nope'" in _one_line_error(run_cli("check-method", "nope", *TINY))


def test_entry_point_plugin_is_found(tmp_path, monkeypatch):
    import r3mem_bench.methods as methods
    from r3mem_bench import plugins
    from r3mem_bench.methods import registry

    _write(tmp_path / "ep_plugin_mod.py", PLUGIN.replace("plug_window", "ep_window"))
    monkeypatch.syspath_prepend(str(tmp_path))
    methods.all_methods()  # the shipped methods, then a fresh registry state to restore afterwards
    for attr in ("_METHODS", "_SOURCES"):
        monkeypatch.setattr(registry, attr, dict(getattr(registry, attr)))
    monkeypatch.setattr(registry, "_PLUGINS", set(registry._PLUGINS))
    monkeypatch.setattr(methods, "_DISCOVERED", False)
    monkeypatch.setattr(plugins, "_ENTRY_POINTS_LOADED", set())
    monkeypatch.delenv(plugins.PATH_ENV, raising=False)
    group = plugins.ENTRY_POINT_GROUP
    points = [importlib.metadata.EntryPoint(name="ep_window", value="ep_plugin_mod", group=group)]
    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda **kw: list(points) if kw.get("group") == group else [])
    try:
        found = methods.all_methods()
        assert "ep_window" in found and "no_memory" in found
        assert registry.method_source("ep_window") == "entry point 'ep_window = ep_plugin_mod'"
        points.append(importlib.metadata.EntryPoint(name="broken", value="no_such_module_abc", group=group))
        with pytest.raises(UserError, match=r"entry point 'broken = no_such_module_abc': cannot import it "
                                            r"\(ModuleNotFoundError: No module named 'no_such_module_abc'\)"):
            plugins.load_entry_points()
        points[1:] = [importlib.metadata.EntryPoint(name="clash", value="ep_plugin_mod:PlugWindow", group=group)]
        monkeypatch.setattr(sys.modules["ep_plugin_mod"].PlugWindow, "name", "no_memory")
        with pytest.raises(UserError, match=r"method 'no_memory' of entry point 'clash = ep_plugin_mod:PlugWindow' "
                                            r"clashes with 'no_memory' of built-in module"):
            plugins.load_entry_points()
    finally:
        sys.modules.pop("ep_plugin_mod", None)
