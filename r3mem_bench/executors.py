"""Where a suite's cells run: in this process (``local``) or as Ray tasks (``ray``).

A cell is a JSON-able dict (one task entry x method x seed of a suite, see :mod:`r3mem_bench.suite`) and
:func:`run_cell` runs it through the one evaluate path (:func:`r3mem_bench.runner.run`). Results land in the
resumable store either way: a cell that crashes half way keeps its finished examples, and its rerun (a Ray retry
after a worker died, or the user's next ``suite`` command) does only the rest. When a cell finishes, a done
marker (``<output>/.suite/done/<key>.json``) lets later runs skip it without loading anything.

The Ray executor submits every cell as a task with the suite's CPU/GPU request and ``max_retries`` (retried only
when the worker process dies, never on a Python exception, which would fail the same way again); without
``--address`` it starts a local Ray cluster. Install Ray with ``pip install 'r3mem-bench[dist]'``.
"""

from __future__ import annotations

import importlib
import json
import os
import time
from pathlib import Path
from typing import Callable

from r3mem_bench.errors import UserError

DONE_DIR = Path(".suite") / "done"
FORWARDED_ENV = ("HF_", "TRANSFORMERS_", "TOKENIZERS_", "R3MEM", "PYTHONPATH", "XDG_CACHE_HOME")


def done_marker(cell: dict) -> Path:
    """The file that records a finished cell."""
    return Path(cell["suite_output"]) / DONE_DIR / f"{cell['key']}.json"


def is_done(cell: dict) -> bool:
    """Whether the cell finished in an earlier run: its done marker names the same cell and its rows are still there.

    The marker's run directories are re-rooted under this cell's output (a moved checkout still counts as done);
    a directory deleted or cut short since (e.g. to rerun a method with a retrained checkpoint) makes the cell
    run again.
    """
    from r3mem_bench.store import RESULTS, read_rows

    path = done_marker(cell)
    if not path.is_file():
        return False
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    if marker.get("key") != cell["key"]:
        return False
    root = Path(marker.get("cell", {}).get("output", cell["output"]))
    for run_dir, rows in marker.get("rows", {}).items():
        try:
            here = Path(cell["output"]) / Path(run_dir).relative_to(root)
        except ValueError:
            here = Path(run_dir)
        if not (here / RESULTS).is_file() or len(read_rows(here / RESULTS)) < rows:
            return False
    return True


def run_cell(cell: dict) -> dict:
    """Run one cell through ``runner.run`` and write its done marker; returns ``{key, dirs, rows, seconds}``."""
    from r3mem_bench.runner import RunConfig, run
    from r3mem_bench.store import RESULTS, atomic_write_text, read_rows

    for module in cell.get("imports", []):
        importlib.import_module(module)
    t0 = time.perf_counter()
    cfg = RunConfig(tasks=[cell["task"]], methods=[cell["method"]], model=cell["model"], limit=cell.get("limit"),
                    seed=cell["seed"], output=cell["output"], include_paths=cell.get("include_paths", []), data=cell.get("data"),
                    overrides=dict(cell.get("params", {})), method_options=dict(cell.get("args", {})),
                    checkpoint=cell.get("checkpoint"), backend=cell.get("backend", "auto"),
                    threads=cell.get("threads"), quiet=cell.get("quiet", True))
    dirs = run(cfg)
    result = {"key": cell["key"], "dirs": [str(d) for d in dirs],
              "rows": {str(d): len(read_rows(Path(d) / RESULTS)) for d in dirs},
              "seconds": round(time.perf_counter() - t0, 3)}
    atomic_write_text(done_marker(cell), json.dumps({**result, "cell": cell}, indent=2, sort_keys=True) + "\n")
    return result


Report = Callable[[dict, dict | None, BaseException | None], None]  # on_done(cell, result, error)


class LocalExecutor:
    """Cells one after another in this process (the model stays loaded between cells)."""

    name = "local"

    def map(self, cells: list[dict], on_done: Report) -> None:
        """Run each cell; ``on_done(cell, result, error)`` after each (a failed cell does not stop the others)."""
        for cell in cells:
            try:
                result = run_cell(cell)
            except KeyboardInterrupt:
                raise
            except Exception as exc:  # noqa: BLE001 - one broken cell must not end a long suite
                on_done(cell, None, exc)
            else:
                on_done(cell, result, None)


class RayExecutor:
    """Cells as Ray tasks on a cluster (``address``) or on a local one started here."""

    name = "ray"

    def __init__(self, address: str | None = None, max_retries: int = 3, num_cpus: int | None = None):
        try:
            import ray  # noqa: F401
        except ModuleNotFoundError:
            raise UserError("--executor ray: Ray is not installed; fix: pip install 'r3mem-bench[dist]' "
                            "(or pip install ray)") from None
        self.address = address
        self.max_retries = max_retries
        self.num_cpus = num_cpus

    def _init(self) -> bool:
        """Connect to (or start) the cluster; True when this executor started it."""
        import ray

        if ray.is_initialized():
            return False
        env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV)}
        kwargs = {"runtime_env": {"env_vars": env}, "include_dashboard": False, "log_to_driver": False,
                  "configure_logging": False}
        try:
            if self.address:
                ray.init(address=self.address, **kwargs)
            else:
                ray.init(num_cpus=self.num_cpus, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            where = self.address or "a local cluster"
            raise UserError(f"--executor ray: cannot start or reach {where} ({str(exc).splitlines()[0][:160]}); "
                            "fix: check --address (e.g. ray://host:10001 or auto) or omit it") from None
        return True

    def map(self, cells: list[dict], on_done: Report) -> None:
        """Submit every cell, then report each as it finishes (crashed workers are retried by Ray)."""
        import ray
        from ray.exceptions import RayTaskError, WorkerCrashedError

        started = self._init()
        try:
            refs = {}
            for cell in cells:
                res = cell.get("resources", {})
                task = ray.remote(run_cell).options(num_cpus=res.get("num_cpus", 1), num_gpus=res.get("num_gpus", 0),
                                                    max_retries=self.max_retries, retry_exceptions=False,
                                                    name=f"r3mem-bench:{cell['key']}")
                refs[task.remote(cell)] = cell
            pending = list(refs)
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                cell = refs[ready[0]]
                try:
                    on_done(cell, ray.get(ready[0]), None)
                except RayTaskError as exc:
                    cause = exc.cause if isinstance(getattr(exc, "cause", None), BaseException) else exc
                    on_done(cell, None, cause)
                except WorkerCrashedError as exc:
                    on_done(cell, None, UserError(f"worker crashed {self.max_retries + 1} times ({exc}); "
                                                  "fix: rerun the suite, finished examples are kept"))
        finally:
            if started:
                ray.shutdown()


def make_executor(name: str, address: str | None = None, max_retries: int = 3, num_cpus: int | None = None):
    """The executor called ``name`` (local or ray)."""
    if name == "local":
        if address:
            raise UserError("--address needs --executor ray; fix: add --executor ray or drop --address")
        return LocalExecutor()
    if name == "ray":
        return RayExecutor(address, max_retries, num_cpus)
    raise UserError(f"--executor {name}: unknown; fix: use local or ray")
