"""Every built-in method passes the conformance checks of ``r3mem-bench check-method`` (tiny-random)."""

from __future__ import annotations

import pytest

from r3mem_bench.conformance import run_checks
from r3mem_bench.methods import all_methods, method_source

R3 = {"untrained": True, "max_memory_tokens": 8, "memory_tokens": 4, "recon_max_tokens": 8}
RMT = {"untrained": True, "num_mem_tokens": 4}
OPTIONS = {"r3mem": R3, "r3mem_reset": R3, "r3mem_no_hier": R3, "r3mem_no_cycle": R3, "rmt": RMT, "rmt_reset": RMT,
           "memorybank": {"summary_tokens": 4}, "memorybank_noforget": {"summary_tokens": 4}}
BUILTINS = sorted(n for n in all_methods() if "built-in" in method_source(n))


def test_every_builtin_is_covered():
    assert {"no_memory", "full_context", "vector_rag", "memorybank", "rmt", "r3mem"} <= set(BUILTINS)
    assert set(OPTIONS) <= set(BUILTINS)


@pytest.mark.parametrize("name", BUILTINS + ["window@r3mem"])
def test_builtin_method_passes_every_check(tiny_lm, name):
    options = OPTIONS.get(name, R3 if name.startswith("window@") else {})
    results = run_checks(name, tiny_lm, dict(options))
    failed = [r.line() for r in results if not r.ok]
    assert results and not failed, failed
    assert any(r.name.startswith("lm: no future tokens leak") for r in results) or not any(
        r.name.startswith("lm:") for r in results)
