"""The ``Family`` base class and the family registry (``register_family``); see :mod:`r3mem_bench.families`."""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Iterable

from r3mem_bench.errors import UserError


class Family:
    """Base class of a task family."""

    name: ClassVar[str] = ""
    default_params: ClassVar[dict[str, Any]] = {}
    loaders: ClassVar[dict[str, Callable]] = {}
    # Fields every stored row must have and their kinds (see ``check_rows``); lists named in ``row_parallel``
    # must have equal lengths. Rows edited by hand are checked against this before any number is computed.
    row_fields: ClassVar[dict[str, str]] = {"id": "str"}
    row_parallel: ClassVar[tuple[str, ...]] = ()

    def check_params(self, params: dict, where: str) -> None:
        """Reject unknown parameter names and wrong types with a message naming them."""
        for key, value in params.items():
            if key not in self.default_params:
                raise UserError(f"{where}: unknown parameter '{key}' for family '{self.name}'; "
                                f"fix: use one of {sorted(self.default_params)}")
            default = self.default_params[key]
            if default is not None and value is not None:
                want = type(default)
                ok = isinstance(value, want) and not (want is int and isinstance(value, bool))
                if want is float and isinstance(value, int) and not isinstance(value, bool):
                    ok = True
                if not ok:
                    raise UserError(f"{where}: parameter '{key}' must be {want.__name__}, got {value!r}")

    def validate_spec(self, spec) -> None:
        """Check a parsed task YAML against this family."""
        where = f"task file {spec.source}"
        self.check_params(spec.params, where)
        for key, values in spec.sweep.items():
            if not isinstance(values, list) or not values:
                raise UserError(f"{where}: sweep '{key}' must be a non-empty list")
            for v in values:
                self.check_params({key: v}, where)
        loader = spec.dataset.get("loader")
        if loader not in self.loaders:
            raise UserError(f"{where}: dataset.loader '{loader}' is unknown for family '{self.name}'; "
                            f"fix: use one of {sorted(self.loaders)}")

    def check_rows(self, rows: Iterable[dict], where: str) -> None:
        """Refuse rows whose fields are missing or of the wrong kind (a clear error instead of a wrong number)."""
        for n, row in enumerate(rows, 1):
            for key, kind in self.row_fields.items():
                if key not in row:
                    raise UserError(f"{where}: row {n} ('{row.get('id')}') has no field '{key}'; "
                                    "fix: delete that row (its example is redone on rerun)")
                if not _is_kind(row[key], kind):
                    raise UserError(f"{where}: row {n} ('{row.get('id')}') field '{key}' must be {kind}, got "
                                    f"{str(row[key])[:40]!r}; fix: delete that row (its example is redone on rerun)")
            lengths = {key: len(row[key]) for key in self.row_parallel}
            if len(set(lengths.values())) > 1:
                raise UserError(f"{where}: row {n} ('{row.get('id')}') has lists of different lengths {lengths}; "
                                "fix: delete that row (its example is redone on rerun)")

    def examples(self, task, data: str | None = None, tokenizer=None) -> list[dict]:
        """The task's examples (each a dict with a unique string ``id``)."""
        raise NotImplementedError

    def evaluate(self, task, method, examples: list[dict], emit: Callable[[dict], None], progress=None) -> None:
        """Run ``method`` over ``examples`` with this family's protocol; ``emit`` each finished row."""
        raise NotImplementedError

    def aggregate(self, rows: Iterable[dict], params: dict) -> dict[str, float]:
        """Metrics of a run from its rows."""
        raise NotImplementedError


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_kind(value: Any, kind: str) -> bool:
    """Whether ``value`` is of ``kind``: str, count (int >= 0), num (int or float), list[...], dict[num]."""
    if kind.startswith("list[") and kind.endswith("]"):
        return isinstance(value, list) and all(_is_kind(v, kind[5:-1]) for v in value)
    if kind == "dict[num]":  # metric dicts: numbers or null
        return isinstance(value, dict) and all(v is None or _is_kind(v, "num") for v in value.values())
    if kind == "str":
        return isinstance(value, str)
    if kind == "count":
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0
    if kind == "num":
        return _is_number(value)
    raise ValueError(f"unknown row field kind {kind!r}")


_FAMILIES: dict[str, Family] = {}


def register_family(cls: type[Family]) -> type[Family]:
    """Class decorator adding a family to the registry."""
    _FAMILIES[cls.name] = cls()
    return cls
