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
  Then, for the first QA family declared (rag, else dialogue: both run the one QA protocol of
  ``QAFamily.evaluate``), answers do not read the gold answer (:func:`gold_checks`: that ``evaluate`` run twice, the
  second time with every gold answer replaced by a canary string: the same answers, retrieved ids, prompt tokens and
  NLL of each candidate text).
* trainable methods (``trainable = True``): the checkpoint round-trips (:func:`checkpoint_checks`); for the others
  this line is a SKIP (not applicable).
* last, for every method: the same numbers after a SIGKILL-resume (:func:`resume_checks`: ``r3mem-bench run`` on
  tiny tasks of the LM family and of one QA family, killed right after each cell's first row and rerun until done,
  gives rows equal, bit for bit except wall-clock times, to an uninterrupted run's). It is a SKIP when an earlier
  check failed.

Each check is a :class:`CheckResult`; an exception inside the method fails the check it happened in.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

FAMILIES = ("lm", "rag", "dialogue")
SEGMENT_LEN = 16
ATOL = 1e-4  # nats: the same document scored twice must agree this closely
PROCESSES = ("fresh", "fork")  # how the SIGKILL-resume check starts its runs


@dataclass
class CheckResult:
    """One check: its name, whether it held, and why not."""

    name: str
    ok: bool
    detail: str = ""
    skipped: bool = False  # not applicable (or not run): counts as no failure

    def line(self) -> str:
        """``PASS  name``, ``FAIL  name: detail`` or ``SKIP  name: why``."""
        head = "SKIP" if self.skipped else "PASS" if self.ok else "FAIL"
        return f"{head}  {self.name}" + (f": {self.detail}" if self.detail else "")


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


# ---- QA answers do not read the gold answer ----------------------------------------------------------------------
CANARY = "Ptarmigan 4471"  # replaces every gold answer in the second run of the gold check
GOLD_QUESTIONS = (("What is the capital of Zorbia?", "Quill", "Oster", "a0"),
                  ("What does Zorbia export?", "tin", "barley", "a2"))  # question, gold, distractor, evidence id


def _gold_rows(cls, lm, options: dict, family: str, canary: bool) -> dict[str, dict]:
    """Rows of the family's own ``evaluate`` on corpus A and two questions (golds replaced by ``CANARY`` when
    ``canary``); the method sees what a real run gives it, and nothing else differs between the two runs."""
    from r3mem_bench.backends import make_generator
    from r3mem_bench.families import get_family
    from r3mem_bench.generation import make_prompt
    from r3mem_bench.provenance import seed_everything
    from r3mem_bench.task import Task, TaskSpec

    fam = get_family(family)
    params = {**fam.default_params, "max_new_tokens": 8}
    questions = []
    for i, (question, gold, other, evidence) in enumerate(GOLD_QUESTIONS):
        now = 1_700_000_000.0 + 86400 * (7 + i) if family == "dialogue" else None
        questions.append({"id": f"{family}-q{i}", "question": question, "answers": [CANARY if canary else gold],
                          "corpus_id": f"{family}-a", "category": "single-hop", "gold_ids": [evidence],
                          "answerable": True, "now": now,
                          "candidates": [CANARY, gold, other] if canary else [gold, other, CANARY]})
    task = Task(TaskSpec(name=f"conformance_{family}", family=family, dataset={"loader": "conformance"}), params,
                data={"corpora": {f"{family}-a": _items(family, "a")}, "questions": list(questions)})
    seed_everything(0, f"conformance-{family}")  # both runs build the method from the same RNG state
    method = cls(lm, dict(options), generator=make_generator(lm, params, "hf"), prompt=make_prompt(params))
    rows: list[dict] = []
    fam.evaluate(task, method, list(questions), rows.append)
    return {r["id"]: r for r in rows}


def _same(a, b) -> bool:
    """Equal, with NaN equal to NaN."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


NLL_ATOL = 1e-4  # nats: float noise of scoring a candidate beside other texts in one pass is ~1e-6


def _close(a, b) -> bool:
    """Equal to ``NLL_ATOL`` (NaN equal to NaN)."""
    if _same(a, b):
        return True
    return isinstance(a, float) and isinstance(b, float) and abs(a - b) <= NLL_ATOL


def gold_checks(cls, lm, options: dict, family: str) -> list[CheckResult]:
    """QA answers do not read the gold answer: the family's ``evaluate`` (which passes each question's gold answer
    to ``answer_nll`` as the first text to score, and holds the question record, gold included, in its frames) is
    run twice on the same corpus and questions, the second time with every gold answer replaced by a canary string.
    The answers, retrieved ids and prompt tokens must be the same, and the NLL of each candidate text scored in both
    runs the same to ``NLL_ATOL`` nats: the candidates are scored together in one pass, so a candidate's last bits
    change with the texts beside it (what reading the gold answer would change is far larger).
    """
    name = f"{family}: answers do not read the gold answer (golds replaced by a canary: same answers, retrieved ids, " \
           "candidate NLLs)"
    try:
        real = _gold_rows(cls, lm, options, family, canary=False)
        fake = _gold_rows(cls, lm, options, family, canary=True)
    except Exception as exc:  # noqa: BLE001
        return [CheckResult(name, False, _error(exc))]
    for i, (_, gold, other, _) in enumerate(GOLD_QUESTIONS):
        qid = f"{family}-q{i}"
        a, b = real.get(qid), fake.get(qid)
        if a is None or b is None:
            return [CheckResult(name, False, f"question {qid!r} has no row (evaluate emitted {sorted(real)})")]
        nll_a = dict(zip(a.get("candidates") or [], a.get("candidate_nll") or []))
        nll_b = dict(zip(b.get("candidates") or [], b.get("candidate_nll") or []))
        diffs = [(field, a.get(field), b.get(field)) for field in ("prediction", "retrieved_ids", "prompt_tokens")]
        diffs.append(("whether candidates are scored", sorted(nll_a), sorted(nll_b)))
        nlls = [(f"NLL of the candidate {text!r}", nll_a[text], nll_b[text]) for text in (gold, other, CANARY)
                if text in nll_a and text in nll_b]
        for field, x, y in diffs + nlls:
            if not (_close(x, y) if field.startswith("NLL") else _same(x, y)):
                peek = " (it is the canary: the method answered with the gold answer)" \
                    if CANARY.lower() in str(b.get("prediction", "")).lower() else ""
                return [CheckResult(name, False, f"question {qid!r}: {field} changed when only its gold answer changed "
                                    f"({gold!r} -> {CANARY!r}): {x!r:.60} vs {y!r:.60}{peek}; a method must not read "
                                    "the gold answer (the texts answer_nll scores, or the caller's question record)")]
    return [CheckResult(name, True)]


# ---- trainable methods: the checkpoint round-trips ---------------------------------------------------------------
CHECKPOINT_NAME = "checkpoint round-trips (save_checkpoint, a fresh instance with checkpoint=DIR: same tensors, " \
                  "bitwise-identical NLLs)"


def _restored(saved: torch.Tensor, loaded: torch.Tensor) -> bool:
    """``loaded`` equals ``saved`` bit for bit, or ``saved`` rounded to float16/bfloat16 (a checkpoint may store
    weights in half precision, as R3Mem's ``save_dtype`` does)."""
    s, t = saved.detach().cpu(), loaded.detach().cpu()
    if s.shape != t.shape:
        return False
    if torch.equal(s.to(t.dtype), t):
        return True
    return s.is_floating_point() and any(torch.equal(s.to(dt).to(t.dtype), t) for dt in (torch.float16, torch.bfloat16))


def checkpoint_checks(cls, lm, options: dict, families: tuple[str, ...]) -> list[CheckResult]:
    """For a trainable method, as ``r3mem-bench train`` and ``run --checkpoint`` use it: an instance built for
    training (``for_training``, seeded) has every trainable tensor moved by seeded noise (so a tensor left at its
    initial value is caught) and is saved; a fresh instance built under another seed with ``checkpoint=DIR`` must
    hold every tensor bit for bit (or its half-precision rounding); it is saved again and a third fresh instance
    loading that must score an LM document with bitwise-identical NLLs. The loading instances get the run's options
    without ``untrained`` (which asks for fresh weights). Not applicable (SKIP) to other methods."""
    from r3mem_bench.method import FOR_TRAINING

    if not getattr(cls, "trainable", False):
        return [CheckResult(CHECKPOINT_NAME, True, "n/a: the method is not trainable", skipped=True)]
    missing = [m for m in ("trainable_parameters", "save_checkpoint", "load_checkpoint")
               if not callable(getattr(cls, m, None))]
    if missing:
        return [CheckResult(CHECKPOINT_NAME, False, f"trainable = True but it has no {', '.join(missing)}")]
    load_options = {k: v for k, v in options.items() if k != "untrained"}
    meta = {"training": {"step": 0, "note": "check-method checkpoint round trip"}}
    step = "building it for training"
    try:
        with tempfile.TemporaryDirectory(prefix="r3mem-check-ckpt-") as tmp:
            torch.manual_seed(1)
            trained = cls(lm, {**options, "segment_len": SEGMENT_LEN, "train_segments": 3, "train_steps": 1,
                               FOR_TRAINING: True})
            step = "moving its trainable tensors"
            gen = torch.Generator().manual_seed(2)
            with torch.no_grad():
                for _, p in sorted(trained.trainable_parameters().items()):
                    values = p.detach().float()  # noise on the tensor's own scale, far above half-precision steps
                    scale = max(float(values.abs().mean()), float(values.std()) if p.numel() > 1 else 0.0, 1e-2)
                    p.add_((torch.randn(p.shape, generator=gen) * 0.5 * scale).to(p.device, p.dtype))

            def round_trip(source, name: str, seed: int, which: str):
                """``source`` saved under ``name``, then a fresh instance built under ``seed`` that loads it."""
                nonlocal step
                step = f"save_checkpoint{which}"
                source.save_checkpoint(Path(tmp) / name, meta)
                step = f"a fresh instance with checkpoint=DIR{which}"
                torch.manual_seed(seed)
                return cls(lm, {**load_options, "checkpoint": str(Path(tmp) / name)})

            loaded = round_trip(trained, "first", 3, "")
            step = "comparing the tensors"
            saved, back = trained.trainable_parameters(), loaded.trainable_parameters()
            if sorted(saved) != sorted(back):
                lost = sorted(set(saved) ^ set(back))
                return [CheckResult(CHECKPOINT_NAME, False, f"the loaded instance's trainable tensors differ in name "
                                    f"from the saved one's ({lost[:3]})")]
            for n in sorted(saved):
                if not _restored(saved[n], back[n]):
                    diff = (saved[n].detach().cpu().float() - back[n].detach().cpu().float()).abs().max() \
                        if saved[n].shape == back[n].shape else "shape"
                    return [CheckResult(CHECKPOINT_NAME, False, f"tensor '{n}' is not restored by load_checkpoint (max "
                                        f"|difference| {float(diff) if diff != 'shape' else diff:.4g}): "
                                        "save_checkpoint/load_checkpoint lose it")]
            again = round_trip(loaded, "second", 4, " (second)")
            step = "scoring a document"
            if "lm" not in families:
                same = all(torch.equal(x.detach().cpu(), y.detach().cpu()) for x, y in zip(
                    (back[n] for n in sorted(back)), (again.trainable_parameters()[n] for n in sorted(back))))
                return [CheckResult(CHECKPOINT_NAME, same, "" if same else "a checkpoint saved by a loaded instance "
                                    "loads different tensors")]
            doc = _documents(lm)[0]
            scores = []
            for method in (loaded, again):
                method.begin("doc-a")
                method.reset()
                scores.append(torch.cat([x.detach().double().cpu().reshape(-1)
                                         for x in method.score_stream([s.clone() for s in doc])]))
    except Exception as exc:  # noqa: BLE001
        return [CheckResult(CHECKPOINT_NAME, False, f"{step}: {_error(exc)}")]
    same = scores[0].shape == scores[1].shape and torch.equal(scores[0], scores[1])
    moved = float((scores[0] - scores[1]).abs().max()) if scores[0].shape == scores[1].shape else math.inf
    return [CheckResult(CHECKPOINT_NAME, same, "" if same else f"NLLs moved by up to {moved:.4g} nats between an "
                        "instance and a fresh one loading its checkpoint: state outside the checkpoint (a tensor not "
                        "saved or not loaded, or one drawn at construction)")]


# ---- the same numbers after a SIGKILL-resume ---------------------------------------------------------------------
RESUME_NAME = "same numbers after a SIGKILL-resume"
TIMING_FIELDS = ("latency_s", "seconds_per_segment", "answer_s", "ingest_s", "likelihood_s")
_WORDS = ("harbor lantern meadow cipher granite orbit velvet tundra signal prism echo river quantum memory north "
          "copper willow amber falcon delta").split()


def _resume_tasks(root: Path, families: tuple[str, ...]) -> list[str]:
    """Tiny task YAMLs (and their data) under ``root/tasks``: 2 LM documents of 3 segments, a 3-paragraph SQuAD
    article with 2 questions, a 3-turn LoCoMo conversation with 2 questions; the names of those ``families`` needs."""
    tasks = root / "tasks"
    tasks.mkdir(parents=True)
    names = []
    if "lm" in families:
        docs = root / "docs.jsonl"
        docs.write_text("".join(json.dumps({"id": f"doc{d}", "text": " ".join(
            _WORDS[(d * 7 + 3 * i) % len(_WORDS)] for i in range(40)) + "."}) + "\n" for d in range(2)))
        spec = {"task": "conformance_lm", "family": "lm", "dataset": {"loader": "text_file", "path": str(docs)},
                "params": {"segment_len": SEGMENT_LEN, "max_tokens": 3 * SEGMENT_LEN}}
        (tasks / "conformance_lm.yaml").write_text(json.dumps(spec))
        names.append(spec["task"])
    facts = [it.text for it in _items("rag", "a")]
    if "rag" in families:
        qas = [[{"id": f"q{i}", "question": q, "answers": [{"text": gold, "answer_start": 0}]}]
               for i, (q, gold, _, _) in enumerate(GOLD_QUESTIONS)]
        paragraphs = [{"context": facts[0], "qas": qas[0]}, {"context": facts[1], "qas": []},
                      {"context": facts[2], "qas": qas[1]}]
        data = root / "squad.json"
        data.write_text(json.dumps({"version": "1.1", "data": [{"title": "Zorbia", "paragraphs": paragraphs}]}))
        spec = {"task": "conformance_rag", "family": "rag", "dataset": {"loader": "squad", "path": str(data)},
                "params": {"max_new_tokens": 8}}
        (tasks / "conformance_rag.yaml").write_text(json.dumps(spec))
        names.append(spec["task"])
    elif "dialogue" in families:
        turns = [{"speaker": "Ana", "dia_id": f"D1:{i + 1}", "text": text} for i, text in enumerate(facts)]
        qa = [{"question": q, "answer": gold, "category": 4, "evidence": [f"D1:{1 + 2 * i}"]}
              for i, (q, gold, _, _) in enumerate(GOLD_QUESTIONS)]
        data = root / "locomo.json"
        data.write_text(json.dumps([{"sample_id": "conv-1", "qa": qa, "conversation": {
            "speaker_a": "Ana", "speaker_b": "Ben", "session_1": turns,
            "session_1_date_time": "1:56 pm on 8 May, 2023"}}]))
        spec = {"task": "conformance_dialogue", "family": "dialogue",
                "dataset": {"loader": "locomo", "path": str(data)}, "params": {"max_new_tokens": 8}}
        (tasks / "conformance_dialogue.yaml").write_text(json.dumps(spec))
        names.append(spec["task"])
    return names


def _cli_child(argv: list[str], env: dict[str, str | None], log: str) -> None:
    """Body of a forked run: ``r3mem-bench ARGV`` with its output in ``log``."""
    for key, value in env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.argv = ["r3mem-bench", *argv]
    import runpy  # the program, run as `python -m r3mem_bench.cli` runs it (the checker does not import the CLI)

    runpy.run_module("r3mem_bench.cli", run_name="__main__", alter_sys=True)


class _Launch:
    """``r3mem-bench ARGV`` in a fresh interpreter or a fork of this process; ``wait()`` -> (exit code, log tail)."""

    def __init__(self, argv: list[str], env: dict[str, str | None], log: Path, processes: str):
        self.log = log
        if processes == "fork":
            import multiprocessing

            self.proc = multiprocessing.get_context("fork").Process(target=_cli_child, args=(argv, env, str(log)),
                                                                    daemon=True)
            self.proc.start()
        else:
            full = {k: v for k, v in {**os.environ, **env}.items() if v is not None}
            with open(log, "ab") as fh:
                self.proc = subprocess.Popen([sys.executable, "-m", "r3mem_bench.cli", *argv], env=full,
                                             stdout=fh, stderr=subprocess.STDOUT)

    def wait(self, timeout: float = 900) -> tuple[int | None, str]:
        if isinstance(self.proc, subprocess.Popen):
            try:
                code = self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                code = self.proc.wait()
        else:
            self.proc.join(timeout)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join()
            code = self.proc.exitcode
        lines = [ln.strip() for ln in self.log.read_text(errors="replace").splitlines() if ln.strip()]
        return code, lines[-1][:300] if lines else ""


def _stable_rows(out: Path) -> dict[tuple[str, str], dict]:
    """``{(cell, id): row without wall-clock fields}`` of every results file under ``out``."""
    from r3mem_bench.store import RESULTS, read_rows

    return {(str(p.parent.relative_to(out)), r["id"]): {k: v for k, v in r.items() if k not in TIMING_FIELDS}
            for p in sorted(out.rglob(RESULTS)) for r in read_rows(p)}


def _first_difference(a: dict, b: dict, prefix: str = "") -> tuple[str, Any, Any] | None:
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            found = _first_difference(x, y, f"{prefix}{key}.")
            if found:
                return found
        elif not _same(x, y):
            return f"{prefix}{key}", x, y
    return None


def resume_checks(name: str, lm, options: dict, families: tuple[str, ...], processes: str = "fresh") \
        -> list[CheckResult]:
    """The same numbers after a SIGKILL-resume, through the real CLI and runner: ``r3mem-bench run`` of the method on
    tiny tasks (LM when it declares ``lm``; ``rag``, else ``dialogue``) with ``--model`` the checks' model, one
    thread and the options as ``--method-arg``; once uninterrupted, and once with ``R3MEM_BENCH_KILL_AFTER_ROWS=1``
    (the runner SIGKILLs itself right after storing a cell's first row) rerun until it finishes, each rerun
    resuming the previous one's results. Both must end with the same rows, bit for bit except wall-clock times.
    ``processes``: ``fresh`` interpreters (also catches numbers that depend on the per-process string hash seed) or
    ``fork``s of this process (faster: no imports or model load)."""
    from r3mem_bench.runner import KILL_AFTER_ENV

    picked = tuple(f for f in ("lm",) if f in families) + tuple([f for f in ("rag", "dialogue") if f in families][:1])
    label = f"{RESUME_NAME} ({', '.join(picked)}: killed after each cell's first row and rerun; rows equal an " \
            "uninterrupted run's)"
    if processes not in PROCESSES:
        raise ValueError(f"processes={processes!r}: use one of {PROCESSES}")
    if not picked:
        return [CheckResult(label, True, "n/a: no family to run", skipped=True)]
    threads = torch.get_num_threads()
    if processes == "fork":
        torch.set_num_threads(1)  # no OpenMP pool in use across the fork
    try:
        with tempfile.TemporaryDirectory(prefix="r3mem-check-resume-") as tmp:
            root = Path(tmp)
            tasks = _resume_tasks(root, picked)
            args = [f"{k}={json.dumps(v)}" for k, v in sorted(options.items())]

            def argv(out: str) -> list[str]:
                return ["run", "--task", ",".join(tasks), "--include-path", str(root / "tasks"), "--method", name,
                        "--model", lm.name, "--output", str(root / out), "--threads", "1", "--seed", "0", "--quiet",
                        *[x for a in args for x in ("--method-arg", a)]]

            plain = {KILL_AFTER_ENV: None, "OMP_NUM_THREADS": "1"}
            killing = {**plain, KILL_AFTER_ENV: "1"}
            reference = _Launch(argv("uninterrupted"), plain, root / "uninterrupted.log", processes)
            if processes == "fork":  # one fork at a time; fresh interpreters start side by side
                ref_code, ref_tail = reference.wait()
            codes = []
            for _ in range(len(tasks) + 2):
                code, tail = _Launch(argv("resumed"), killing, root / "resumed.log", processes).wait()
                codes.append(code)
                if code != -9:
                    break
            if processes != "fork":
                ref_code, ref_tail = reference.wait()
            if ref_code != 0:
                hint = " (a method registered in this process only is unknown to a fresh interpreter: load it with " \
                       "--method-path or an entry point)" if "unknown method" in ref_tail else ""
                return [CheckResult(label, False, f"the uninterrupted run exited {ref_code}: {ref_tail}{hint}")]
            if codes[-1] != 0:
                return [CheckResult(label, False, f"a resumed run exited {codes[-1]} after {len(codes) - 1} kills: "
                                    f"{tail}")]
            if codes.count(-9) != len(tasks):
                return [CheckResult(label, False, f"expected {len(tasks)} kills (one per cell), got "
                                    f"{codes.count(-9)}: exit codes {codes}")]
            want, got = _stable_rows(root / "uninterrupted"), _stable_rows(root / "resumed")
    except Exception as exc:  # noqa: BLE001 - e.g. no fork on this platform, a results file that does not parse
        return [CheckResult(label, False, _error(exc))]
    finally:
        torch.set_num_threads(threads)
    if set(want) != set(got):
        return [CheckResult(label, False, f"rows differ: uninterrupted {sorted(want)[:4]}, resumed {sorted(got)[:4]}")]
    for key in sorted(want):
        found = _first_difference(want[key], got[key])
        if found:
            field, x, y = found
            return [CheckResult(label, False, f"{key[0]} row '{key[1]}': {field} is {x!r:.60} uninterrupted but "
                                f"{y!r:.60} after the kill and rerun: the numbers depend on the process (unseeded "
                                "randomness, the time, str hashes) or on what it ran before")]
    return [CheckResult(label, True)]


def run_checks(name: str, lm, options: dict | None = None, processes: str = "fresh") -> list[CheckResult]:
    """Every check of the registered method ``name`` for each family it declares, then the checkpoint round trip
    (trainable methods) and, when nothing failed, the SIGKILL-resume check (``processes``: see
    :func:`resume_checks`)."""
    from r3mem_bench.methods import get_method_class

    cls = get_method_class(name)
    options = dict(options or {})
    families = tuple(getattr(cls, "families", ()) or ())
    unknown = [f for f in families if f not in FAMILIES]
    out = [CheckResult("declares families", bool(families) and not unknown,
                       f"families = {families!r}; use some of {FAMILIES}" if unknown or not families else "")]
    if "lm" in families:
        out += lm_checks(cls, lm, options)
    for family in ("rag", "dialogue"):
        if family in families:
            out += qa_checks(cls, lm, options, family)
    qa = [f for f in ("rag", "dialogue") if f in families][:1]  # one QA protocol (QAFamily.evaluate) serves both
    if qa and all(r.ok for r in out if r.name.startswith(f"{qa[0]}:")):
        out += gold_checks(cls, lm, options, qa[0])
    elif qa:
        out.append(CheckResult(f"{qa[0]}: answers do not read the gold answer", True,
                               f"not run: fix the {qa[0]} failures above first", skipped=True))
    out += checkpoint_checks(cls, lm, options, families)
    if all(r.ok for r in out):
        out += resume_checks(name, lm, options, tuple(f for f in families if f in FAMILIES), processes)
    else:
        out.append(CheckResult(RESUME_NAME, True, "not run: fix the failures above first", skipped=True))
    return out
