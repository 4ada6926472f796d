"""``r3mem-bench new-method NAME``: a small working memory method to start from, with its test and a suite config.

Writes ``NAME.py`` (a plugin: the ``MemoryMethod`` contract of ``r3mem_bench/method.py`` with a trivial but real
memory — the last ``window`` tokens for LM streams, the last ``max_items`` items for QA), ``test_NAME.py``
(pytest: the conformance checks and one behaviour test) and ``NAME_suite.yaml`` (NAME against ``no_memory`` and
``full_context``). ``trainable=True`` adds the interface of ``r3mem-bench train`` (``r3mem_bench/train.py``): a
trained logit bias, ``trainable_parameters``, ``training_losses``, ``save_checkpoint`` and ``load_checkpoint``.
Existing files are never overwritten.
"""

from __future__ import annotations

import importlib.util
import keyword
from pathlib import Path

from r3mem_bench.errors import UserError

METHOD = '''"""__NAME__: a memory method for r3mem-bench (a plugin, loaded with ``--method-path``).

Memory: for LM streams, the last ``window`` tokens (default 64) seen before each segment; for QA, the last
``max_items`` items (default 8) of the corpus or dialogue, given to the shared prompt as context.
Replace the bodies with your own memory; the contract is in ``r3mem_bench/method.py``.

    r3mem-bench check-method __NAME__ --method-path __NAME__.py
    r3mem-bench run --task lm --method __NAME__ --method-path __NAME__.py --model tiny-random --limit 1
    r3mem-bench suite __NAME___suite.yaml --output runs/__NAME__

Options come from ``--method-arg key=value`` (``window=128``, ``max_items=4``).
"""

from __future__ import annotations
__IMPORTS__
import torch

from r3mem_bench.method import Answer, MemoryItem, MemoryMethod, tensor_bytes
from r3mem_bench.methods.registry import register_method
from r3mem_bench.scoring import token_nll


@register_method
class __CLASS__(MemoryMethod):
    """Last ``window`` tokens (LM) / last ``max_items`` items (QA)."""

    name = "__NAME__"  # what --method and suite configs call it; must not clash with another method
    families = ("lm", "rag", "dialogue")  # the task families it supports: drop the ones you do not implement
    description = "last N tokens (LM) / last N items (QA)"  # shown by `r3mem-bench list`
__TRAINABLE_FLAG__
    def __init__(self, lm, options=None, generator=None, prompt=None):
        # Sets self.lm (model, tokenizer, prefix_token_id, device), self.options, self.generator, self.prompt
        # (QA only) and self.tokens_processed = 0.
        super().__init__(lm, options, generator, prompt)
        self.window = int(self.options.get("window", 64))
        self.max_items = int(self.options.get("max_items", 8))
__TRAINABLE_INIT__        self.reset()

    # ---- common: called by every family ------------------------------------------------------------------
    def reset(self) -> None:
        """Forget everything: called before each document (LM), corpus (rag) or conversation (dialogue)."""
        self.memory_ids = torch.empty(0, dtype=torch.long)  # LM: the last `window` token ids
        self.items: list[MemoryItem] = []  # QA: the last `max_items` items

    def state_bytes(self) -> int:
        """Bytes of memory state held now (tensors, stored text, indexes): the memory cost in reports."""
        return tensor_bytes(self.memory_ids) + sum(len(item.text.encode("utf-8")) for item in self.items)

    # ---- LM streams (family lm) --------------------------------------------------------------------------
    def _segment_logits(self, segment_ids: torch.Tensor) -> torch.Tensor:
        """Logits [1, S, V] predicting each token of the segment from [prefix token, memory, segment so far]."""
        prefix = torch.tensor([self.lm.prefix_token_id])  # the document prefix token predicts the first token
        ids = torch.cat([prefix, self.memory_ids, segment_ids]).unsqueeze(0).to(self.lm.device)
        with torch.no_grad():  # the base model stays frozen
            logits = self.lm.model(input_ids=ids).logits
        self.tokens_processed += ids.shape[1]  # count every token pushed through the base model
        start = ids.shape[1] - segment_ids.numel()
        return logits[:, start - 1: -1].float()__BIAS__

    def _absorb(self, segment_ids: torch.Tensor) -> None:
        """Update the memory with a segment that was just scored."""
        if self.window > 0:
            self.memory_ids = torch.cat([self.memory_ids, segment_ids.cpu()])[-self.window:]

    @torch.no_grad()
    def score_segment(self, segment_ids: torch.Tensor) -> torch.Tensor:
        """NLL (nats) of each token of ``segment_ids`` (LongTensor [S]) given the memory, then absorb it. -> [S].

        ``score_stream(segments)`` (inherited) calls this for each segment of a document in order; override it
        to batch a whole document at once.
        """
        logits = self._segment_logits(segment_ids)
        nll = token_nll(logits, segment_ids.unsqueeze(0).to(logits.device))[0].cpu()
        self._absorb(segment_ids)
        return nll

    # ---- QA (families rag and dialogue) --------------------------------------------------------------------
    def ingest(self, items) -> None:
        """Store corpus passages or dialogue turns (MemoryItem: id, text, timestamp, meta), in time order."""
        self.items = (self.items + list(items))[-self.max_items:] if self.max_items > 0 else []

    def retrieve(self, question: str, now: float | None = None) -> tuple[str, list[str]]:
        """Context text for the question and the ids of the items it came from.

        The inherited ``answer(question, now)`` formats the task's shared prompt with this context and
        generates with the shared generator (counting its tokens); override ``answer`` to answer another way
        (it must return an ``Answer``).
        """
        lines = [f"[{item.meta['date']}] {item.text}" if item.meta.get("date") else item.text for item in self.items]
        return "\\n".join(lines), [item.id for item in self.items]

    def answer(self, question: str, now: float | None = None) -> Answer:
        """Answer a question from memory (``now``: the question's time, dialogue). The default formats the shared
        prompt with ``retrieve``'s context and generates; return ``Answer(text, retrieved_ids, prompt_tokens)``."""
        return super().answer(question, now=now)
__TRAINABLE_METHODS__'''

