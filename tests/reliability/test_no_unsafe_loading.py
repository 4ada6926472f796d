"""No unsafe loading in the package source: no pickle, no eval/exec, no unsafe YAML, torch.load only with
``weights_only=True``, no ``trust_remote_code=True``.

The source is parsed with ``ast`` (so ``model.eval()`` and the words in comments do not count); the checker is
itself tested on a snippet with every pattern, so this test can fail.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCANNED = ("r3mem_bench", "baselines", "tasks", "benchmarks")
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}
SAFE_YAML_LOADERS = {"SafeLoader", "CSafeLoader", "BaseLoader", "CBaseLoader"}


def _is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _dotted(node: ast.AST) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def unsafe_calls(source: str, name: str = "<src>") -> list[str]:
    """Every unsafe construct in ``source`` as ``name:line: what``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        where = f"{name}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in UNSAFE_MODULES:
                    found.append(f"{where}: import {alias.name}")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
            found.append(f"{where}: from {node.module} import")
        elif isinstance(node, ast.Call):
            func = _dotted(node.func)
            kw = {k.arg: k.value for k in node.keywords}
            last = func.rsplit(".", 1)[-1]
            if isinstance(node.func, ast.Name) and func in ("eval", "exec"):
                found.append(f"{where}: {func}()")
            elif func in ("yaml.load", "yaml.load_all"):
                loader = kw.get("Loader", node.args[1] if len(node.args) > 1 else None)
                if loader is None or _dotted(loader).rsplit(".", 1)[-1] not in SAFE_YAML_LOADERS:
                    found.append(f"{where}: {func}() without SafeLoader")
            elif func in ("yaml.unsafe_load", "yaml.full_load", "yaml.unsafe_load_all", "yaml.full_load_all"):
                found.append(f"{where}: {func}()")
            elif func == "torch.load" and not _is_true(kw.get("weights_only")):
                found.append(f"{where}: torch.load() without weights_only=True")
            elif last in ("read_pickle", "to_pickle"):
                found.append(f"{where}: {func}()")
            elif last == "load" and _is_true(kw.get("allow_pickle")):
                found.append(f"{where}: {func}(allow_pickle=True)")
            if _is_true(kw.get("trust_remote_code")):
                found.append(f"{where}: {func}(trust_remote_code=True)")
    return found


BAD = '''
import pickle
from dill import loads
import yaml, torch, numpy as np, pandas as pd
yaml.load(text)
yaml.load(text, Loader=yaml.Loader)
yaml.full_load(text)
eval("1 + 1")
exec("x = 1")
torch.load("w.pt")
torch.load("w.pt", weights_only=False)
np.load("a.npy", allow_pickle=True)
pd.read_pickle("f")
AutoModel.from_pretrained("x", trust_remote_code=True)
'''
GOOD = '''
import yaml, torch
yaml.safe_load(text)
yaml.load(text, Loader=yaml.SafeLoader)
torch.load("w.pt", weights_only=True)
model.eval()
text = "pickle eval( exec( torch.load("
'''


def test_checker_flags_every_pattern_and_nothing_safe():
    assert len(unsafe_calls(BAD)) == 12, unsafe_calls(BAD)
    assert unsafe_calls(GOOD) == []


def _sources() -> list[Path]:
    files = [p for d in SCANNED for p in sorted((ROOT / d).rglob("*.py"))]
    assert any(p.parent.name == "r3mem_bench" for p in files)
    return files


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_unsafe_loading_in_source(path):
    assert unsafe_calls(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT))) == []
