"""The shipped R3Mem, RMT, ICAE and Beacon checkpoints reproduce committed README numbers (the held-out
WikiText-2 run).

``results/r3mem/heldout`` holds the rows behind the README's table "What each trained memory adds, against every
control" (SmolLM2-135M, 128-token segments, 1,024 tokens per article). This test scores the first two articles
again with the shipped checkpoints, through the LM family's own protocol and the task parameters the committed
manifest records, and compares each document's perplexities with the committed rows to the printed digits.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from r3mem_bench.families import get_family
from r3mem_bench.methods import get_method_class
from r3mem_bench.task import TaskRegistry

HELDOUT = Path(__file__).resolve().parents[1] / "results" / "r3mem" / "heldout" / "wikitext2"


@pytest.mark.parametrize("method", ["r3mem", "rmt", "icae", "beacon"])
def test_shipped_checkpoint_reproduces_committed_heldout_rows(smollm2, method):
    manifest = json.loads((HELDOUT / method / "manifest.json").read_text())
    committed = [json.loads(line) for line in (HELDOUT / method / "results.jsonl").read_text().splitlines()][:2]
    (task,) = TaskRegistry().resolve("wikitext2", dict(manifest["config"]["task"]["params"]))
    fam = get_family("lm")
    by_id = {d["id"]: d for d in fam.examples(task, None, smollm2.tokenizer)}
    threads = torch.get_num_threads()
    torch.set_num_threads(int(manifest["machine"]["torch_threads"]))  # the committed run's thread count
    try:
        m = get_method_class(method)(smollm2, {})
        rows = []
        fam.evaluate(task, m, [by_id[r["id"]] for r in committed], rows.append)
    finally:
        torch.set_num_threads(threads)
    for got, want in zip(rows, committed):
        assert got["segment_tokens"] == want["segment_tokens"]
        for metric in ("ppl", "ppl_after_first"):  # the README prints two decimals
            assert round(got["metrics"][metric], 2) == round(want["metrics"][metric], 2), (got["id"], metric)
