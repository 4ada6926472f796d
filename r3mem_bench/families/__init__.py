"""Task families: the protocol every method goes through, the loaders and the metrics of each family.

``Family`` is the base: ``default_params`` lists the parameters a task of the family accepts (with defaults and
types), ``loaders`` maps a YAML ``dataset.loader`` name to a function, ``examples`` loads them, ``evaluate`` runs
a method over them (calling ``emit(row)`` once per finished example), ``aggregate`` turns rows into metrics.
"""

from __future__ import annotations


from r3mem_bench.errors import UserError
from r3mem_bench.families.base import _FAMILIES, Family, register_family

__all__ = ["Family", "all_families", "get_family", "register_family"]


_BUILTIN_LOADED: list[bool] = []  # non-empty once the builtin family modules were imported


def _ensure_loaded() -> None:
    # A flag, not ``if not _FAMILIES``: importing one family module directly (e.g. in a test) registers it
    # first, and the other builtin families must still be imported.
    if not _BUILTIN_LOADED:
        import r3mem_bench.families.lm  # noqa: F401
        for mod in ("r3mem_bench.families.rag", "r3mem_bench.families.dialogue"):
            try:
                __import__(mod)
            except ModuleNotFoundError as exc:
                if exc.name != mod:
                    raise
        _BUILTIN_LOADED.append(True)


def get_family(name: str, where: str = "") -> Family:
    """The family called ``name``."""
    _ensure_loaded()
    if name not in _FAMILIES:
        prefix = f"{where}: " if where else ""
        raise UserError(f"{prefix}unknown family '{name}'; fix: use one of {sorted(_FAMILIES)}")
    return _FAMILIES[name]


def all_families() -> dict[str, Family]:
    """All registered families."""
    _ensure_loaded()
    return dict(_FAMILIES)
