"""The resumable results store: one directory per (task, method) with ``manifest.json`` and ``results.jsonl``.

* ``manifest.json`` is written atomically (temporary file + rename) and records the full config and its hash.
  Resuming with a different config is refused: finished rows are never mixed with rows of another setup.
* ``results.jsonl`` gets one line per finished example, written with a single ``write`` and ``fsync``. A SIGKILL
  can leave at most one partial last line (no newline): it is dropped on resume and that example is redone.
  Any other unparseable line (a hand edit) stops the run with a message naming the file and line.
* A lock file serialises writers: a second process on the same directory is refused with a clear message.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from filelock import FileLock, Timeout

from r3mem_bench.errors import UserError

MANIFEST = "manifest.json"
RESULTS = "results.jsonl"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file and rename, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """``atomic_write_bytes`` of ``text`` in UTF-8."""
    atomic_write_bytes(path, text.encode("utf-8"))


def read_rows(path: Path, repair: bool = False) -> list[dict]:
    """Rows of a results file; a partial last line is dropped (and cut from the file when ``repair``)."""
    if not path.exists():
        return []
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        if repair:
            with open(path, "r+b") as fh:
                fh.truncate(cut)
                fh.flush()
                os.fsync(fh.fileno())
        data = data[:cut]
    rows, seen = [], set()
    for n, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise UserError(f"{path}:{n}: corrupt result line; fix: delete that line (its example is redone) "
                            "or remove the file to start over") from None
        if not isinstance(row, dict) or not isinstance(row.get("id"), str):
            raise UserError(f"{path}:{n}: result line has no string 'id'; fix: delete that line")
        if row["id"] in seen:
            raise UserError(f"{path}:{n}: duplicate result for example '{row['id']}'; fix: delete one of them")
        seen.add(row["id"])
        rows.append(row)
    return rows


def check_manifest(manifest, where: Path) -> dict:
    """A parsed ``manifest.json`` with the fields a report needs, or a ``UserError`` naming the file."""
    try:
        ok = all(k in manifest for k in ("task", "family", "method", "model", "seed")) \
            and isinstance(manifest["config"]["task"]["params"], dict)
    except (KeyError, TypeError):
        ok = False
    if not ok:
        raise UserError(f"{where}: manifest lacks task/family/method/model/seed/config; "
                        f"fix: delete {Path(where).parent} and rerun it")
    return manifest


class RunStore:
    """Results of one (task, method) pair in ``root``; use as a context manager to hold the writer lock."""

    def __init__(self, root: Path, manifest: dict):
        self.root = Path(root)
        self.manifest = manifest
        self._lock = None
        self._fd = None

    def __enter__(self) -> "RunStore":
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=self.root):  # unique name: two processes never race on it
                pass
        except OSError as exc:
            raise UserError(f"--output {self.root}: not writable ({exc.strerror}); fix: choose a writable directory") from None
        self._lock = FileLock(str(self.root / ".lock"))
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            raise UserError(f"{self.root}: another r3mem-bench process is writing these results; "
                            "fix: wait for it to finish or use another --output") from None
        existing = self.root / MANIFEST
        if existing.exists():
            try:
                old = json.loads(existing.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                self.close()
                raise UserError(f"{existing}: corrupt manifest; fix: delete the directory {self.root} to start over") from None
            if old.get("config_hash") != self.manifest["config_hash"]:
                self.close()
                diff = sorted(k for k in set(old.get("config", {})) | set(self.manifest["config"])
                              if old.get("config", {}).get(k) != self.manifest["config"].get(k))
                raise UserError(f"{self.root}: holds results of a different config (differs in: {', '.join(diff) or '?'}); "
                                "fix: use another --output, or delete that directory to start over")
        else:
            atomic_write_text(existing, json.dumps(self.manifest, indent=2, sort_keys=True) + "\n")
        self.rows = read_rows(self.root / RESULTS, repair=True)
        self._fd = os.open(self.root / RESULTS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        return self

    @property
    def done_ids(self) -> set[str]:
        """Ids of the examples already finished."""
        return {r["id"] for r in self.rows}

    def append(self, row: dict) -> None:
        """Append one finished example (one write + fsync)."""
        line = (json.dumps(row, sort_keys=True, allow_nan=True) + "\n").encode("utf-8")
        os.write(self._fd, line)
        os.fsync(self._fd)
        self.rows.append(row)

    def close(self) -> None:
        """Release the file and the lock."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __exit__(self, *exc) -> None:
        self.close()
