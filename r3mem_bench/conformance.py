"""Conformance checks of a memory method against the ``MemoryMethod`` contract (``r3mem-bench check-method``).

The method is driven as its families' protocols drive it, on tiny generated inputs, for each family it declares:

* ``lm``: it builds; it scores a document of three segments (``begin``, ``reset``, ``score_stream``); one NLL per
  token of each segment; the NLLs are finite and non-negative; ``tokens_processed`` grows; ``state_bytes()`` is a
  non-negative int; ``reset()`` makes documents independent (document A, then B, then A again: A's NLLs are the
  same both times); no future tokens leak into a segment's score (A's first two segments score the same when its
  last segment is replaced by other tokens).
* ``rag`` / ``dialogue``: it builds with the shared generator and prompt; ``ingest`` then ``answer`` return an
  :class:`Answer` (text and retrieved ids); ``tokens_processed`` grows; ``state_bytes()`` is a non-negative int;
  ``reset()`` makes corpora / conversations independent (A, then B, then A again: the same answer and ids).

Each check is a :class:`CheckResult`; an exception inside the method fails the check it happened in.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable

import torch

FAMILIES = ("lm", "rag", "dialogue")
SEGMENT_LEN = 16
ATOL = 1e-4  # nats: the same document scored twice must agree this closely


@dataclass
class CheckResult:
    """One check: its name, whether it held, and why not."""

    name: str
    ok: bool
    detail: str = ""

    def line(self) -> str:
        """``PASS  name`` or ``FAIL  name: detail``."""
        return f"{'PASS' if self.ok else 'FAIL'}  {self.name}" + (f": {self.detail}" if self.detail else "")


def _error(exc: BaseException) -> str:
    from r3mem_bench.plugins import last_line

    return f"raised {last_line(exc)}"


def _attempt(out: list[CheckResult], name: str, fn: Callable[[], Any]) -> tuple[bool, Any]:
    """Run ``fn`` as the check ``name``: PASS when it returns, FAIL naming the exception when it raises."""
    try:
        value = fn()
    except Exception as exc:  # noqa: BLE001 - a method's bug is a failed check, not a crash
        out.append(CheckResult(name, False, _error(exc)))
        return False, None
    out.append(CheckResult(name, True))
    return True, value


def _state_bytes(method) -> tuple[bool, str]:
    value = method.state_bytes()
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 0
    return ok, "" if ok else f"returned {value!r} ({type(value).__name__})"


def _documents(lm, seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Two different documents of three segments of ``SEGMENT_LEN`` ordinary token ids each."""
    gen = torch.Generator().manual_seed(seed)
    high = min(int(lm.model.config.vocab_size), 5000)
    docs = [torch.randint(100, high, (3 * SEGMENT_LEN,), generator=gen) for _ in range(2)]
    return [list(d.split(SEGMENT_LEN)) for d in docs]


def lm_checks(cls, lm, options: dict) -> list[CheckResult]:
    """The LM-stream checks (see the module docstring)."""
    out: list[CheckResult] = []
    ok, method = _attempt(out, "lm: builds", lambda: cls(lm, dict(options)))
    if not ok:
        return out
    doc_a, doc_b = _documents(lm)

    def stream(doc: list[torch.Tensor], key: str) -> list[torch.Tensor]:
        method.begin(key)
        method.reset()
        return method.score_stream([s.clone() for s in doc])

    before = method.tokens_processed
    ok, first = _attempt(out, "lm: scores a document (reset, score_stream)", lambda: stream(doc_a, "doc-a"))
    if not ok:
        return out
    shapes = [tuple(x.shape) if torch.is_tensor(x) else type(x).__name__ for x in (first or [])]
    want = [(s.numel(),) for s in doc_a]
    shape_ok = isinstance(first, list) and shapes == want
    out.append(CheckResult("lm: one NLL per token", shape_ok,
                           "" if shape_ok else f"got {shapes} for segments of {[w[0] for w in want]} tokens"))
    if not shape_ok:
        return out
    values = torch.cat([x.detach().double().cpu().reshape(-1) for x in first])
    finite = bool(torch.isfinite(values).all()) and float(values.min()) >= -1e-5
    out.append(CheckResult("lm: NLLs are finite and non-negative", finite,
                           "" if finite else f"min {float(values.min()):.4g}, non-finite "
                           f"{int((~torch.isfinite(values)).sum())} of {values.numel()}"))
    grew = method.tokens_processed > before
    out.append(CheckResult("lm: tokens_processed grows", grew,
                           "" if grew else f"still {method.tokens_processed} after scoring a document"))
    ok, state = _attempt(out, "lm: state_bytes() is a non-negative int", lambda: _state_bytes(method))
    if ok and not state[0]:
        out[-1] = CheckResult(out[-1].name, False, state[1])
    name = "lm: reset() makes documents independent (A, B, then A again: same NLLs)"
    try:
        stream(doc_b, "doc-b")
        again = stream(doc_a, "doc-a")
        second = torch.cat([x.detach().double().cpu().reshape(-1) for x in again])
    except Exception as exc:  # noqa: BLE001
        out.append(CheckResult(name, False, _error(exc)))
        return out
    same = second.shape == values.shape and bool(torch.allclose(second, values, atol=ATOL, rtol=0))
    diff = float((second - values).abs().max()) if second.shape == values.shape else math.inf
    out.append(CheckResult(name, same, "" if same else f"A's NLLs moved by up to {diff:.4g} nats after B: "
                           "reset() keeps state"))
    name = "lm: no future tokens leak (A with another last segment: the first two segments score the same)"
    try:
        altered = stream(doc_a[:2] + [doc_b[2]], "doc-a")
        early, early_altered = (torch.cat([x.detach().double().cpu().reshape(-1) for x in d[:2]])
                                for d in (first, altered))
    except Exception as exc:  # noqa: BLE001
        out.append(CheckResult(name, False, _error(exc)))
        return out
    same = bool(torch.allclose(early_altered, early, atol=ATOL, rtol=0))
    moved = float((early_altered - early).abs().max())
    out.append(CheckResult(name, same, "" if same else f"earlier segments' NLLs moved by up to {moved:.4g} nats "
                           "when only a later segment changed: a score reads tokens after it"))
    return out


