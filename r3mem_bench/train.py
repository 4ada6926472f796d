"""``r3mem-bench train``: one generic, resumable, deterministic training loop for every trainable memory method.

Interface a method implements to be trained (R3Mem in ``r3mem_bench/r3mem/``, RMT in ``baselines/rmt.py``)
-----------------------------------------------------------------------------------------------------------
A ``MemoryMethod`` subclass with ``trainable = True`` and:

* ``__init__(lm, options)`` builds its trainable tensors from ``torch``'s global RNG; the trainer seeds it with
  ``torch.manual_seed(seed)`` just before, so a seed gives the same initial weights. ``options`` holds the
  ``--method-arg`` values plus ``segment_len`` (tokens per segment), ``train_segments`` (segments per sample)
  and ``train_steps`` (the run's total steps, e.g. for an in-method curriculum); the trainer also sets
  ``options["for_training"]``, which the base class pops into ``self.for_training``: only then may a method
  start from fresh weights instead of loading its shipped checkpoint.
* ``trainable_parameters() -> dict[str, torch.nn.Parameter]``: every tensor the optimizer updates, by a stable
  name (the names key the resume state). Everything else must have ``requires_grad=False``.
* ``param_groups(lr: float) -> list[dict]`` (optional): optimizer groups ``{"params": [...], "lr": float}`` for
  per-group learning rates (e.g. memory slots faster than adapters); the default is one group at ``lr``.
  The trainer scales every group's ``lr`` by the schedule (linear warmup, then cosine to 10%).
* ``training_losses(segments: list[torch.Tensor]) -> dict[str, torch.Tensor]``: ``segments`` are consecutive
  LongTensor [S] token windows of one training document (no special tokens); return scalars, the one under
  ``"loss"`` is minimised, the others are logged (detach them or not: the trainer only reads ``.item()``).
  Draw any randomness from ``torch``'s global RNG: the trainer reseeds it from (seed, step, micro-batch).
* ``train(flag: bool)`` (optional): switch dropout etc.; called with ``True`` before the loop.
* ``save_checkpoint(dir: Path, meta: dict) -> None``: write the method's weights (safetensors) and a JSON with
  its config plus ``meta`` (training data description, step, loss curve, command) into ``dir``.
* ``load_checkpoint(dir: Path) -> None``: load them back; a checkpoint for another base model or with other
  shapes raises ``UserError``. ``run --method NAME --checkpoint DIR`` passes ``options["checkpoint"] = DIR``.

What the trainer does
---------------------
* Data (``--data-mix``, default ``wiki_train*2+pydoc_train+shakespeare``; ``--task`` is a synonym): documents from corpora a
  user can obtain, disjoint from every evaluation split. ``shakespeare`` is the bundled tinyshakespeare,
  ``pydoc_train`` the train split of ``pydoc_data.topics`` (``families.lm.load_pydoc``), ``wiki_train`` the
  bundled Wikipedia paragraphs of HotpotQA/MuSiQue train (``data/build_wiki_train.py``: 13-gram and title
  decontamination); ``--data FILE`` adds a .txt/.jsonl file. The evaluation sets (``wikitext2``,
  ``pydoc_heldout``) are refused by name.
  Each micro-batch picks a corpus (equal weights unless ``name*w``), a document and a window of ``segments x segment_len`` tokens
  with a NumPy generator seeded by (seed, step, micro-batch): the data of step k never depends on a restart.
* Optimisation: AdamW (weight decay 0) over ``param_groups``, gradient accumulation (``--grad-accum``), gradient
  clipping at 1.0, warmup + cosine schedule computed from the step number.
* Checkpoints (``--checkpoint-every K``): ``DIR/resume/`` holds the fp32 trainable tensors, the AdamW moments
  and ``trainer.json`` (step, loss history), written to a temporary directory and renamed, so a SIGKILL at any
  moment leaves the previous complete state. Rerunning the same command resumes from it and, on the same
  machine and thread count, ends with bit-identical weights to an uninterrupted run. Rerunning with another
  ``--steps`` also resumes (the schedule is recomputed for the new budget; the change is recorded). At the end the method's
  ``save_checkpoint(DIR, meta)`` writes the shipped files and ``resume/`` is removed (``--keep-resume``
  keeps it). Rerunning a finished training does nothing.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import typer

from r3mem_bench.errors import UserError
from r3mem_bench.method import FOR_TRAINING

CORPORA = {
    "shakespeare": "bundled tinyshakespeare (r3mem_bench/data/tinyshakespeare.txt.gz), 20K-char chunks",
    "pydoc_train": "train split of Python's pydoc_data.topics (families.lm.load_pydoc split=train)",
    "wiki_train": "bundled Wikipedia paragraphs of HotpotQA + MuSiQue train, one document per question, "
                  "decontaminated against WikiText-2 test and SQuAD dev (r3mem_bench/data/wiki_train.jsonl.gz)",
}
DEFAULT_MIX = "wiki_train*2+pydoc_train+shakespeare"  # the data of the shipped checkpoints
RESUME_FREE = ("output", "threads", "steps", "checkpoint_every")
PRECISIONS = ("fp32", "bf16")  # may change between a kill and a rerun
EVAL_SPLITS = {"wikitext2", "wikitext2_test", "pydoc_heldout", "heldout", "pydoc"}


@dataclass
class TrainConfig:
    """Everything a training run depends on (recorded in the checkpoint JSON)."""

    method: str
    model: str = "smollm2-135m"
    data_mix: str = DEFAULT_MIX
    data: Optional[str] = None
    steps: int = 100
    output: str = "results/checkpoints/run"
    segment_len: int = 128
    segments: int = 3
    grad_accum: int = 1
    micro_batch: int = 1
    precision: str = "fp32"
    compile: bool = False
    lr: float = 1e-3
    warmup: int = 20
    checkpoint_every: int = 25
    seed: int = 0
    threads: Optional[int] = None
    method_options: dict = field(default_factory=dict)
    init_from: Optional[str] = None


def load_corpus(name: str, data: str | None = None) -> list[dict]:
    """Documents ``[{"id", "text"}]`` of a training corpus (never an evaluation split)."""
    from r3mem_bench.families.lm import load_bundled, load_pydoc, load_text_file

    if name in EVAL_SPLITS:
        raise UserError(f"training corpus '{name}' is an evaluation split; fix: train on "
                        f"{' + '.join(CORPORA)} or your own --data file")
    if name == "shakespeare":
        return load_bundled({"name": "tinyshakespeare", "doc_chars": 20000}, None)
    if name == "pydoc_train":
        return load_pydoc({"split": "train", "doc_chars": 20000}, None)
    if name == "wiki_train":
        from r3mem_bench.data import bundled_jsonl
        return bundled_jsonl("wiki_train")
    if name == "file":
        return load_text_file({}, data)
    raise UserError(f"unknown training corpus '{name}'; fix: use {'+'.join(CORPORA)} (any subset) or --data FILE")


def parse_mix(mix: str) -> tuple[list[str], list[float]]:
    """Corpus names and sampling weights of ``--data-mix`` (``wiki_train*2+pydoc_train``: weights 2 and 1)."""
    names, weights = [], []
    for part in (p.strip() for p in mix.split("+")):
        if not part:
            continue
        name, _, weight = part.partition("*")
        try:
            w = float(weight) if weight else 1.0
        except ValueError:
            w = -1.0
        if not w > 0:
            raise UserError(f"--data-mix '{part}': weight must be a positive number; fix: e.g. {name.strip()}*2")
        names.append(name.strip())
        weights.append(w)
    return names, weights


class TrainingData:
    """Token windows of ``segments x segment_len`` drawn deterministically from a mix of corpora."""

    def __init__(self, mix: str, tokenizer, segment_len: int, segments: int, data: str | None = None):
        names, weights = parse_mix(mix)
        if data:
            names.append("file")
            weights.append(1.0)
        if not names:
            raise UserError(f"--data-mix is empty; fix: e.g. --data-mix {DEFAULT_MIX}")
        self.weights = np.asarray(weights) / sum(weights)
        self.weighted = len(set(weights)) > 1  # uniform mixes keep the draw earlier checkpoints were trained with
        self.segment_len, self.segments = segment_len, segments
        self.window = segment_len * segments
        self.corpora: list[tuple[str, list[list[int]]]] = []
        for name in names:
            docs = load_corpus(name, data)
            ids = [tokenizer(d["text"], add_special_tokens=False)["input_ids"] for d in docs]
            ids = [x for x in ids if len(x) >= self.window]
            if not ids:
                raise UserError(f"corpus '{name}' has no document of {self.window} tokens; fix: lower "
                                "--segment-len or --segments")
            self.corpora.append((name, ids))
        self.description = {
            "mix": names, "segment_len": segment_len, "segments": segments,
            "corpora": {n: {"documents": len(d), "tokens": int(sum(len(x) for x in d)),
                            "source": CORPORA.get(n, data)} for n, d in self.corpora},
            "sampling": "corpus uniformly, then document uniformly, then a uniform window start",
        }
        if self.weighted:
            self.description["sampling"] = "corpus by weight, then document uniformly, then a uniform window start"
            self.description["weights"] = dict(zip(names, self.weights.round(4).tolist()))

    def sample(self, seed: int, step: int, micro: int) -> list[torch.Tensor]:
        """The segments of micro-batch ``micro`` of step ``step``: LongTensor [segment_len] each."""
        rng = np.random.default_rng([seed, step, micro])
        if self.weighted:
            _, docs = self.corpora[int(rng.choice(len(self.corpora), p=self.weights))]
        else:
            _, docs = self.corpora[int(rng.integers(len(self.corpora)))]
        doc = docs[int(rng.integers(len(docs)))]
        start = int(rng.integers(len(doc) - self.window + 1))
        window = torch.tensor(doc[start: start + self.window], dtype=torch.long)
        return list(window.split(self.segment_len))

    def batch(self, seed: int, step: int, micro: int, size: int) -> list[torch.Tensor]:
        """``size`` samples for one forward pass: LongTensor [S] segments when ``size`` is 1, else [size, S].

        Sample j of micro-batch ``micro`` is draw ``micro * size + j`` of the step, so ``size=1`` draws exactly
        what ``sample`` draws."""
        if size == 1:
            return self.sample(seed, step, micro)
        draws = [self.sample(seed, step, micro * size + j) for j in range(size)]
        return [torch.stack(parts) for parts in zip(*draws)]


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Schedule factor at 0-based ``step``: linear warmup, then cosine decay to 0.1."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# ---- resume state ------------------------------------------------------------------------------------------
def _save_resume(root: Path, params: dict[str, torch.nn.Parameter], opt: torch.optim.Optimizer,
                 state: dict) -> None:
    """Write params + AdamW moments + trainer JSON to ``root/resume`` atomically."""
    from safetensors.torch import save_file

    index = {id(p): name for name, p in params.items()}
    tensors = {f"param/{n}": p.detach().clone().contiguous() for n, p in params.items()}
    for p, st in opt.state.items():
        for key, value in st.items():
            if torch.is_tensor(value):
                tensors[f"opt/{key}/{index[id(p)]}"] = value.detach().clone().contiguous().reshape(value.shape)
    tmp = root / "resume.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "state.safetensors"))
    (tmp / "trainer.json").write_text(json.dumps(state, indent=1) + "\n")
    old = root / "resume.old"
    final = root / "resume"
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        final.rename(old)
    tmp.rename(final)
    if old.exists():
        shutil.rmtree(old)


def _load_resume(root: Path, params: dict[str, torch.nn.Parameter], opt: torch.optim.Optimizer) -> dict | None:
    """Restore params and AdamW moments from ``root/resume`` (or ``resume.old`` after a kill mid-rename)."""
    from safetensors.torch import load_file

    for name in ("resume", "resume.old"):
        where = root / name
        if (where / "trainer.json").exists() and (where / "state.safetensors").exists():
            break
    else:
        return None
    tensors = load_file(str(where / "state.safetensors"))
    missing = [n for n in params if f"param/{n}" not in tensors]
    if missing:
        raise UserError(f"{where}: resume state lacks '{missing[0]}' (another method or options); fix: use "
                        "another --output, or delete that directory to start over")
    with torch.no_grad():
        for n, p in params.items():
            src = tensors[f"param/{n}"]
            if src.shape != p.shape:
                raise UserError(f"{where}: '{n}' has shape {tuple(src.shape)}, expected {tuple(p.shape)}; "
                                "fix: use another --output or delete it")
            p.copy_(src)
    for group in opt.param_groups:
        for p in group["params"]:
            name = next(n for n, q in params.items() if q is p)
            st = {key.split("/")[1]: t for key, t in tensors.items()
                  if key.startswith("opt/") and key.split("/", 2)[2] == name}
            if st:
                opt.state[p] = st
    return json.loads((where / "trainer.json").read_text())


def _config_for_check(cfg: TrainConfig) -> dict:
    """The parts of the config that must match to resume (not output, threads, checkpoint interval, step budget;
    ``compile`` only when on, so runs recorded before the option existed still match)."""
    return {k: v for k, v in asdict(cfg).items() if k not in RESUME_FREE and not (k == "compile" and not v)}


# ---- the loop ----------------------------------------------------------------------------------------------
def train(cfg: TrainConfig, stop_after: int | None = None, quiet: bool = False, keep_resume: bool = False) -> Path:
    """Train ``cfg.method`` and write its checkpoint to ``cfg.output``; ``stop_after`` ends early (tests)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    from r3mem_bench.methods import get_method_class
    from r3mem_bench.models import load_model

    if min(cfg.steps, cfg.grad_accum, cfg.micro_batch, cfg.segments, cfg.segment_len) <= 0:
        raise UserError("--steps, --grad-accum, --micro-batch, --segments and --segment-len must be positive")
    if cfg.precision not in PRECISIONS:
        raise UserError(f"--precision {cfg.precision}: unknown; fix: use one of {', '.join(PRECISIONS)}")
    cls = get_method_class(cfg.method)
    if not getattr(cls, "trainable", False):
        raise UserError(f"method '{cfg.method}' has nothing to train; fix: train r3mem or rmt (trainable methods)")
    if cfg.micro_batch > 1 and not getattr(cls, "batched_training", False):
        raise UserError(f"--micro-batch {cfg.micro_batch}: method '{cfg.method}' trains one sample per pass; fix: "
                        "use --micro-batch 1 with --grad-accum for a larger batch")
    if cfg.compile and not hasattr(cls, "compile_for_training"):
        raise UserError(f"--compile: method '{cfg.method}' has no compiled training path; fix: drop --compile "
                        "(methods with one: rmt)")
    root = Path(cfg.output)
    root.mkdir(parents=True, exist_ok=True)
    done_file = root / "train_done.json"
    if done_file.exists():
        done = json.loads(done_file.read_text())
        if done.get("config") != _config_for_check(cfg):
            raise UserError(f"{root}: holds a finished training with another config; fix: use another --output")
        if done["step"] != cfg.steps:
            raise UserError(f"{root}: training finished at step {done['step']} (optimizer state removed); fix: use "
                            "another --output to train a different number of steps")
        if not quiet:
            typer.echo(f"{root}: training already finished at step {done['step']}; nothing to do")
        return root

    lm = load_model(cfg.model, threads=cfg.threads)
    data = TrainingData(cfg.data_mix, lm.tokenizer, cfg.segment_len, cfg.segments, cfg.data)
    options = {**cfg.method_options, "segment_len": cfg.segment_len, "train_segments": cfg.segments,
               "train_steps": cfg.steps, FOR_TRAINING: True}
    torch.manual_seed(cfg.seed)
    method = cls(lm, options)
    method.seed = cfg.seed
    init_meta = _init_from(method, cfg.init_from) if cfg.init_from else None
    params = method.trainable_parameters()
    if not params:
        raise UserError(f"method '{cfg.method}' exposes no trainable parameters")
    groups = method.param_groups(cfg.lr) if hasattr(method, "param_groups") else [
        {"params": list(params.values()), "lr": cfg.lr}]
    for g in groups:
        g["base_lr"] = g["lr"]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=0.0)

    state = _load_resume(root, params, opt) or {"step": 0, "history": [], "config": _config_for_check(cfg),
                                                 "seconds": 0.0}
    state.setdefault("steps", state["config"].get("steps", cfg.steps))
    state["config"] = {k: v for k, v in state["config"].items() if k not in RESUME_FREE}
    if state["config"] != _config_for_check(cfg):
        raise UserError(f"{root}: resume state was written by another config; fix: rerun the same command, use "
                        "another --output, or delete that directory")
    if state["steps"] != cfg.steps:
        typer.echo(f"note: resuming at step {state['step']} with --steps {cfg.steps} (was {state['steps']}): the "
                   "learning-rate schedule is recomputed for the new budget", err=True)
        state.setdefault("steps_changes", []).append({"at_step": state["step"], "from": state["steps"], "to": cfg.steps})
    state["steps"] = cfg.steps
    if state["step"] > cfg.steps:  # == : killed after the last step's state was saved; finish writing it below
        raise UserError(f"{root}: resume state is at step {state['step']} > --steps {cfg.steps}; fix: raise --steps")
    if hasattr(method, "train"):
        method.train(True)
    precision = bf16_training(method) if cfg.precision == "bf16" else contextlib.nullcontext
    if cfg.compile:
        method.compile_for_training()  # compiles on the first step (its seconds count in the step's)
    state.setdefault("cpu_seconds", 0.0)
    step = state["step"]
    log_path = root / "train_log.jsonl"
    if log_path.exists():  # drop steps logged after the last checkpoint by a killed run: they are redone
        kept = [line for line in log_path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        log_path.write_text("".join(line + "\n" for line in kept))
    log = log_path.open("a", encoding="utf-8")
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    columns = [TextColumn("train {task.fields[name]}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[losses]}"), TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, disable=quiet) as bar:
        job = bar.add_task("", total=cfg.steps, completed=step, name=cfg.method, losses="")
        while step < end:
            t0, c0 = time.perf_counter(), time.process_time()
            factor = lr_at(step, cfg)
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * factor
            opt.zero_grad(set_to_none=True)
            sums: dict[str, float] = {}
            for micro in range(cfg.grad_accum):
                segments = data.batch(cfg.seed, step, micro, cfg.micro_batch)
                torch.manual_seed((cfg.seed * 1_000_003 + step * 101 + micro) % (2**31 - 1))
                method.train_step = step  # 0-based step, for step-dependent schedules (RMT's curriculum)
                with precision():
                    losses = method.training_losses(segments)
                (losses["loss"] / cfg.grad_accum).backward()
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach()) / cfg.grad_accum
            grad_norm = torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
            opt.step()
            step += 1
            elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
            state["seconds"] += elapsed
            state["cpu_seconds"] += cpu
            record = {"step": step, "lr_factor": round(factor, 5), "grad_norm": round(float(grad_norm), 4),
                      "seconds": round(elapsed, 3), "cpu_seconds": round(cpu, 3),
                      **{k: round(v, 5) for k, v in sums.items()}}
            state["history"].append(record)
            log.write(json.dumps(record) + "\n")
            log.flush()
            bar.update(job, completed=step, losses=" ".join(f"{k}={v:.3f}" for k, v in sums.items()))
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                state["step"] = step
                _save_resume(root, params, opt, state)
    log.close()
    if step < cfg.steps:
        return root
    meta = {"training": {**asdict(cfg), "data": data.description, "step": step, "seconds": round(state["seconds"], 1),
                         "cpu_seconds": round(state["cpu_seconds"], 1), "torch_threads": torch.get_num_threads(),
                         "samples": step * cfg.grad_accum * cfg.micro_batch,
                         "tokens_sampled": step * cfg.grad_accum * cfg.micro_batch * cfg.segments * cfg.segment_len,
                         "steps_changes": state.get("steps_changes", []),
                         "loss_curve": _summarise(state["history"]),
                         **({"init_training": init_meta} if init_meta else {})}}
    method.save_checkpoint(root, meta)
    done = {"step": step, "config": _config_for_check(cfg), "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (root / "train_done.json").write_text(json.dumps(done, indent=1) + "\n")
    if not keep_resume:
        shutil.rmtree(root / "resume", ignore_errors=True)
    return root


def bf16_training(method):
    """Prepare ``method`` for bf16 training; returns the context its passes run in.

    The frozen matrix of every ``Linear`` in the method's networks is stored in bfloat16 once: autocast keeps
    casts only of trainable leaves, so it cast the frozen base again on every pass (the products are the same
    bf16 products). A head tied to the input embedding gets its own frozen copy; embeddings, norms and the
    trainable tensors stay float32. The passes run under CPU autocast with attention on PyTorch's math kernel,
    which on this CPU runs bf16 attention with its backward about 1.7x faster than the fused kernel. peft's
    cast of each LoRA input to the adapter's float32 is turned off: autocast runs the adapter's products in bf16
    either way, so that cast only copied bf16 activations to float32 and back (the results are bitwise the same).
    """
    from peft.tuners.tuners_utils import BaseTunerLayer
    from torch.nn.attention import SDPBackend, sdpa_kernel

    nets = [m for m in vars(method).values() if isinstance(m, torch.nn.Module)]
    for net in nets:
        for mod in net.modules():
            w = getattr(mod, "weight", None)
            if isinstance(mod, torch.nn.Linear) and w is not None and not w.requires_grad and w.dtype == torch.float32:
                mod.weight = torch.nn.Parameter(w.detach().to(torch.bfloat16), requires_grad=False)
            if isinstance(mod, BaseTunerLayer):
                mod.cast_input_dtype_enabled = False  # what peft.helpers.disable_input_dtype_casting sets

    @contextlib.contextmanager
    def passes():
        with torch.autocast("cpu", dtype=torch.bfloat16), sdpa_kernel(SDPBackend.MATH):
            yield

    return passes


def _init_from(method, path: str) -> dict:
    """Load a finished checkpoint's weights as the starting point (a new optimizer); its training record."""
    root = Path(path)
    if not (root / "train_done.json").exists():
        raise UserError(f"--init-from {root}: no finished training there (train_done.json missing); fix: pass a "
                        "directory written by a completed `r3mem-bench train`")
    method.load_checkpoint(root)
    meta = getattr(method, "checkpoint_meta", None) or {}
    return meta.get("training", {})


def _summarise(history: list[dict], buckets: int = 10) -> list[dict]:
    """Mean of each logged value over ``buckets`` equal spans of steps (the curve stored in the checkpoint)."""
    if not history:
        return []
    size = max(1, math.ceil(len(history) / buckets))
    out = []
    for i in range(0, len(history), size):
        chunk = history[i: i + size]
        keys = list(dict.fromkeys(k for c in chunk for k in c if k not in ("step", "lr_factor", "seconds")))
        out.append({"steps": f"{chunk[0]['step']}-{chunk[-1]['step']}",  # a key a step did not log counts as 0
                    **{k: round(float(np.mean([c.get(k, 0.0) for c in chunk])), 4) for k in keys}})
    return out


def register(app: typer.Typer) -> None:
    """Add ``train`` to the CLI."""

    @app.command("train")
    def train_cmd(
        method: str = typer.Option(..., "--method", "-m", help="A trainable method (r3mem, r3mem_no_hier, rmt...)."),
        model: str = typer.Option("smollm2-135m", "--model"),
        task: Optional[str] = typer.Option(None, "--task", "-t", help="Synonym of --data-mix."),
        data_mix: str = typer.Option(DEFAULT_MIX, "--data-mix",
                                     help="Training corpora joined by '+' (name*weight to weight one): shakespeare, pydoc_train, wiki_train."),
        data: Optional[str] = typer.Option(None, "--data", help="Extra training text (.txt or .jsonl)."),
        steps: int = typer.Option(100, "--steps"),
        output: str = typer.Option(..., "--output", "-o", help="Checkpoint directory (resumable)."),
        segment_len: int = typer.Option(128, "--segment-len"),
        segments: int = typer.Option(3, "--segments", help="Consecutive segments per training sample."),
        grad_accum: int = typer.Option(1, "--grad-accum", help="Forward/backward passes per optimizer step."),
        micro_batch: int = typer.Option(1, "--micro-batch",
                                        help="Samples stacked into one forward pass (effective batch: micro-batch x grad-accum)."),
        precision: str = typer.Option("fp32", "--precision", help="fp32, or bf16 (CPU autocast; frozen base weights stored in bf16, trained tensors fp32)."),
        compile_: bool = typer.Option(False, "--compile", help="torch.compile the method's decoder (inductor, needs a C++ "
                                      "compiler; the first step compiles, minutes). Methods: rmt."),
        lr: float = typer.Option(1e-3, "--lr", help="Base learning rate (methods may scale it per group)."),
        warmup: int = typer.Option(20, "--warmup"),
        checkpoint_every: int = typer.Option(25, "--checkpoint-every"),
        seed: int = typer.Option(0, "--seed"),
        threads: Optional[int] = typer.Option(None, "--threads"),
        method_arg: list[str] = typer.Option([], "--method-arg", help="Method option key=value (repeatable)."),
        keep_resume: bool = typer.Option(False, "--keep-resume", help="Keep resume/ (optimizer state) at the end."),
        stop_after: Optional[int] = typer.Option(None, "--stop-after", help="End after this step (resumable; e.g. to "
                                                 "reproduce a recorded change of --steps)."),
        init_from: Optional[str] = typer.Option(None, "--init-from",
                                                help="Start from a finished checkpoint's weights (staged training)."),
        quiet: bool = typer.Option(False, "--quiet", "-q"),
        method_path: list[str] = typer.Option([], "--method-path", help="Plugin method .py file or folder (repeatable)."),
    ) -> None:
        """Train a memory method's adapters/memory parameters; resumable, deterministic per seed."""
        from r3mem_bench.cli import _parse_options
        from r3mem_bench.methods import load_method_paths

        load_method_paths(method_path)

        cfg = TrainConfig(method=method, model=model, data_mix=task or data_mix, data=data, steps=steps,
                          output=output, segment_len=segment_len, segments=segments, grad_accum=grad_accum,
                          micro_batch=micro_batch, precision=precision, compile=compile_, lr=lr,
                          warmup=min(warmup, steps), checkpoint_every=checkpoint_every, seed=seed, threads=threads,
                          method_options=_parse_options(method_arg), init_from=init_from)
        if stop_after is not None and (stop_after <= 0 or stop_after % checkpoint_every):
            raise UserError(f"--stop-after {stop_after}: must be a positive multiple of --checkpoint-every "
                            f"({checkpoint_every}), so the run can resume from there")
        root = train(cfg, stop_after=stop_after, quiet=quiet, keep_resume=keep_resume)
        typer.echo(f"checkpoint: {root}")

    @app.command("reconstruct")
    def reconstruct_cmd(
        text: str = typer.Option(..., "--text", help="A UTF-8 text file to compress and reconstruct."),
        checkpoint: Optional[str] = typer.Option(None, "--checkpoint", help="R3Mem checkpoint (default: shipped)."),
        model: Optional[str] = typer.Option(None, "--model", help="Base model (default: the checkpoint's)."),
        memory_tokens: int = typer.Option(16, "--memory-tokens", help="Memory slots M."),
        segment_len: int = typer.Option(128, "--segment-len", help="Tokens per compressed chunk."),
        threads: Optional[int] = typer.Option(None, "--threads"),
        as_json: bool = typer.Option(False, "--json", help="Print a JSON report instead of text."),
        no_greedy: bool = typer.Option(False, "--no-greedy", help="Teacher-forced scores only (no decoding)."),
        label: Optional[str] = typer.Option(None, "--label", help="Series name stored in the JSON (plots, tables)."),
        no_repeat_ngram: int = typer.Option(0, "--no-repeat-ngram",
                                            help="Greedy decoding never repeats an n-gram of this size (0: plain greedy)."),
    ) -> None:
        """Compress a text with R3Mem, reconstruct it from the memory; print it, token accuracy and ROUGE-L."""
        from r3mem_bench.methods import get_method_class
        from r3mem_bench.models import load_model

        path = Path(text)
        if not path.is_file():
            raise UserError(f"--text {path}: file not found; fix: give a UTF-8 text file")
        try:
            body = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise UserError(f"--text {path}: not UTF-8 text; fix: convert it to UTF-8") from None
        if not body.strip():
            raise UserError(f"--text {path}: the file is empty; fix: give some text")
        if model is None:
            if checkpoint is None:
                model = "smollm2-135m"
            else:
                meta_file = Path(checkpoint) / "r3mem.json"
                if not meta_file.exists():
                    raise UserError(f"--checkpoint {checkpoint}: no r3mem.json there; fix: pass a directory written "
                                    "by `r3mem-bench train --method r3mem`")
                model = json.loads(meta_file.read_text()).get("model", "smollm2-135m")
        lm = load_model(model, threads=threads)
        if no_repeat_ngram < 0:
            raise UserError(f"--no-repeat-ngram {no_repeat_ngram}: must be 0 (off) or a positive n-gram size")
        options = {"memory_tokens": memory_tokens, "segment_len": segment_len, "recon_no_repeat_ngram": no_repeat_ngram}
        if checkpoint:
            options["checkpoint"] = checkpoint
        method = get_method_class("r3mem")(lm, options)
        report = method.reconstruction_report(body, greedy=not no_greedy)
        empty = method.reconstruction_report(body, empty=True, greedy=not no_greedy)
        summary = {"token_accuracy": report["token_accuracy"], "reconstruction_ppl": report["ppl"],
                   "rouge_l": report["rouge_l"], "empty_memory_token_accuracy": empty["token_accuracy"],
                   "empty_memory_reconstruction_ppl": empty["ppl"], "empty_memory_rouge_l": empty["rouge_l"],
                   "memory_tokens": memory_tokens, "segment_len": segment_len, "chunks": len(report["chunks"]),
                   "tokens": sum(c["tokens"] for c in report["chunks"]), "text": text,
                   "checkpoint": str(checkpoint or "shipped"), "no_repeat_ngram": no_repeat_ngram,
                   **({"label": label} if label else {})}
        if as_json:
            typer.echo(json.dumps({**summary, "reconstruction": [c["reconstruction"] for c in report["chunks"]]},
                                  indent=1))
            return
        typer.echo("\n".join(c["reconstruction"] for c in report["chunks"]))
        rouge = "n/a" if summary["rouge_l"] is None else (f"{summary['rouge_l']:.3f} "
                                                          f"(empty {summary['empty_memory_rouge_l']:.3f})")
        typer.echo(f"\ntoken accuracy (teacher-forced) {summary['token_accuracy']:.3f} "
                   f"(empty memory {summary['empty_memory_token_accuracy']:.3f}); reconstruction PPL "
                   f"{summary['reconstruction_ppl']:.2f} (empty {summary['empty_memory_reconstruction_ppl']:.2f}); "
                   "ROUGE-L (greedy) "
                   f"{rouge}; M={memory_tokens}, {summary['chunks']} chunk(s)")
