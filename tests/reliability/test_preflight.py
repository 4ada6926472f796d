"""Resource limits: a run that would exceed the model's context or the free memory is refused before it starts,
with the estimated tokens and bytes and the flag that fixes it; the estimate itself is checked against a
measured peak RSS."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from reliability_helpers import write_task

from r3mem_bench import runner
from r3mem_bench.errors import UserError


@pytest.fixture
def tasks(tmp_path, tiny_lm):
    """Three ~600-token documents."""
    return write_task(tmp_path / "data", docs=3, words=300)


def _cfg(tasks, tmp_path, methods, **over):
    return runner.RunConfig(tasks=["reltask"], methods=methods, model="tiny-random", include_paths=[str(tasks)],
                            output=str(tmp_path / "out"), threads=1, quiet=True, **over)


def test_forward_longer_than_the_context_is_refused(tmp_path):
    tasks = write_task(tmp_path / "long", docs=1, words=3000)  # one document of more than 4096 tokens
    with pytest.raises(UserError, match=r"would need 5001 tokens but the model's context is 4096.*--segment-len"):
        runner.run(_cfg(tasks, tmp_path, ["no_memory"], overrides={"segment_len": 5000, "max_tokens": 0},
                        method_options={"window": 0}))
    with pytest.raises(UserError, match=r"max_context=9000 exceeds the model's context of 4096"):
        runner.run(_cfg(tasks, tmp_path, ["full_context"], method_options={"max_context": 9000}))
    assert not list((tmp_path / "out").rglob("results.jsonl"))


def test_over_memory_is_refused_before_any_cell_starts(tasks, tmp_path, monkeypatch):
    """no_memory fits, full_context does not: nothing runs, not even the cell that fits."""
    monkeypatch.setattr(runner, "available_memory_bytes", lambda device: 100 * 2**20)
    with pytest.raises(UserError) as err:
        runner.run(_cfg(tasks, tmp_path, ["no_memory", "full_context"]))
    msg = str(err.value)
    assert "full_context" in msg and "estimated peak" in msg and "GiB" in msg and "--max-tokens" in msg
    assert "longest document" in msg
    assert not list((tmp_path / "out").rglob("results.jsonl"))
    dirs = runner.run(_cfg(tasks, tmp_path, ["no_memory", "full_context"], overrides={"max_tokens": 128}))
    assert len(dirs) == 2  # the suggested fix makes it fit


def test_preflight_numbers(tasks, tmp_path, tiny_lm):
    from r3mem_bench.families import get_family
    from r3mem_bench.methods import get_method_class
    from r3mem_bench.task import TaskRegistry

    task = TaskRegistry([str(tasks)]).resolve("reltask", {"segment_len": 64})[0]
    docs = get_family("lm").examples(task, None, tiny_lm.tokenizer)
    longest = max(len(tiny_lm.tokenizer(d["text"], add_special_tokens=False)["input_ids"]) for d in docs)
    assert runner.max_document_tokens(tiny_lm.tokenizer, docs) == longest
    assert runner.max_document_tokens(tiny_lm.tokenizer, docs, 100) == 100
    full = runner.preflight(tiny_lm, task, get_method_class("full_context")(tiny_lm, {}), docs)
    assert full["tokens"] == longest + 1 and full["batch"] == 1
    assert full["bytes"] == runner.estimate_forward_bytes(tiny_lm, longest + 1)
    window = runner.preflight(tiny_lm, task, get_method_class("no_memory")(tiny_lm, {"window": 32}), docs)
    assert window["tokens"] == 1 + 32 + 64 and window["batch"] == 4


MEASURE = """
import json, torch
torch.set_num_threads(1)
from r3mem_bench.models import load_model
from r3mem_bench.methods.reference import _batched_nll
from r3mem_bench.runner import estimate_forward_bytes
lm = load_model("tiny-random", device="cpu")
ids = torch.randint(0, 40000, (64,))
_batched_nll(lm, [(ids, 63)], 1)  # warm up allocator and kernels


def status(field):  # kB -> bytes
    line = next(x for x in open("/proc/self/status") if x.startswith(field + ":"))
    return int(line.split()[1]) * 1024


open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS: loading peaks drop out
before = status("VmRSS")
n = 3072
_batched_nll(lm, [(torch.randint(0, 40000, (n,)), n - 1)], 1)
after = status("VmHWM")
print(json.dumps({"measured": after - before, "estimate": estimate_forward_bytes(lm, n)}))
"""


def test_estimate_matches_a_measured_peak():
    """Peak RSS growth of one 3K-token forward pass is within 30% of the pre-flight estimate."""
    proc = subprocess.run([sys.executable, "-c", MEASURE], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert 0.7 <= got["measured"] / got["estimate"] <= 1.3, got