TRAINABLE_INIT = '''        # Trained weights: a bias added to the base model's logits (the trainer seeds torch first).
        self.logit_bias = torch.nn.Parameter(torch.zeros(int(lm.model.config.vocab_size), device=lm.device))
        if self.options.get("checkpoint"):  # `run --checkpoint DIR` and `train --init-from` pass it
            self.load_checkpoint(self.options["checkpoint"])
'''

TRAINABLE_METHODS = '''
    # ---- training (r3mem-bench train --method __NAME__ --method-path __NAME__.py; see r3mem_bench/train.py) ----
    def trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        """Every tensor the optimizer updates, by a stable name (the names key the resume state)."""
        return {"logit_bias": self.logit_bias}

    def training_losses(self, segments: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Consecutive LongTensor [S] windows of one training document -> {"loss": minimised, others logged}."""
        self.reset()
        total, count = 0.0, 0
        for seg in segments:
            logits = self._segment_logits(seg)  # gradients reach logit_bias only
            nll = token_nll(logits, seg.unsqueeze(0).to(logits.device))
            total = total + nll.sum()
            count += nll.numel()
            self._absorb(seg)
        loss = total / max(1, count)
        return {"loss": loss, "nll": loss.detach()}

    def save_checkpoint(self, directory, meta: dict | None = None) -> None:
        """Write the weights (safetensors) and a JSON of the config plus the trainer's ``meta``."""
        from safetensors.torch import save_file

        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        save_file({"logit_bias": self.logit_bias.detach().cpu().contiguous()}, str(path / WEIGHTS))
        cfg = {"method": self.name, "base_model": self.lm.name, "window": self.window, **(meta or {})}
        (path / CONFIG).write_text(json.dumps(cfg, indent=2, default=str) + "\\n")

    def load_checkpoint(self, directory) -> None:
        """Load what ``save_checkpoint`` wrote; another base model or other shapes is a one-line UserError."""
        from safetensors.torch import load_file

        path = Path(directory)
        if not (path / CONFIG).is_file() or not (path / WEIGHTS).is_file():
            raise UserError(f"--checkpoint {path}: no {CONFIG} and {WEIGHTS} there; fix: give a directory written "
                            f"by `r3mem-bench train --method {self.name}`")
        cfg = json.loads((path / CONFIG).read_text())
        if cfg.get("base_model") != self.lm.name:
            raise UserError(f"--checkpoint {path}: trained on '{cfg.get('base_model')}', not '{self.lm.name}'; "
                            f"fix: run with --model {cfg.get('base_model')} or train for this model")
        bias = load_file(str(path / WEIGHTS)).get("logit_bias")
        if bias is None or bias.shape != self.logit_bias.shape:
            raise UserError(f"--checkpoint {path}: logit_bias has shape {None if bias is None else tuple(bias.shape)}, "
                            f"not {tuple(self.logit_bias.shape)}; fix: use a checkpoint of this base model")
        with torch.no_grad():
            self.logit_bias.copy_(bias.to(self.logit_bias.device))
'''

