"""Method registry: the reference methods here, R3Mem in ``r3mem_bench.r3mem``, baselines in ``baselines/``.

``@register_method`` adds a ``MemoryMethod`` subclass under its ``name``; ``get_method`` builds one. Variants
(ablations) register as their own names. Every module of ``r3mem_bench.baselines`` is imported on first use, then
the plugins (:mod:`r3mem_bench.plugins`): entry points of the group ``r3mem_bench.methods`` and the files named by
``R3MEM_BENCH_METHOD_PATH``. A plugin that registers a name already taken is refused, naming both sources.
"""

from __future__ import annotations

import importlib
import pkgutil
from contextlib import contextmanager

from r3mem_bench.errors import UserError
from r3mem_bench.method import MemoryMethod

_METHODS: dict[str, type[MemoryMethod]] = {}
_SOURCES: dict[str, str] = {}  # method name -> where it came from (messages about name clashes)
_LOADING: list[str] = []  # the plugin being imported now, innermost last (see plugin_source)
_PLUGINS: set[str] = set()  # names registered by plugins
_DISCOVERED = False


def register_method(cls: type[MemoryMethod]) -> type[MemoryMethod]:
    """Class decorator adding a memory method to the registry."""
    module = cls.__module__
    source = _LOADING[-1] if _LOADING else f"{'built-in ' if module.startswith('r3mem_bench.') else ''}module {module}"
    if _LOADING and not (isinstance(cls.name, str) and cls.name.isidentifier()):
        raise UserError(f"{source}: class {cls.__qualname__} has name {cls.name!r}; fix: set `name = \"my_method\"` "
                        "(a Python identifier) on the class")
    old = _METHODS.get(cls.name)
    if old is not None and old is not cls and (_LOADING or cls.name in _PLUGINS):
        raise UserError(f"method '{cls.name}' of {source} clashes with '{cls.name}' of {_SOURCES[cls.name]}; "
                        f"fix: give the plugin's class another `name` (e.g. 'my_{cls.name}')")
    _METHODS[cls.name] = cls
    _SOURCES[cls.name] = source
    if _LOADING:
        _PLUGINS.add(cls.name)
    return cls


@contextmanager
def plugin_source(label: str):
    """Within this block, ``register_method`` records ``label`` as the source and refuses names already taken;
    if the block fails, the methods it registered are removed again."""
    before = dict(_METHODS)
    _LOADING.append(label)
    try:
        yield
    except BaseException:
        for name in [n for n in _METHODS if n not in before or _METHODS[n] is not before[n]]:
            _METHODS.pop(name)
            _SOURCES.pop(name, None)
            _PLUGINS.discard(name)
        raise
    finally:
        _LOADING.pop()


def method_source(name: str) -> str:
    """Where the method ``name`` was registered (a module, a plugin file or an entry point)."""
    return _SOURCES.get(name, "unknown")


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


def all_methods() -> dict[str, type[MemoryMethod]]:
    """All registered methods by name."""
    _discover()
    return dict(sorted(_METHODS.items()))


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
