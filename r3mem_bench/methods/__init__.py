"""Method registry: the reference methods here, R3Mem in ``r3mem_bench.r3mem``, baselines in ``baselines/``.

``@register_method`` adds a ``MemoryMethod`` subclass under its ``name``; ``get_method`` builds one. Variants
(ablations) register as their own names. Every module of ``r3mem_bench.baselines`` is imported on first use.
"""

from __future__ import annotations

import importlib
import pkgutil

from r3mem_bench.errors import UserError
from r3mem_bench.method import MemoryMethod

_METHODS: dict[str, type[MemoryMethod]] = {}
_DISCOVERED = False


def register_method(cls: type[MemoryMethod]) -> type[MemoryMethod]:
    """Class decorator adding a memory method to the registry."""
    _METHODS[cls.name] = cls
    return cls


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
        return
    for info in pkgutil.iter_modules(pkg.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"r3mem_bench.baselines.{info.name}")


def all_methods() -> dict[str, type[MemoryMethod]]:
    """All registered methods by name."""
    _discover()
    return dict(sorted(_METHODS.items()))


def get_method_class(name: str) -> type[MemoryMethod]:
    """The method class called ``name``."""
    methods = all_methods()
    if name not in methods:
        raise UserError(f"unknown method '{name}'; fix: use one of {', '.join(methods)} (see `r3mem-bench list`)")
    return methods[name]
