"""R3Mem reconstruction results on disk: the ``reconstruct --json`` records that the report's table and figure read."""

from __future__ import annotations

import json
from pathlib import Path

RECON_X = ("memory_bytes", "memory_slots", "memory_tokens", "memory_size")
RECON_Y = ("token_accuracy", "reconstruction_ppl", "reconstruction_nll", "rouge_l", "f1", "exact_match")


def empty_label(label: str) -> str:
    """The series name of the empty-memory control of series ``label``."""
    return "empty memory" if label == "r3mem" else f"{label}, empty memory"


def load_reconstruction(folder: Path) -> tuple[list[dict], str]:
    """Points ``{x, y, x_name, y_name, label}`` from ``folder/*.json``, and a message when there are none.

    Each file is a list of records, or ``{"points": [...]}``, or ``{"label": ..., "points": [...]}``; a record
    gives a memory size (one of ``memory_bytes``, ``memory_slots``, ``memory_tokens``, ``memory_size``) and a
    quality (``token_accuracy``, ``reconstruction_ppl``, ``reconstruction_nll``, ``rouge_l``, ``f1``,
    ``exact_match``).
    """
    files = sorted(folder.glob("*.json")) if folder.is_dir() else []
    if not files:
        return [], f"r3mem reconstruction plot skipped: no JSON in {folder}"
    points = []
    for path in files:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        single = isinstance(data, dict) and "points" not in data  # one record per file (`reconstruct --json`)
        label = data.get("label", "r3mem" if single else path.stem) if isinstance(data, dict) else path.stem
        records = [data] if single else (data.get("points", []) if isinstance(data, dict) else data)
        for rec in records if isinstance(records, list) else []:
            if not isinstance(rec, dict):
                continue
            xk = next((k for k in RECON_X if isinstance(rec.get(k), (int, float))), None)
            for yk in RECON_Y:
                if xk and isinstance(rec.get(yk), (int, float)):
                    points.append({"x": float(rec[xk]), "y": float(rec[yk]), "x_name": xk, "y_name": yk,
                                   "label": str(rec.get("label", label))})
                if xk and isinstance(rec.get(f"empty_memory_{yk}"), (int, float)):  # the no-information control
                    points.append({"x": float(rec[xk]), "y": float(rec[f"empty_memory_{yk}"]), "x_name": xk,
                                   "y_name": yk, "label": empty_label(str(rec.get("label", label)))})
    if not points:
        return [], (f"r3mem reconstruction plot skipped: {folder} has no records with a memory size "
                    f"({', '.join(RECON_X)}) and a quality ({', '.join(RECON_Y)})")
    return points, ""