TEST = '''"""Tests of the __NAME__ memory method: `python -m pytest test___NAME__.py` (tiny-random, seconds)."""

import sys
from pathlib import Path

import pytest
import torch

from r3mem_bench.methods import get_method_class
from r3mem_bench.methods import load_method_paths

load_method_paths([str(Path(__file__).resolve().parent / "__NAME__.py")])


@pytest.fixture(scope="module")
def lm():
    from r3mem_bench.models import load_model

    return load_model("tiny-random", device="cpu")


def test_contract(lm):
    """The conformance checks of `r3mem-bench check-method __NAME__` (every family the method declares). Here the
    SIGKILL-resume check forks this process (fast); check-method starts fresh interpreters."""
    from r3mem_bench.conformance import run_checks

    processes = "fork" if sys.platform.startswith("linux") else "fresh"
    failed = [r.line() for r in run_checks("__NAME__", lm, processes=processes) if not r.ok]
    assert not failed, "\\n".join(failed)


def test_memory_keeps_the_last_window_tokens(lm):
    """Behaviour of the generated memory: replace this test when you replace the memory."""
    method = get_method_class("__NAME__")(lm, {"window": 8})
    method.reset()
    method.score_segment(torch.arange(100, 120))
    assert method.memory_ids.tolist() == list(range(112, 120))
    method.reset()
    assert method.memory_ids.numel() == 0 and method.state_bytes() == 0
'''

TRAINABLE_TEST = '''

def test_training_step_and_checkpoint_round_trip(lm, tmp_path):
    """One optimizer step moves the trained weights; save_checkpoint/load_checkpoint restore them exactly."""
    torch.manual_seed(0)
    method = get_method_class("__NAME__")(lm, {"for_training": True})
    params = method.trainable_parameters()
    opt = torch.optim.AdamW(list(params.values()), lr=1e-2)
    losses = method.training_losses(list(torch.arange(100, 148).split(16)))
    losses["loss"].backward()
    opt.step()
    assert params["logit_bias"].abs().sum() > 0
    method.save_checkpoint(tmp_path / "ckpt", {"step": 1})
    loaded = get_method_class("__NAME__")(lm, {"checkpoint": str(tmp_path / "ckpt")})
    assert torch.equal(loaded.logit_bias, method.logit_bias)
'''

