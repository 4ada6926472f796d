"""Method registry: the reference methods here, R3Mem in ``r3mem_bench.r3mem``, baselines in ``baselines/``.

``@register_method`` adds a ``MemoryMethod`` subclass under its ``name``; ``get_method`` builds one. Variants
(ablations) register as their own names. Every module of ``r3mem_bench.baselines`` is imported on first use, then
the plugins (:mod:`r3mem_bench.plugins`): entry points of the group ``r3mem_bench.methods`` and the files named by
``R3MEM_BENCH_METHOD_PATH``. A plugin that registers a name already taken is refused, naming both sources.
"""

from __future__ import annotations

import importlib
import pkgutil

from r3mem_bench.errors import UserError
from r3mem_bench.method import MemoryMethod
from r3mem_bench.methods import registry
from r3mem_bench.methods.registry import method_source, plugin_source, register_method

__all__ = ["all_methods", "get_method_class", "load_method_paths", "method_source", "plugin_source",
           "register_method"]

_DISCOVERED = False


def _discover() -> None:
    global _DISCOVERED
    if _DISCOVERED:
        return
    _DISCOVERED = True
    importlib.import_module("r3mem_bench.methods.reference")
    for mod in ("r3mem_bench.r3mem",):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name != mod:
                raise
    try:
        pkg = importlib.import_module("r3mem_bench.baselines")
    except ModuleNotFoundError:
        pkg = None
    if pkg is not None:
        for info in pkgutil.iter_modules(pkg.__path__):
            if not info.name.startswith("_"):
                importlib.import_module(f"r3mem_bench.baselines.{info.name}")
    from r3mem_bench.plugins import load_entry_points, load_env_paths

    load_entry_points()
    load_env_paths()


def load_method_paths(paths, origin: str = "--method-path") -> list[str]:
    """Import the plugin files ``paths`` name (after the built-in methods, so a clash names the plugin)."""
    from r3mem_bench import plugins

    _discover()
    return plugins.load_method_paths(paths, origin)


def all_methods() -> dict[str, type[MemoryMethod]]:
    """All registered methods by name."""
    _discover()
    return dict(sorted(registry._METHODS.items()))


def get_method_class(name: str) -> type[MemoryMethod]:
    """The method class called ``name``."""
    methods = all_methods()
    if name not in methods:
        from r3mem_bench.methods.derived import derived_class

        derived = derived_class(name, get_method_class)
        if derived is not None:
            return derived
        raise UserError(f"unknown method '{name}'; fix: use one of {', '.join(methods)} (see `r3mem-bench list`)")
    return methods[name]
