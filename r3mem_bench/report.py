"""Aggregate finished runs into tables: one record per (task, method) with its metrics."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from r3mem_bench.errors import UserError
from r3mem_bench.families import get_family
from r3mem_bench.store import MANIFEST, RESULTS, read_rows


def find_runs(dirs: list[str]) -> list[Path]:
    """Every (task, method) result directory under the given directories."""
    found: list[Path] = []
    for d in dirs:
        root = Path(d)
        if not root.exists():
            raise UserError(f"report: {root} does not exist; fix: give the --output directory of a run")
        found.extend(sorted(p.parent for p in root.rglob(MANIFEST)))
    if not found:
        raise UserError(f"report: no runs found under {', '.join(dirs)}; fix: run `r3mem-bench run` first")
    return found


def load_run(path: Path) -> tuple[dict, list[dict]]:
    """Manifest and rows of one result directory."""
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        raise UserError(f"{path / MANIFEST}: corrupt manifest; fix: delete {path} and rerun it") from None
    return manifest, read_rows(path / RESULTS)


def collect(dirs: list[str]) -> list[dict]:
    """One record ``{task, method, n, metrics, ...}`` per result directory, sorted by task then method."""
    records = []
    for path in find_runs(dirs):
        manifest, rows = load_run(path)
        family = get_family(manifest["family"])
        params = manifest["config"]["task"]["params"]
        metrics = family.aggregate(rows, params) if rows else {}
        records.append({"task": manifest["task"], "family": manifest["family"], "method": manifest["method"],
                        "model": manifest["model"], "seed": manifest["seed"], "n": len(rows),
                        "metrics": {k: _clean(v) for k, v in metrics.items()}, "path": str(path)})
    records.sort(key=lambda r: (r["task"], r["method"], r["seed"]))
    return records


def _clean(v):
    return None if isinstance(v, float) and (math.isnan(v) or math.isinf(v)) else v


def to_frame(records: list[dict]) -> pd.DataFrame:
    """A tidy table: one row per (task, method), one column per metric."""
    rows = [{"task": r["task"], "method": r["method"], "n": r["n"], **r["metrics"]} for r in records]
    return pd.DataFrame(rows)


def render(records: list[dict], fmt: str) -> str:
    """The records as ``md``, ``csv``, ``latex`` or ``json``."""
    if fmt == "json":
        return json.dumps([{k: r[k] for k in ("task", "method", "n", "metrics")} for r in records], indent=2) + "\n"
    df = to_frame(records)
    if fmt == "csv":
        return df.to_csv(index=False, float_format="%.6g")
    if fmt == "md":
        return df.to_markdown(index=False, floatfmt=".4g") + "\n"
    if fmt == "latex":
        return df.to_latex(index=False, float_format="%.4g", escape=True)
    raise UserError(f"--format {fmt}: unknown; fix: use md, csv, latex or json")
