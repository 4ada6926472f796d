"""On-disk cache of ingest work, done once per run directory and reused, and progress lines for long ingests.

A memory method's ingest can cost far more than its questions: MemoryBank writes two greedy summaries per day of
a conversation plus an overall summary and portrait before the first question (a LoCoMo conversation has ~28
sessions). The products are a pure function of their inputs (the text, the model's weights, the options that
shape them and the code's prompt version), so a run keeps them under ``<output>/.cache/ingest/`` (``CACHE_DIR``)
and a rerun, a resume after a kill, a larger ``--limit`` or another method of the same run (``memorybank`` and
``memorybank_noforget`` write the same summaries) reads them instead of generating them again.

API (general, so any method can use it; the runner sets ``method.ingest_cache`` to an :class:`IngestCache` of the
run directory, None elsewhere)::

    payload = cache.get_or_compute("memorybank-summaries", {"model": model_id(lm), "prompts": digest(p), ...},
                                   lambda: [...])

``parts`` is a JSON-able dict naming everything the payload depends on; its canonical JSON (sorted keys) hashed
with the kind is the entry's key. A payload is JSON-able (``.json`` file) or a tensor / dict of tensors
(``.safetensors`` file, the header in its metadata). Each entry records its kind, key, parts and a SHA-256 of
its payload: a file that does not parse, or whose kind, key, parts or checksum do not match, is counted in
``stats["invalid"]`` and recomputed (and rewritten), never trusted. Writes are atomic (temporary file in the
same folder, fsync, ``os.replace``), so a kill leaves either the old entry, the new one or none, and two
processes writing the same key leave one whole entry. A cache that cannot be written (read-only or full disk)
warns once and the run goes on without it. ``stats`` counts ``hits``, ``misses``, ``invalid`` and ``writes``.

:func:`model_id` identifies the base model: its name, architecture, size, dtype, device type and a SHA-256 of
its weights (computed once per model object, about a second for SmolLM2-135M), its tokenizer and the torch and
transformers versions, so a changed checkpoint under the same name never reuses another model's products.

:class:`IngestProgress` prints ``<label>: [done/total] <unit>, <tokens/s>, <seconds>`` lines through a log
function (the runner's: stderr, like the suite's ``[1/18] ... done`` lines; none when the run is ``--quiet``),
at most one every ``every_s`` seconds plus the last, so a long ingest never looks hung.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import time
import weakref
from pathlib import Path
from typing import Any, Callable

CACHE_DIR = Path(".cache") / "ingest"  # under a run's --output directory
FORMAT = 1  # layout of an entry file; a different number is never trusted
_HEADER_KEY = "r3mem_bench_ingest"


def canonical(obj: Any) -> str:
    """Canonical JSON of ``obj`` (sorted keys, no spaces); TypeError names the part that is not JSON-able."""
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def digest(obj: Any) -> str:
    """SHA-256 hex of ``obj``: raw bytes, a string, or anything JSON-able (canonical JSON)."""
    if isinstance(obj, (bytes, bytearray, memoryview)):
        data = bytes(obj)
    elif isinstance(obj, str):
        data = obj.encode("utf-8")
    else:
        data = canonical(obj).encode("utf-8")
    return hashlib.sha256(data).hexdigest()


_MODEL_IDS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def model_id(lm) -> dict:
    """What identifies the base model's outputs: name, architecture, parameters, dtype, device type, a SHA-256
    of its weights (computed once per model object), a digest of its tokenizer (class, size, chat template,
    special tokens) and the torch and transformers versions (their kernels decide greedy ties)."""
    import torch

    model = lm.model
    weights = _MODEL_IDS.get(model)
    if weights is None:
        h = hashlib.sha256()
        with torch.no_grad():
            for name, t in sorted(model.state_dict().items()):
                t = t.detach().to("cpu").contiguous()
                h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
                h.update(t.view(torch.uint8).numpy().data if t.numel() else b"")
        weights = h.hexdigest()
        _MODEL_IDS[model] = weights
    import transformers

    info = getattr(lm, "info", {}) or {}
    tok = getattr(lm, "tokenizer", None)
    tokenizer = digest({"class": type(tok).__name__, "size": len(tok) if tok is not None else 0,
                        "chat_template": str(getattr(tok, "chat_template", None) or ""),
                        "special": sorted(map(str, getattr(tok, "all_special_tokens", []) or []))})
    return {"model": str(getattr(lm, "name", info.get("model", ""))), "architecture": info.get("architecture"),
            "parameters": info.get("parameters"), "dtype": info.get("dtype"),
            "device": getattr(getattr(lm, "device", None), "type", str(getattr(lm, "device", ""))),
            "weights": weights, "tokenizer": tokenizer,
            "torch": torch.__version__, "transformers": transformers.__version__}


def _tensors(payload) -> dict | None:
    """The payload as ``{name: tensor}`` when it is a tensor or a non-empty dict of tensors, else None."""
    import torch

    if isinstance(payload, torch.Tensor):
        return {"tensor": payload}
    if isinstance(payload, dict) and payload and all(isinstance(v, torch.Tensor) for v in payload.values()) \
            and all(isinstance(k, str) for k in payload):
        return payload
    return None


def _tensor_digest(tensors: dict) -> str:
    import torch

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().data if t.numel() else b"")
    return h.hexdigest()


KILL_AFTER_WRITES_ENV = "R3MEM_BENCH_KILL_AFTER_INGEST_WRITES"


def _kill_after_writes() -> int:
    """Test-only hook: SIGKILL this process right after its N-th ingest-cache write (crash tests of ingest)."""
    value = os.environ.get(KILL_AFTER_WRITES_ENV, "")
    return int(value) if value.isdigit() else 0


class IngestCache:
    """Get-or-compute store of ingest products under ``root`` (see the module docstring)."""

    def __init__(self, root, log: Callable[[str], None] | None = None):
        self.root = Path(root)
        self.log = log or (lambda msg: print(msg, file=sys.stderr))
        self.stats = {"hits": 0, "misses": 0, "invalid": 0, "writes": 0}
        self._write_failed = False

    @classmethod
    def for_run(cls, output, log: Callable[[str], None] | None = None) -> "IngestCache":
        """The cache of a run's ``--output`` directory (``<output>/.cache/ingest``)."""
        return cls(Path(output) / CACHE_DIR, log)

    # ---- keys and files --------------------------------------------------------------------------------------
    @staticmethod
    def key(kind: str, parts: dict) -> str:
        """The entry key of ``(kind, parts)``: SHA-256 of their canonical JSON with the format number."""
        if not isinstance(kind, str) or not kind or any(c in kind for c in "/\\."):
            raise ValueError(f"ingest cache kind {kind!r}: must be a non-empty name without '/', '\\' or '.'")
        if not isinstance(parts, dict):
            raise TypeError(f"ingest cache parts must be a dict, got {type(parts).__name__}")
        try:
            return digest({"format": FORMAT, "kind": kind, "parts": parts})
        except (TypeError, ValueError) as exc:
            raise TypeError(f"ingest cache parts of '{kind}' are not JSON-able ({exc})") from None

    def _path(self, kind: str, key: str, suffix: str) -> Path:
        return self.root / kind / key[:2] / f"{key}{suffix}"

    # ---- read ------------------------------------------------------------------------------------------------
    def get(self, kind: str, parts: dict):
        """The stored payload of ``(kind, parts)``, or None (missing, or invalid: counted and to be recomputed)."""
        key = self.key(kind, parts)
        want = json.loads(canonical(parts))  # parts as they read back from JSON (tuples become lists)
        for suffix, reader in ((".json", self._read_json), (".safetensors", self._read_tensors)):
            path = self._path(kind, key, suffix)
            if not path.is_file():
                continue
            try:
                payload = reader(path, kind, key, want)
            except Exception:  # noqa: BLE001 - anything unreadable is recomputed, never trusted
                payload = None
            if payload is None:
                self.stats["invalid"] += 1
                continue
            self.stats["hits"] += 1
            return payload
        self.stats["misses"] += 1
        return None

    def has(self, kind: str, parts: dict) -> bool:
        """Whether an entry file for ``(kind, parts)`` exists (not read or checked, not counted): for estimates."""
        key = self.key(kind, parts)
        return any(self._path(kind, key, suffix).is_file() for suffix in (".json", ".safetensors"))

    @staticmethod
    def _check_header(head: dict, kind: str, key: str, want: dict) -> bool:
        return (isinstance(head, dict) and head.get("format") == FORMAT and head.get("kind") == kind
                and head.get("key") == key and head.get("parts") == want)

    def _read_json(self, path: Path, kind: str, key: str, want: dict):
        doc = json.loads(path.read_text(encoding="utf-8"))
        if not self._check_header(doc, kind, key, want) or "payload" not in doc or doc["payload"] is None:
            return None
        if doc.get("payload_sha256") != digest(doc["payload"]):
            return None
        return doc["payload"]

    def _read_tensors(self, path: Path, kind: str, key: str, want: dict):
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            head = json.loads((fh.metadata() or {}).get(_HEADER_KEY, "null"))
            tensors = {name: fh.get_tensor(name) for name in fh.keys()}
        if not self._check_header(head, kind, key, want) or head.get("payload_sha256") != _tensor_digest(tensors):
            return None
        return tensors["tensor"] if head.get("single") else tensors

    # ---- write -----------------------------------------------------------------------------------------------
    def put(self, kind: str, parts: dict, payload) -> bool:
        """Store ``payload`` for ``(kind, parts)`` atomically; False (and one warning) when the disk refuses."""
        if payload is None:
            raise ValueError(f"ingest cache '{kind}': a payload of None cannot be stored")
        key = self.key(kind, parts)
        head = {"format": FORMAT, "kind": kind, "key": key, "parts": json.loads(canonical(parts)),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        tensors = _tensors(payload)
        try:
            if tensors is None:
                head["payload_sha256"] = digest(payload)  # TypeError here: the payload is not JSON-able
                data = (canonical({**head, "payload": payload}) + "\n").encode("utf-8")
                self._atomic(self._path(kind, key, ".json"), lambda fh: fh.write(data))
            else:
                from safetensors.torch import save

                cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
                head.update(payload_sha256=_tensor_digest(cpu), single=not isinstance(payload, dict))
                data = save(cpu, metadata={_HEADER_KEY: canonical(head)})
                self._atomic(self._path(kind, key, ".safetensors"), lambda fh: fh.write(data))
        except OSError as exc:
            if not self._write_failed:
                self._write_failed = True
                self.log(f"ingest cache {self.root}: cannot write ({exc.strerror or exc}); going on without caching")
            return False
        self.stats["writes"] += 1
        if self.stats["writes"] == _kill_after_writes():  # test-only hook (0, unset: never)
            import signal

            os.kill(os.getpid(), signal.SIGKILL)
        return True

    @staticmethod
    def _atomic(path: Path, write: Callable) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                write(fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    def get_or_compute(self, kind: str, parts: dict, compute: Callable[[], Any]):
        """The stored payload of ``(kind, parts)``, else ``compute()``'s, stored before it is returned."""
        payload = self.get(kind, parts)
        if payload is None:
            payload = compute()
            self.put(kind, parts, payload)
        return payload


class IngestProgress:
    """``<label>: [done/total] <unit>, <n> tok/s, <s> s`` lines for a long ingest step (see the module docstring)."""

    def __init__(self, label: str, total: int, unit: str, log: Callable[[str], None] | None,
                 every_s: float = 5.0, clock: Callable[[], float] = time.perf_counter):
        self.label, self.total, self.unit, self.log = label, total, unit, log
        self.every_s, self.clock = every_s, clock
        self.done = self.tokens = self.cached = 0
        self.t0 = clock()
        self._last = None

    def update(self, n: int = 1, tokens: int = 0, cached: int = 0, extra: str = "") -> None:
        """``n`` more units done (``cached`` of them read from the cache), ``tokens`` pushed through the model."""
        self.done += n
        self.tokens += tokens
        self.cached += cached
        now = self.clock()
        last = self.done >= self.total
        if self.log is None or (not last and self._last is not None and now - self._last < self.every_s):
            return
        self._last = now
        seconds = now - self.t0
        rate = f"{self.tokens / seconds:,.0f} tok/s" if self.tokens and seconds > 0 else "0 tok/s"
        cached_note = f", {self.cached} from cache" if self.cached else ""
        self.log(f"{self.label}: [{self.done}/{self.total}] {self.unit}{extra}{cached_note}, {rate}, "
                 f"{seconds:.1f} s")
