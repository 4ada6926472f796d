"""Every built-in method passes the conformance checks of ``r3mem-bench check-method`` (tiny-random)."""

from __future__ import annotations

import pytest

from r3mem_bench.conformance import gold_checks, run_checks
from r3mem_bench.methods import all_methods, get_method_class, method_source
from r3mem_bench.methods.reference import NoMemory

R3 = {"untrained": True, "max_memory_tokens": 8, "memory_tokens": 4, "recon_max_tokens": 8}
RMT = {"untrained": True, "num_mem_tokens": 4}
OPTIONS = {"r3mem": R3, "r3mem_kv": R3, "r3mem_reset": R3, "r3mem_no_hier": R3, "r3mem_no_cycle": R3, "r3mem_no_recon": R3, "rmt": RMT, "rmt_reset": RMT,
           "icae": RMT, "icae_reset": RMT, "beacon": {"untrained": True}, "beacon_reset": {"untrained": True},
           "memorybank": {"summary_tokens": 4}, "memorybank_noforget": {"summary_tokens": 4}}
BUILTINS = sorted(n for n in all_methods() if "built-in" in method_source(n))


def test_every_builtin_is_covered():
    assert {"no_memory", "full_context", "vector_rag", "memorybank", "rmt", "r3mem"} <= set(BUILTINS)
    assert set(OPTIONS) <= set(BUILTINS)


@pytest.mark.parametrize("name", BUILTINS + ["window@r3mem"])
def test_builtin_method_passes_every_check(tiny_lm, name):
    options = OPTIONS.get(name, R3 if name.startswith("window@") else {})
    results = run_checks(name, tiny_lm, dict(options), processes="fork")
    failed = [r.line() for r in results if not r.ok]
    assert results and not failed, failed
    lines = {r.name.split(" (")[0]: r for r in results}
    assert not lines["same numbers after a SIGKILL-resume"].skipped  # it ran, and held
    assert lines["checkpoint round-trips"].skipped != get_method_class(name).trainable
    assert any(r.name.startswith("lm: no future tokens leak") for r in results) or not any(
        r.name.startswith("lm:") for r in results)


class _FavoursFirstText(NoMemory):
    """Scores the first text it is asked about (the gold answer, in the QA protocol) as certain: not registered."""

    name = "favours_first_text"

    def answer_nll(self, question, texts, now=None, given=None):
        out = super().answer_nll(question, texts, now=now, given=given)
        if out is not None and out.nll:
            out.nll[0] = 0.0
        return out


def test_gold_check_catches_a_method_that_favours_the_gold_text(tiny_lm):
    [honest] = gold_checks(NoMemory, tiny_lm, {}, "dialogue")
    assert honest.ok and honest.name.startswith("dialogue: answers do not read the gold answer"), honest.line()
    [cheat] = gold_checks(_FavoursFirstText, tiny_lm, {}, "dialogue")
    assert not cheat.ok
    assert "question 'dialogue-q0': NLL of the candidate 'Quill' changed when only its gold answer" in cheat.detail
