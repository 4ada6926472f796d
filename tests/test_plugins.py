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

from conftest import invoke_cli, run_cli
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


QA_PLUGIN = '''
from r3mem_bench.method import MemoryMethod
from r3mem_bench.methods import register_method


@register_method
class PlugRecent(MemoryMethod):
    """The last two items of the corpus or conversation as the shared prompt's context, from a plugin file."""

    name = "plug_recent"
    families = ("rag", "dialogue")
    description = "plugin: the last 2 items as context"

    def reset(self):
        self.items = []

    def ingest(self, items):
        self.items = (self.items + list(items))[-2:]

    def retrieve(self, question, now=None):
        return "\\n".join(item.text for item in self.items), [item.id for item in self.items]

    def state_bytes(self):
        return sum(len(item.text.encode("utf-8")) for item in self.items)
'''

BROKEN_PROPERTIES = '''
import inspect
import json
from pathlib import Path

import numpy as np
import torch

from r3mem_bench.method import Answer
from r3mem_bench.methods import register_method
from r3mem_bench.methods.reference import NoMemory


@register_method
class GoldPeeker(NoMemory):
    """Answers with the gold answer of the question record it finds in its callers' frames."""

    name = "gold_peeker"
    families = ("rag",)

    def answer(self, question, now=None):
        for info in inspect.stack():
            ex = info.frame.f_locals.get("ex")
            if isinstance(ex, dict) and ex.get("question") == question and ex.get("answers"):
                return Answer(ex["answers"][0], [], 1)
        return super().answer(question, now=now)


@register_method
class Unseeded(NoMemory):
    """An offset drawn at construction from an unseeded generator: the same within a process, not across them."""

    name = "unseeded"
    families = ("lm",)

    def __init__(self, lm, options=None, generator=None, prompt=None):
        super().__init__(lm, {"window": 8, **(options or {})}, generator, prompt)
        self.offset = float(np.random.default_rng().random()) * 1e-3

    def score_stream(self, segments):
        return [x + self.offset for x in super().score_stream(segments)]


@register_method
class LossyCheckpoint(NoMemory):
    """Trainable, but its checkpoint keeps only one of its two tensors."""

    name = "lossy_ckpt"
    families = ("lm",)
    trainable = True

    def __init__(self, lm, options=None, generator=None, prompt=None):
        super().__init__(lm, {"window": 8, **(options or {})}, generator, prompt)
        self.shift = torch.nn.Parameter(torch.zeros(()))
        self.gain = torch.nn.Parameter(torch.ones(()))
        if self.options.get("checkpoint"):
            self.load_checkpoint(self.options["checkpoint"])

    def trainable_parameters(self):
        return {"shift": self.shift, "gain": self.gain}

    def score_stream(self, segments):
        with torch.no_grad():
            return [x * self.gain + self.shift for x in super().score_stream(segments)]

    def save_checkpoint(self, directory, meta=None):
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / "lossy.json").write_text(json.dumps({"shift": self.shift.item()}))  # gain is lost

    def load_checkpoint(self, directory):
        with torch.no_grad():
            self.shift.fill_(json.loads((Path(directory) / "lossy.json").read_text())["shift"])
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
    plugin = _write(tmp_path / "plugins" / "plug.py", PLUGIN + QA_PLUGIN)  # one file, an LM and a QA method
    out = tmp_path / "out"
    proc = run_cli("run", "--task", "wikitext2", "--method", "plug_window,no_memory", "--method-path", str(plugin),
                   "--limit", "1", "--max-tokens", "128", "--segment-len", "32", "--output", str(out), "--quiet",
                   *TINY)
    assert proc.returncode == 0, proc.stderr
    # the default RAG and dialogue tasks (needle, persona), into the same output folder
    proc = run_cli("run", "--task", "rag,dialogue", "--method", "plug_recent,no_memory", "--method-path", str(plugin),
                   "--limit", "1", "--param", "max_new_tokens=4", "--output", str(out), "--quiet", *TINY)
    assert proc.returncode == 0, proc.stderr
    rep = run_cli("report", str(out), "--format", "json")
    assert rep.returncode == 0, rep.stderr
    records = {(r["task"], r["method"]): r for r in json.loads(rep.stdout)}
    assert set(records) == {(t, m) for t, m in [("wikitext2", "plug_window"), ("wikitext2", "no_memory"),
                                                 ("needle", "plug_recent"), ("needle", "no_memory"),
                                                 ("persona", "plug_recent"), ("persona", "no_memory")]}
    lm = {m: records[("wikitext2", m)] for m in ("plug_window", "no_memory")}
    assert lm["plug_window"]["n"] == 1 and lm["plug_window"]["metrics"]["ppl"] > 1
    # the window is real: the plugin's numbers differ from no_memory's (window 0)
    assert lm["plug_window"]["metrics"]["ppl"] != lm["no_memory"]["metrics"]["ppl"]
    for task in ("needle", "persona"):
        mine, closed_book = records[(task, "plug_recent")], records[(task, "no_memory")]
        assert mine["n"] == 1 and {"em", "f1"} <= set(mine["metrics"]), mine
        # its memory is real: two items of context make its prompts longer than the closed-book ones
        assert mine["metrics"]["prompt_tokens"] > closed_book["metrics"]["prompt_tokens"]
    listing = run_cli("list", "--method-path", str(plugin.parent))  # a folder of plugin files
    assert listing.returncode == 0, listing.stderr
    assert "plug_window  [lm]  plugin: 16-token window" in listing.stdout
    assert "plug_recent  [rag, dialogue]  plugin: the last 2 items as context" in listing.stdout


def test_every_method_command_takes_method_path(tmp_path, capsys, monkeypatch):
    plugin = _write(tmp_path / "plug.py", PLUGIN)
    for cmd in ("run", "suite", "list", "regress", "train", "check-method"):
        code, text = invoke_cli(capsys, monkeypatch, cmd, "--help")  # in this process: --help loads nothing
        assert code == 0 and "--method-path" in text, cmd
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
        # the SIGKILL-resume runs are fresh interpreters here (the default), which load the plugin file too
        assert "PASS  same numbers after a SIGKILL-resume (lm, rag: killed after each cell's first row" in check.stdout
        assert "PASS  rag: answers do not read the gold answer" in check.stdout
        assert "SKIP  checkpoint round-trips" in check.stdout and "(1 not applicable)" in check.stdout
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


def test_check_method_fails_each_new_property_naming_it(tmp_path):
    """A method that reads the gold answer, one whose numbers change from one process to the next, and a trainable
    one whose checkpoint loses a tensor each fail their property (the runs of the SIGKILL-resume check are forks here;
    the new-method test runs them in fresh interpreters)."""
    plugin = _write(tmp_path / "broken_properties.py", BROKEN_PROPERTIES)

    def check(name: str) -> subprocess.CompletedProcess:
        proc = run_cli("check-method", name, "--method-path", str(plugin), "--processes", "fork", *TINY)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert "Traceback" not in proc.stderr
        return proc

    peek = check("gold_peeker")
    assert "PASS  rag: reset() makes histories independent" in peek.stdout
    assert ("FAIL  rag: answers do not read the gold answer (golds replaced by a canary: same answers, retrieved ids, "
            "candidate NLLs): question 'rag-q0': prediction changed when only its gold answer changed ('Quill' -> "
            "'Ptarmigan 4471'): 'Quill' vs 'Ptarmigan 4471' (it is the canary") in peek.stdout
    assert "rag: answers do not read the gold answer" in peek.stderr
    assert "SKIP  same numbers after a SIGKILL-resume: not run: fix the failures above first" in peek.stdout
    assert "SKIP  checkpoint round-trips" in peek.stdout and "n/a: the method is not trainable" in peek.stdout
    unseeded = check("unseeded")
    assert "PASS  lm: reset() makes documents independent" in unseeded.stdout  # stable within one process
    assert "FAIL  same numbers after a SIGKILL-resume (lm: killed after each cell's first row" in unseeded.stdout
    assert "conformance_lm/unseeded row 'doc0'" in unseeded.stdout
    assert "the numbers depend on the process" in unseeded.stdout
    assert "same numbers after a SIGKILL-resume" in unseeded.stderr
    lossy = check("lossy_ckpt")
    assert ("FAIL  checkpoint round-trips (save_checkpoint, a fresh instance with checkpoint=DIR: same tensors, "
            "bitwise-identical NLLs): tensor 'gain' is not restored by load_checkpoint") in lossy.stdout
    assert "checkpoint round-trips" in lossy.stderr


VENV_PLUGIN = {
    "pyproject.toml": '''
        [build-system]
        requires = ["setuptools>=64"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "r3mem-venv-plugin"
        version = "0.1.0"

        [project.entry-points."r3mem_bench.methods"]
        venv_window = "venv_plugin.methods"

        [tool.setuptools.packages.find]
        where = ["src"]
    ''',
    "src/venv_plugin/__init__.py": "",
    "src/venv_plugin/methods.py": (PLUGIN + QA_PLUGIN).replace("plug_window", "venv_window")
                                  .replace("PlugWindow", "VenvWindow").replace("plug_recent", "venv_recent")
                                  .replace("PlugRecent", "VenvRecent")
                                  .replace("plugin: 16-token window", "installed plugin: 16-token window"),
}


def test_entry_point_plugin_in_a_fresh_venv(tmp_path):
    """A separate plugin package, installed (editable, offline) into a new virtual environment that sees the
    installed r3mem_bench and torch, is listed and runs the default LM, RAG and dialogue tasks there, and its rows
    are in the report."""
    import importlib.metadata

    from r3mem_bench.report import collect, render

    # metadata, not importlib.util.find_spec: setuptools' distutils shim answers find_spec("pip") by switching
    # itself off for the rest of the process, and a later import of setuptools (torch.compile's) then fails
    try:
        importlib.metadata.version("setuptools"), importlib.metadata.version("pip")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("needs setuptools and pip in this interpreter's site-packages (they build the plugin offline)")
    pkg = tmp_path / "pkg"
    for rel, text in VENV_PLUGIN.items():
        _write(pkg / rel, text)
    venv = tmp_path / "venv"
    # --without-pip: the venv's own (bundled, older) pip and setuptools would shadow the system ones; these come
    # through --system-site-packages instead, like r3mem_bench and torch
    made = subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)],
                          capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr
    python = str(venv / "bin" / "python")
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1", "OMP_NUM_THREADS": "1"}
    env.pop("R3MEM_BENCH_METHOD_PATH", None)
    install = subprocess.run([python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                              "-e", str(pkg)], capture_output=True, text=True, env=env, timeout=300)
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-2000:]
    assert "venv_window" not in {ep.name for ep in importlib.metadata.entry_points(group="r3mem_bench.methods")}

    def venv_cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([python, "-m", "r3mem_bench.cli", *args], capture_output=True, text=True, env=env,
                              timeout=600, cwd=tmp_path)

    listing = venv_cli("list")
    assert listing.returncode == 0, listing.stderr
    assert "venv_window  [lm]  installed plugin: 16-token window" in listing.stdout
    out = tmp_path / "out"
    proc = venv_cli("run", "--task", "lm", "--method", "venv_window", "--limit", "1", "--max-tokens", "128",
                    "--segment-len", "32", "--output", str(out), "--quiet", *TINY)
    assert proc.returncode == 0, proc.stderr
    assert "venv_window" in proc.stdout  # the run's own report table
    records = json.loads(render(collect([str(out)]), "json"))
    assert [(r["task"], r["method"], r["n"]) for r in records] == [("wikitext2", "venv_window", 1)]
    assert records[0]["metrics"]["ppl"] > 1
    manifest = json.loads(next(out.rglob("manifest.json")).read_text())
    assert manifest["method"] == "venv_window"
    # the package's QA method on the default RAG and dialogue tasks, into the same output folder
    proc = venv_cli("run", "--task", "rag,dialogue", "--method", "venv_recent", "--limit", "1", "--param",
                    "max_new_tokens=4", "--output", str(out), "--quiet", *TINY)
    assert proc.returncode == 0, proc.stderr
    records = json.loads(render(collect([str(out)]), "json"))
    assert sorted((r["task"], r["method"], r["n"]) for r in records) == [
        ("needle", "venv_recent", 1), ("persona", "venv_recent", 1), ("wikitext2", "venv_window", 1)]


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
