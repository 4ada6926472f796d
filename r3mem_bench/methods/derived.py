"""Derived method names: a registered method with fixed options, and equal-state sliding windows.

* ``NAME:key=value[:key=value...]`` is method ``NAME`` with those options fixed (YAML scalars; they win over the
  run's ``--method-arg``), e.g. ``r3mem:memory_tokens=4`` or ``no_memory:window=64``. One suite can so compare
  sizes of one method (the quality-state frontier, ``configs/frontier.yaml``); each size is its own cell.
* ``window@NAME`` and ``window<k>x@NAME`` are the ``no_memory`` sliding window whose key/value cache holds (k
  times) the bytes of the state that ``NAME`` carries from one LM segment to the next, under the same options:
  the control a compressed memory must beat, since raw tokens of the same size are the obvious alternative.
  The target is built once with those options and asked for ``lm_state_bytes()`` (computed from the model's
  shapes); the window is the largest number of tokens whose cache fits, so its bytes equal the target's when
  they are a multiple of one token's cache (R3Mem's are) and fall short by less than one token otherwise.
  ``window@r3mem:memory_tokens=4`` sizes the window for R3Mem with 4 slots.

Derived classes are cached, so a name always maps to the same class.
"""

from __future__ import annotations

import inspect
import re
from typing import Callable

import yaml

from r3mem_bench.errors import UserError
from r3mem_bench.method import MemoryMethod

WINDOW = re.compile(r"window(?:(\d+)x)?@(.+)")
_CLASSES: dict[str, type[MemoryMethod]] = {}


def derived_class(name: str, lookup: Callable[[str], type[MemoryMethod]]) -> type[MemoryMethod] | None:
    """The class a derived ``name`` stands for (None when ``name`` is not derived); ``lookup`` finds base names."""
    if name in _CLASSES:
        return _CLASSES[name]
    if ":" in name:
        base, *pairs = name.split(":")
        cls = _with_options(lookup(base), name, _parse(name, pairs))
    else:
        match = WINDOW.fullmatch(name)
        if not match:
            return None
        cls = _window(lookup(match[2]), name, int(match[1] or 1))
    _CLASSES[name] = cls
    return cls


def _parse(name: str, pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UserError(f"method '{name}': '{pair}' is not key=value; fix: write e.g. r3mem:memory_tokens=4")
        out[key.strip()] = yaml.safe_load(value)
    return out


def _subclass(base: type[MemoryMethod], name: str, body: dict, fixed: dict | None = None) -> type[MemoryMethod]:
    """A subclass of ``base`` called ``name`` that loads ``base``'s shipped checkpoint (the one for the ``fixed``
    options where ``base.shipped_checkpoint`` takes ``options``, e.g. RMT's memory size)."""
    shipped = base.shipped_checkpoint
    if fixed and "options" in inspect.signature(shipped).parameters:
        def lookup(cls, model):
            return shipped(model, options=fixed)
    else:
        def lookup(cls, model):
            return shipped(model)
    body = {"name": name, "__module__": base.__module__, "__doc__": base.__doc__,
            "shipped_checkpoint": classmethod(lookup), **body}
    return type(re.sub(r"\W", "_", name), (base,), body)


def _with_options(base: type[MemoryMethod], name: str, fixed: dict) -> type[MemoryMethod]:
    preset = {**base.preset_options, **fixed}
    return _subclass(base, name, {"preset_options": preset, "description": f"{base.name} with {fixed}"}, preset)


def _window(target: type[MemoryMethod], name: str, factor: int) -> type[MemoryMethod]:
    from r3mem_bench.methods.reference import NoMemory
    from r3mem_bench.scoring import kv_bytes

    if "lm" not in target.families:
        raise UserError(f"method '{name}': '{target.name}' does not run LM streams, so it has no state to match; "
                        "fix: use window@ with an LM method (see `r3mem-bench list`)")
    if factor <= 0:
        raise UserError(f"method '{name}': the factor must be positive; fix: e.g. window4x@{target.name}")

    def __init__(self, lm, options=None, generator=None, prompt=None):
        options = {**(options or {}), **self.preset_options}
        target_options = {k: v for k, v in options.items() if k not in ("window", "batch_size")}
        probe = target(lm, target_options)
        state = probe.lm_state_bytes()
        del probe
        if state is None:
            raise UserError(f"method '{name}': '{target.name}' reports no LM state bytes; fix: implement "
                            "lm_state_bytes() on it")
        self.target_state_bytes = int(state)
        window = factor * self.target_state_bytes // kv_bytes(lm, 1)
        NoMemory.__init__(self, lm, {**options, "window": window}, generator, prompt)

    def config(self) -> dict:
        return {**NoMemory.config(self), "equal_state_of": target.name, "state_factor": factor,
                "target_state_bytes": self.target_state_bytes}

    return type(re.sub(r"\W", "_", name), (NoMemory,), {
        "name": name, "__module__": NoMemory.__module__, "families": ("lm",), "__init__": __init__, "config": config,
        "description": f"sliding window holding {factor}x the LM state bytes of {target.name} (equal-state control)"})
