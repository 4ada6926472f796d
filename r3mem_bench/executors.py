"""Where a suite's cells run: in this process (``local``) or as Ray tasks (``ray``).

A cell is a JSON-able dict (one task entry x method x seed of a suite, see :mod:`r3mem_bench.suite`) and
:func:`run_cell` runs it through the one evaluate path (:func:`r3mem_bench.runner.run`). Results land in the
resumable store: a local cell that crashes half way keeps its finished examples, and its rerun does only the rest.
When a cell finishes, a done marker (``<output>/.suite/done/<key>.json``) lets later runs skip it without loading
anything.

The Ray executor needs no disk shared between the driver and the workers: each cell goes to a worker with the
files the driver already holds for it (a resumed cell's finished rows), runs in a private directory there
(:func:`run_cell_detached`), and returns its run directories' files; the driver writes them and the done marker.
Tasks carry the suite's CPU/GPU request. A worker process that dies is retried by Ray (``max_retries``); any other
Ray failure of a cell (a lost node or object, a runtime-environment error) is resubmitted by the driver up to
``max_retries`` times and then reported as that cell's failure; a Python exception inside the cell is reported
at once (it would fail the same way again). Without ``--address`` it starts a local Ray cluster; with one, the
package is built into a wheel and shipped to the workers (``runtime_env``; their Python needs the project's
dependencies). Install Ray with ``pip install 'r3mem-bench[dist]'``.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import tempfile
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


def _run_config(cell: dict):
    """The ``RunConfig`` of a cell (its plugin modules imported first)."""
    from r3mem_bench.runner import RunConfig

    for module in cell.get("imports", []):
        importlib.import_module(module)
    return RunConfig(tasks=[cell["task"]], methods=[cell["method"]], model=cell["model"], limit=cell.get("limit"),
                     seed=cell["seed"], output=cell["output"], include_paths=cell.get("include_paths", []),
                     data=cell.get("data"), overrides=dict(cell.get("params", {})),
                     method_options=dict(cell.get("args", {})), checkpoint=cell.get("checkpoint"),
                     backend=cell.get("backend", "auto"), threads=cell.get("threads"), quiet=cell.get("quiet", True))


def _write_done(cell: dict, dirs: list[Path], seconds: float) -> dict:
    """Write the cell's done marker; returns ``{key, dirs, rows, seconds}``."""
    from r3mem_bench.store import RESULTS, atomic_write_text, read_rows

    result = {"key": cell["key"], "dirs": [str(d) for d in dirs],
              "rows": {str(d): len(read_rows(Path(d) / RESULTS)) for d in dirs}, "seconds": round(seconds, 3)}
    atomic_write_text(done_marker(cell), json.dumps({**result, "cell": cell}, indent=2, sort_keys=True) + "\n")
    return result


def run_cell(cell: dict) -> dict:
    """Run one cell through ``runner.run`` and write its done marker; returns ``{key, dirs, rows, seconds}``."""
    from r3mem_bench.runner import run

    t0 = time.perf_counter()
    dirs = run(_run_config(cell))
    return _write_done(cell, dirs, time.perf_counter() - t0)


def cell_files(cell: dict) -> dict[str, bytes]:
    """The files of the cell's run directories (path relative to the cell's ``output`` -> bytes; locks left out)."""
    from r3mem_bench.runner import cell_dir, plan

    root = Path(cell["output"])
    files = {}
    for task, method in plan(_run_config(cell)):
        folder = cell_dir(cell["output"], task, method)
        if folder.is_dir():
            for f in sorted(folder.iterdir()):
                if f.is_file() and not f.name.endswith(".lock"):
                    files[f.relative_to(root).as_posix()] = f.read_bytes()
    return files


def run_cell_detached(cell: dict, files: dict[str, bytes]) -> dict:
    """Run ``cell`` in a private directory of this process, seeded with ``files`` (what the driver holds of it),
    and return ``{"dirs": [relative], "files": {relative: bytes}, "seconds", "where"}``: nothing is written
    where the driver reads."""
    with tempfile.TemporaryDirectory(prefix="r3mem-bench-cell-") as tmp:
        local = {**cell, "output": str(Path(tmp) / "out"), "suite_output": str(Path(tmp) / "suite")}
        for rel, data in files.items():
            path = Path(local["output"]) / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        result = run_cell(local)
        return {"dirs": [Path(d).relative_to(local["output"]).as_posix() for d in result["dirs"]],
                "files": cell_files(local), "seconds": result["seconds"], "where": tmp}