SUITE = '''# __NAME__ against the no-memory floor and the full-context ceiling.
#   r3mem-bench suite __NAME___suite.yaml --output runs/__NAME__
# tiny-random runs in seconds (a wiring check); use model: smollm2-135m and a larger limit for real numbers.
suite: __NAME__
description: __NAME__ vs no_memory and full_context
model: tiny-random
seeds: [0]
limit: 2
threads: 1
reference: no_memory
method_path: [__NAME__.py]   # relative to this file
tasks:
  - {task: wikitext2, params: {segment_len: 64, max_tokens: 256}}
  - {task: needle, params: {max_new_tokens: 8}}
methods: [no_memory, full_context, __NAME__]
'''


def check_name(name: str) -> None:
    """Refuse a name that is not a plain identifier, shadows a module, or is already a registered method."""
    from r3mem_bench.methods import all_methods, method_source

    if not name.isidentifier() or keyword.iskeyword(name) or not name.isascii():
        raise UserError(f"new-method {name!r}: not a valid Python identifier; fix: use letters, digits and _ "
                        "(e.g. my_memory)")
    if name.startswith(("_", "test_")):
        raise UserError(f"new-method {name}: names starting with '_' or 'test_' are skipped in plugin folders; "
                        "fix: choose another name")
    methods = all_methods()
    if name in methods:
        raise UserError(f"new-method {name}: a method '{name}' already exists ({method_source(name)}); "
                        "fix: choose another name")
    if importlib.util.find_spec(name) is not None:
        raise UserError(f"new-method {name}: '{name}' is an importable Python module, so {name}.py would shadow it; "
                        f"fix: choose another name (e.g. my_{name})")


def render(name: str, trainable: bool) -> dict[str, str]:
    """File name -> text of the scaffold for ``name``."""
    cls = "".join(part.capitalize() for part in name.split("_") if part) or "Method"
    method = METHOD.replace("__TRAINABLE_FLAG__", "    trainable = True  # `r3mem-bench train` may train it\n"
                            if trainable else "")
    method = method.replace("__TRAINABLE_INIT__", TRAINABLE_INIT if trainable else "")
    method = method.replace("__BIAS__", " + self.logit_bias" if trainable else "")
    method = method.replace("__TRAINABLE_METHODS__", TRAINABLE_METHODS if trainable else "")
    imports = ("\nimport json\nfrom pathlib import Path\n" if trainable else "")
    method = method.replace("__IMPORTS__", imports)
    if trainable:
        method = method.replace("from r3mem_bench.method import", "from r3mem_bench.errors import UserError\n"
                                "from r3mem_bench.method import")
        method = method.replace("from r3mem_bench.scoring import token_nll\n", "from r3mem_bench.scoring import "
                                "token_nll\n\nWEIGHTS, CONFIG = \"__NAME__.safetensors\", \"__NAME__.json\"\n")
    test = TEST + (TRAINABLE_TEST if trainable else "")
    files = {f"{name}.py": method, f"test_{name}.py": test, f"{name}_suite.yaml": SUITE}
    return {f: text.replace("__CLASS__", cls).replace("__NAME__", name) for f, text in files.items()}


def write_scaffold(name: str, out: str | Path = ".", trainable: bool = False) -> list[Path]:
    """Write the scaffold of ``name`` into ``out``; refuses to overwrite any file. Returns the paths written."""
    check_name(name)
    root = Path(out)
    if root.exists() and not root.is_dir():
        raise UserError(f"--out {out}: is a file; fix: give a folder (created if missing)")
    files = render(name, trainable)
    existing = [str(root / f) for f in files if (root / f).exists()]
    if existing:
        raise UserError(f"new-method {name}: {existing[0]} already exists; fix: choose another --out or name "
                        "(existing files are never overwritten)")
    try:
        root.mkdir(parents=True, exist_ok=True)
        written = []
        for fname, text in files.items():
            path = root / fname
            with path.open("x", encoding="utf-8") as fh:
                fh.write(text)
            written.append(path)
    except OSError as exc:
        raise UserError(f"--out {out}: cannot write there ({exc.strerror}); fix: choose a writable folder") from None
    return written
