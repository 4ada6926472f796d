"""Peak resident memory of a small run per method: one ``r3mem-bench run`` subprocess per method, its peak RSS
read from ``os.wait4`` (the child's own ``ru_maxrss``), next to a baseline process that only loads the model.

Each method runs the LM task (WikiText-2, ``--limit`` articles cut to ``--max-tokens``) when it applies to LM and
the needle RAG task (one corpus, ``--questions`` questions) when it applies to RAG, one process per task; a
method's peak is the larger of the two. Trainable
methods use their shipped checkpoint for the model and fall back to ``untrained=true`` when there is none.

    nice -n 10 python benchmarks/peak_rss.py                         # SmolLM2-135M
    nice -n 10 python benchmarks/peak_rss.py --model tiny-random --methods no_memory,full_context --out /tmp/p.json
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import wait_child, write_result

BASELINE = ("import torch; torch.set_num_threads({threads}); from r3mem_bench.models import load_model; "
            "load_model({model!r})")


def measure(cmd: list[str], timeout: float) -> dict:
    """Run ``cmd``; its exit code, wall seconds, peak RSS (bytes) and the last stderr line."""
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        status, usage, _ = wait_child(proc, timeout)
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        tail = err.read().decode("utf-8", "replace").strip().splitlines()
    return {"returncode": proc.returncode, "seconds": time.perf_counter() - t0,
            "peak_rss_bytes": usage.ru_maxrss * 1024, "stderr_tail": tail[-1][:300] if tail else ""}


def payload(args, base: dict, rows: dict) -> dict:
    """The JSON body: settings, the model-only baseline and one entry per measured method."""
    return {"model": args.model, "threads": args.threads, "limit": args.limit, "max_tokens": args.max_tokens,
            "questions": args.questions, "baseline": base, "methods": rows,
            "notes": "peak RSS = ru_maxrss of each child from os.wait4, one child per (method, task)."}


def plot_bars(path: Path, title: str, values: dict[str, float], baseline: float) -> None:
    """Horizontal bars of MiB per method with the model-only baseline as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 0.4 * len(values) + 1.2))
    ax.barh(list(values), list(values.values()))
    ax.axvline(baseline, color="k", linestyle="--", linewidth=1)
    ax.set_xlabel("peak RSS (MiB)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Measure every method and write results/benchmarks/peak_rss.json (+ peak_rss.png)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--methods", default="", help="comma separated (default: all registered)")
    ap.add_argument("--limit", type=int, default=1)
    ap.add_argument("--max-tokens", type=int, default=1024)
    ap.add_argument("--questions", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=240)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    from r3mem_bench.methods import all_methods

    classes = all_methods()
    names = [m for m in args.methods.split(",") if m] or list(classes)
    base = measure([sys.executable, "-c", BASELINE.format(threads=args.threads, model=args.model)], args.timeout)
    print(f"baseline (model only): {base['peak_rss_bytes'] / 2**20:,.0f} MiB", flush=True)
    rows = {}
    with tempfile.TemporaryDirectory(prefix="r3mem-bench-rss-") as tmp:
        for name in names:
            fams = classes[name].families
            tasks = [t for t, f in (("wikitext2", "lm"), ("needle", "rag")) if f in fams]
            if not tasks:
                continue
            per_task = {}
            for task in tasks:
                extra = (["--limit", str(args.limit), "--max-tokens", str(args.max_tokens)] if task == "wikitext2"
                         else ["--limit", str(args.questions), "--param", "n_corpora=1"])
                cmd = [sys.executable, "-m", "r3mem_bench.cli", "run", "--task", task, "--method", name,
                       "--model", args.model, *extra, "--threads", str(args.threads), "--quiet",
                       "--output", str(Path(tmp) / name)]
                one = measure(cmd, args.timeout)
                if one["returncode"] == 2 and classes[name].trainable:
                    one = measure(cmd + ["--method-arg", "untrained=true"], args.timeout) | {"untrained": True}
                per_task[task] = one
            worst = max(per_task.values(), key=lambda r: (r["returncode"] != 0, r["peak_rss_bytes"]))
            got = {"returncode": max(r["returncode"] for r in per_task.values()),
                   "peak_rss_bytes": max(r["peak_rss_bytes"] for r in per_task.values()),
                   "seconds": sum(r["seconds"] for r in per_task.values()),
                   "untrained": any(r.get("untrained") for r in per_task.values()),
                   "stderr_tail": worst["stderr_tail"], "per_task": per_task}
            got["tasks"] = tasks
            got["peak_rss_over_baseline_bytes"] = got["peak_rss_bytes"] - base["peak_rss_bytes"]
            rows[name] = got
            write_result("peak_rss", payload(args, base, rows), args.out)  # partial results survive an interruption
            print(f"{name:16s} rc={got['returncode']} {got['peak_rss_bytes'] / 2**20:8,.0f} MiB peak "
                  f"(+{got['peak_rss_over_baseline_bytes'] / 2**20:,.0f} MiB over the model) in {got['seconds']:.0f} s"
                  f"{'  untrained' if got.get('untrained') else ''}  {got['stderr_tail'] if got['returncode'] else ''}",
                  flush=True)
    path = write_result("peak_rss", payload(args, base, rows), args.out)
    ok = {n: r for n, r in rows.items() if r["returncode"] == 0}
    plot_bars(path.with_suffix(".png"), f"Peak RSS per method ({args.model}; line: model only)",
              {n: r["peak_rss_bytes"] / 2**20 for n, r in ok.items()}, base["peak_rss_bytes"] / 2**20)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