def land(cell: dict, payload: dict) -> dict:
    """Write what :func:`run_cell_detached` returned under the cell's ``output`` (each file atomically), then its
    done marker; returns what ``run_cell`` returns."""
    from r3mem_bench.store import atomic_write_bytes

    root = Path(cell["output"])
    for rel, data in payload["files"].items():
        atomic_write_bytes(root / rel, data)
    return _write_done(cell, [root / d for d in payload["dirs"]], payload["seconds"])


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

    def runtime_env(self, wheel_dir: str | None = None) -> dict:
        """Environment variables forwarded to workers and, on a cluster (``address``), this package as a wheel."""
        env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV)}
        out: dict = {"env_vars": env}
        if self.address and wheel_dir:
            wheel = package_wheel(wheel_dir)
            if wheel:
                out["py_modules"] = [wheel]
        return out

    def _init(self, wheel_dir: str) -> bool:
        """Connect to (or start) the cluster; True when this executor started it."""
        import ray

        if ray.is_initialized():
            return False
        kwargs = {"runtime_env": self.runtime_env(wheel_dir), "include_dashboard": False, "log_to_driver": False,
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
        """Submit every cell, then land and report each as it finishes."""
        import ray
        from ray.exceptions import RayError, RayTaskError, WorkerCrashedError

        with tempfile.TemporaryDirectory(prefix="r3mem-bench-wheel-") as wheel_dir:
            started = self._init(wheel_dir)
            try:
                refs: dict = {}
                tries: dict[str, int] = {}

                def submit(cell: dict) -> None:
                    res = cell.get("resources", {})
                    task = ray.remote(run_cell_detached).options(
                        num_cpus=res.get("num_cpus", 1), num_gpus=res.get("num_gpus", 0), max_retries=self.max_retries,
                        retry_exceptions=False, name=f"r3mem-bench:{cell['key']}")
                    tries[cell["key"]] = tries.get(cell["key"], 0) + 1
                    refs[task.remote(cell, cell_files(cell))] = cell

                for cell in cells:
                    submit(cell)
                while refs:
                    ready, _ = ray.wait(list(refs), num_returns=1)
                    cell = refs.pop(ready[0])
                    try:
                        payload = ray.get(ready[0])
                    except RayTaskError as exc:  # the cell's own Python exception: it would fail again
                        cause = exc.cause if isinstance(getattr(exc, "cause", None), BaseException) else exc
                        on_done(cell, None, cause)
                        continue
                    except WorkerCrashedError as exc:  # Ray already retried the dead worker max_retries times
                        on_done(cell, None, UserError(f"worker crashed {self.max_retries + 1} times ({exc}); "
                                                      "fix: rerun the suite, finished cells are kept"))
                        continue
                    except RayError as exc:  # lost node or object, runtime_env failure...: resubmit, bounded
                        if tries[cell["key"]] <= self.max_retries:
                            submit(cell)
                        else:
                            first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
                            on_done(cell, None, UserError(f"Ray failed this cell {tries[cell['key']]} times "
                                                          f"({type(exc).__name__}: {first}); fix: check the cluster, "
                                                          "then rerun the suite"))
                        continue
                    on_done(cell, land(cell, payload), None)
            finally:
                if started:
                    ray.shutdown()


def package_wheel(folder: str) -> str | None:
    """A wheel of this package built from its source tree (for ``runtime_env``), or None when it is installed
    from elsewhere (then the cluster's workers must have it installed)."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "pyproject.toml").is_file():
        return None
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", folder, str(root)], capture_output=True, text=True)
    wheels = sorted(Path(folder).glob("r3mem_bench-*.whl"))
    if proc.returncode != 0 or not wheels:
        raise UserError(f"--executor ray --address: could not build this package's wheel for the workers "
                        f"({(proc.stderr.strip().splitlines() or ['pip wheel failed'])[-1][:160]}); fix: install "
                        "r3mem-bench on every node, or install 'wheel' and 'setuptools' here")
    return str(wheels[-1])


def make_executor(name: str, address: str | None = None, max_retries: int = 3, num_cpus: int | None = None):
    """The executor called ``name`` (local or ray)."""
    if name == "local":
        if address:
            raise UserError("--address needs --executor ray; fix: add --executor ray or drop --address")
        return LocalExecutor()
    if name == "ray":
        return RayExecutor(address, max_retries, num_cpus)
    raise UserError(f"--executor {name}: unknown; fix: use local or ray")