def _items(family: str, tag: str):
    from r3mem_bench.method import MemoryItem

    facts = {"a": ["The capital of Zorbia is Quill.", "Quill lies on the river Mend.", "Zorbia exports tin."],
             "b": ["The capital of Varnia is Oster.", "Oster has a glass tower.", "Varnia grows barley."]}[tag]
    items = []
    for i, text in enumerate(facts):
        if family == "dialogue":
            ts = 1_700_000_000.0 + 86400 * i
            items.append(MemoryItem(id=f"{tag}{i}", text=f"user: {text}", timestamp=ts,
                                    meta={"date": f"2023-11-{14 + i}", "speaker": "user", "session": 1}))
        else:
            items.append(MemoryItem(id=f"{tag}{i}", text=text))
    return items


def qa_checks(cls, lm, options: dict, family: str) -> list[CheckResult]:
    """The QA checks for ``family`` (rag or dialogue; see the module docstring)."""
    from r3mem_bench.backends import make_generator
    from r3mem_bench.generation import make_prompt
    from r3mem_bench.method import Answer

    out: list[CheckResult] = []
    params = {"max_new_tokens": 8}
    ok, method = _attempt(out, f"{family}: builds", lambda: cls(lm, dict(options), generator=make_generator(
        lm, params, "hf"), prompt=make_prompt(params)))
    if not ok:
        return out
    question = "What is the capital of Zorbia?"
    now = 1_700_000_000.0 + 86400 * 7 if family == "dialogue" else None

    def session(tag: str):
        method.begin(f"{family}-{tag}")
        method.reset()
        method.ingest(_items(family, tag))
        return method.answer(question, now=now)

    before = method.tokens_processed
    ok, first = _attempt(out, f"{family}: ingest then answer", lambda: session("a"))
    if not ok:
        return out
    is_answer = (isinstance(first, Answer) and isinstance(first.text, str) and isinstance(first.retrieved_ids, list)
                 and all(isinstance(i, str) for i in first.retrieved_ids))
    out.append(CheckResult(f"{family}: answer() returns an Answer", is_answer,
                           "" if is_answer else f"got {first!r:.120}"))
    grew = method.tokens_processed > before
    out.append(CheckResult(f"{family}: tokens_processed grows", grew,
                           "" if grew else f"still {method.tokens_processed} after ingest and answer"))
    ok, state = _attempt(out, f"{family}: state_bytes() is a non-negative int", lambda: _state_bytes(method))
    if ok and not state[0]:
        out[-1] = CheckResult(out[-1].name, False, state[1])
    if not is_answer:
        return out
    name = f"{family}: reset() makes histories independent (A, B, then A again: same answer)"
    try:
        session("b")
        again = session("a")
    except Exception as exc:  # noqa: BLE001
        out.append(CheckResult(name, False, _error(exc)))
        return out
    same = isinstance(again, Answer) and (again.text, again.retrieved_ids) == (first.text, first.retrieved_ids)
    out.append(CheckResult(name, same, "" if same else f"first {(first.text, first.retrieved_ids)!r:.80}, after "
                           f"B {(getattr(again, 'text', again), getattr(again, 'retrieved_ids', None))!r:.80}"))
    return out


def run_checks(name: str, lm, options: dict | None = None) -> list[CheckResult]:
    """Every check of the registered method ``name`` for each family it declares."""
    from r3mem_bench.methods import get_method_class

    cls = get_method_class(name)
    families = tuple(getattr(cls, "families", ()) or ())
    unknown = [f for f in families if f not in FAMILIES]
    out = [CheckResult("declares families", bool(families) and not unknown,
                       f"families = {families!r}; use some of {FAMILIES}" if unknown or not families else "")]
    if "lm" in families:
        out += lm_checks(cls, lm, options or {})
    for family in ("rag", "dialogue"):
        if family in families:
            out += qa_checks(cls, lm, options or {}, family)
    return out
