"""Memory methods from outside the package: Python files or folders (``--method-path``) and installed entry points.

A plugin is a module that defines a ``MemoryMethod`` subclass decorated with ``@register_method`` (from
``r3mem_bench.methods``). It is found in three ways:

* ``--method-path FILE_OR_DIR`` (``run``, ``suite``, ``list``, ``regress``, ``train``, ``check-method``) or a
  suite's ``method_path:`` key: a ``.py`` file, or a folder whose ``.py`` files are all imported (except
  ``_*.py``, ``test_*.py`` and ``conftest.py``). The file's folder is on ``sys.path`` while it is imported, so it
  may import modules next to it. The paths loaded are also put in ``R3MEM_BENCH_METHOD_PATH`` (``os.pathsep``
  separated), so processes started from here (Ray workers of a suite) load them too.
* ``R3MEM_BENCH_METHOD_PATH`` set by the user: read when the registry is first used.
* An installed package's entry point in the group ``r3mem_bench.methods`` (``my_memory = "my_pkg.my_memory"``):
  the module it names is imported when the registry is first used; if it names a ``MemoryMethod`` subclass that
  is not registered yet, it is registered.

A file that fails to import, a plugin that registers a name already taken, or a file that registers nothing is a
one-line :class:`UserError` naming the file (or entry point) and the fix.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import sys
from pathlib import Path

from r3mem_bench.errors import UserError

ENTRY_POINT_GROUP = "r3mem_bench.methods"
PATH_ENV = "R3MEM_BENCH_METHOD_PATH"
_LOADED: dict[Path, list[str]] = {}  # resolved plugin file -> the method names it registered
_ENTRY_POINTS_LOADED: set[str] = set()


def last_line(exc: BaseException) -> str:
    """``Type: last line of the message`` (a syntax error's message names the file and line)."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[-1]}" if lines else type(exc).__name__


def plugin_files(path: str | Path, origin: str = "--method-path") -> list[Path]:
    """The plugin files a ``--method-path`` value names: the file itself, or a folder's ``.py`` files."""
    p = Path(path).expanduser()
    if p.is_dir():
        files = sorted(f for f in p.glob("*.py")
                       if not f.name.startswith(("_", "test_")) and f.name != "conftest.py")
        if not files:
            raise UserError(f"{origin} {path}: the folder holds no plugin .py file; fix: give a .py file or a folder "
                            "of them")
        return [f.resolve() for f in files]
    if not p.is_file():
        raise UserError(f"{origin} {path}: no such file or folder; fix: give a .py file or a folder of them")
    if p.suffix != ".py":
        raise UserError(f"{origin} {path}: not a .py file; fix: give a Python file or a folder of them")
    return [p.resolve()]


def load_plugin_file(path: Path, origin: str = "--method-path") -> list[str]:
    """Import one plugin file (once per process); returns the method names it registered."""
    from r3mem_bench.methods.registry import _METHODS, plugin_source

    path = path.resolve()
    if path in _LOADED:
        return _LOADED[path]
    before = dict(_METHODS)
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:8]
    mod_name = f"r3mem_bench_plugin_{path.stem}_{digest}"
    spec = importlib.util.spec_from_file_location(mod_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    sys.path.insert(0, str(path.parent))
    try:
        with plugin_source(f"plugin file {path}"):
            spec.loader.exec_module(module)
    except UserError:
        sys.modules.pop(mod_name, None)
        raise
    except BaseException as exc:  # noqa: BLE001 - any failure of user code becomes one line
        sys.modules.pop(mod_name, None)
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise UserError(f"{origin} {path}: cannot import it ({last_line(exc)}); fix: correct the file "
                        f"(`python {path}` shows the traceback)") from None
    finally:
        try:
            sys.path.remove(str(path.parent))
        except ValueError:
            pass
    names = sorted(n for n in _METHODS if n not in before)
    if not names:
        raise UserError(f"{origin} {path}: registers no memory method; fix: decorate your MemoryMethod subclass "
                        "with @register_method (from r3mem_bench.methods) and give it a `name`")
    _LOADED[path] = names
    return names


def load_method_paths(paths: list[str] | tuple[str, ...] | None, origin: str = "--method-path") -> list[str]:
    """Import every plugin file that ``paths`` name; returns the method names they registered. Call it through
    :func:`r3mem_bench.methods.load_method_paths`, which registers the built-in methods first.

    The files are added to ``R3MEM_BENCH_METHOD_PATH`` so that child processes (Ray workers) load them too.
    """
    names: list[str] = []
    files = [f for p in (paths or []) for f in plugin_files(p, origin)]
    for f in files:
        names.extend(load_plugin_file(f, origin))
    if files:
        known = [p for p in os.environ.get(PATH_ENV, "").split(os.pathsep) if p]
        os.environ[PATH_ENV] = os.pathsep.join(known + [str(f) for f in files if str(f) not in known])
    return names


def load_env_paths() -> list[str]:
    """Import the plugin files named by ``R3MEM_BENCH_METHOD_PATH`` (called by the registry on first use)."""
    paths = [p for p in os.environ.get(PATH_ENV, "").split(os.pathsep) if p]
    names: list[str] = []
    for p in paths:
        for f in plugin_files(p, PATH_ENV):
            names.extend(load_plugin_file(f, PATH_ENV))
    return names


def _entry_points() -> list:
    """Entry points of the ``r3mem_bench.methods`` group of every installed distribution."""
    return list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))


def load_entry_points() -> list[str]:
    """Import the module (or class) of each installed entry point once; returns the method names registered."""
    from r3mem_bench.method import MemoryMethod
    from r3mem_bench.methods.registry import _METHODS, plugin_source, register_method

    names: list[str] = []
    for ep in _entry_points():
        key = f"{ep.name}={ep.value}"
        if key in _ENTRY_POINTS_LOADED:
            continue
        dist = getattr(getattr(ep, "dist", None), "name", None)
        label = f"entry point '{ep.name} = {ep.value}'" + (f" of package {dist}" if dist else "")
        before = dict(_METHODS)
        try:
            with plugin_source(label):
                obj = ep.load()
                if isinstance(obj, type) and issubclass(obj, MemoryMethod) and _METHODS.get(obj.name) is not obj:
                    register_method(obj)
        except UserError:
            raise
        except BaseException as exc:  # noqa: BLE001 - a broken plugin package becomes one line
            if isinstance(exc, KeyboardInterrupt):
                raise
            raise UserError(f"{label}: cannot import it ({last_line(exc)}); fix: correct or reinstall that package, "
                            f"or uninstall it") from None
        _ENTRY_POINTS_LOADED.add(key)
        names.extend(sorted(n for n in _METHODS if n not in before))
    return names
