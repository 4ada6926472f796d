"""The ``Task`` contract and the task registry.

A task is one YAML file under ``tasks/<family>/`` (or a directory given with ``--include-path``)::

    task: wikitext2            # unique name
    family: lm                 # lm | rag | dialogue: selects the protocol, loaders and metrics
    default: true              # the family's default task (``--task lm`` selects it)
    description: ...
    dataset: {loader: bundled_text, name: wikitext2_test}   # a loader of that family + its arguments
    params: {segment_len: 512}  # protocol parameters; each family lists the ones it accepts
    sweep: {segment_len: [256, 512]}  # optional: one task variant per combination

A ``Task`` is a spec with its parameters resolved. Its family (``r3mem_bench.families``) defines
``examples`` (documents, or questions grouped by the corpus they are asked over), ``evaluate`` (the one protocol
every method goes through) and ``aggregate`` (metrics from the per-example rows). Adding a task never touches
the core: drop a YAML in ``tasks/`` or pass ``--include-path DIR``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from r3mem_bench.errors import UserError

SPEC_KEYS = {"task", "family", "default", "description", "dataset", "params", "sweep", "tags"}
REQUIRED_KEYS = {"task", "family", "dataset"}


@dataclass
class TaskSpec:
    """A parsed task YAML."""

    name: str
    family: str
    dataset: dict
    params: dict = field(default_factory=dict)
    sweep: dict = field(default_factory=dict)
    default: bool = False
    description: str = ""
    tags: list = field(default_factory=list)
    source: str = ""


@dataclass
class Task:
    """A task with resolved parameters: what a run evaluates."""

    spec: TaskSpec
    params: dict
    variant: str = ""  # "" or "segment_len=256,max_tokens=8192" for sweep cells
    data: dict = field(default_factory=dict)  # what the family loaded (e.g. QA corpora), not part of the config

    @property
    def name(self) -> str:
        """Task name, with the sweep cell when there is one (``wikitext2@segment_len=256``)."""
        return f"{self.spec.name}@{self.variant}" if self.variant else self.spec.name

    @property
    def family(self) -> str:
        """The task family (lm, rag, dialogue)."""
        return self.spec.family

    def config(self) -> dict:
        """Everything that defines the task's numbers (goes into the manifest and its hash)."""
        return {"task": self.name, "family": self.family, "dataset": self.spec.dataset, "params": self.params}


def builtin_task_dir() -> Path:
    """The directory of the shipped task YAMLs (works installed or from a source checkout)."""
    try:
        return Path(str(resources.files("r3mem_bench.tasks")))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parent.parent / "tasks"


def _load_yaml(path: Path) -> TaskSpec:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise UserError(f"task file {path}: not valid YAML ({str(exc).splitlines()[0]}); fix the syntax") from None
    if not isinstance(raw, dict):
        raise UserError(f"task file {path}: expected a mapping with keys {sorted(REQUIRED_KEYS)}")
    unknown = set(raw) - SPEC_KEYS
    if unknown:
        raise UserError(f"task file {path}: unknown field '{sorted(unknown)[0]}'; fix: use only {sorted(SPEC_KEYS)}")
    missing = REQUIRED_KEYS - set(raw)
    if missing:
        raise UserError(f"task file {path}: missing field '{sorted(missing)[0]}'; fix: add it")
    from r3mem_bench.families import get_family

    family = raw["family"]
    if not isinstance(family, str):
        raise UserError(f"task file {path}: field 'family' must be a string")
    fam = get_family(family, where=f"task file {path}")
    for key, kind in (("dataset", dict), ("params", dict), ("sweep", dict), ("tags", list)):
        if key in raw and raw[key] is not None and not isinstance(raw[key], kind):
            raise UserError(f"task file {path}: field '{key}' must be a {kind.__name__}")
    if not isinstance(raw["task"], str) or not raw["task"].strip() or "@" in raw["task"] or "/" in raw["task"]:
        raise UserError(f"task file {path}: field 'task' must be a name without '@' or '/'")
    spec = TaskSpec(
        name=raw["task"], family=family, dataset=dict(raw["dataset"]), params=dict(raw.get("params") or {}),
        sweep=dict(raw.get("sweep") or {}), default=bool(raw.get("default", False)),
        description=str(raw.get("description", "")), tags=list(raw.get("tags") or []), source=str(path),
    )
    fam.validate_spec(spec)
    return spec


class TaskRegistry:
    """All tasks found in the builtin directory and the include paths."""

    def __init__(self, include_paths: list[str] | None = None):
        self.specs: dict[str, TaskSpec] = {}
        dirs = [builtin_task_dir()] + [Path(p) for p in (include_paths or [])]
        for d in dirs:
            if not d.is_dir():
                raise UserError(f"--include-path {d}: not a directory; fix: give a folder of task YAML files")
            root = d.resolve()
            for path in sorted(d.rglob("*.yaml")):
                if not path.resolve().is_relative_to(root):
                    raise UserError(f"task file {path}: resolves outside {d}; fix: keep task files inside it")
                spec = _load_yaml(path)
                if spec.name in self.specs and d != dirs[0]:
                    raise UserError(f"task file {path}: task '{spec.name}' is already defined in "
                                    f"{self.specs[spec.name].source}; fix: rename it")
                self.specs[spec.name] = spec

    def families(self) -> dict[str, list[TaskSpec]]:
        """Tasks grouped by family."""
        out: dict[str, list[TaskSpec]] = {}
        for spec in self.specs.values():
            out.setdefault(spec.family, []).append(spec)
        return out

    def get(self, name: str) -> TaskSpec:
        """A task by name, or a family name for that family's default task."""
        if name in self.specs:
            return self.specs[name]
        fams = self.families()
        if name in fams:
            defaults = [s for s in fams[name] if s.default] or fams[name][:1]
            return defaults[0]
        raise UserError(f"unknown task '{name}'; fix: run `r3mem-bench list` (tasks: {', '.join(sorted(self.specs))})")

    def resolve(self, name: str, overrides: dict | None = None) -> list[Task]:
        """Tasks for ``name`` with CLI overrides applied; one per sweep cell."""
        spec = self.get(name)
        from r3mem_bench.families import get_family

        fam = get_family(spec.family)
        base = {**fam.default_params, **spec.params}
        overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
        fam.check_params(overrides, where="command line")
        sweep = {k: v for k, v in spec.sweep.items() if k not in overrides}
        if not sweep:
            return [Task(spec, {**base, **overrides})]
        keys = sorted(sweep)
        tasks = []
        for values in itertools.product(*(sweep[k] for k in keys)):
            cell = dict(zip(keys, values))
            variant = ",".join(f"{k}={v}" for k, v in cell.items())
            tasks.append(Task(spec, {**base, **overrides, **cell}, variant))
        return tasks


def config_hash(obj: Any) -> str:
    """A short stable hash of a JSON-able config."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
