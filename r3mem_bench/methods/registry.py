"""The method registry: ``@register_method`` adds a ``MemoryMethod`` subclass under its ``name``; plugins register
inside ``plugin_source``, which refuses names already taken. Discovery and lookup live in
:mod:`r3mem_bench.methods`."""

from __future__ import annotations

from contextlib import contextmanager

from r3mem_bench.errors import UserError
from r3mem_bench.method import MemoryMethod

_METHODS: dict[str, type[MemoryMethod]] = {}
_SOURCES: dict[str, str] = {}  # method name -> where it came from (messages about name clashes)
_LOADING: list[str] = []  # the plugin being imported now, innermost last (see plugin_source)
_PLUGINS: set[str] = set()  # names registered by plugins


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
