"""The generic trainer on tiny-random: determinism, resume after a stop or a SIGKILL, data rules, CLI wiring."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from r3mem_bench.errors import UserError
from r3mem_bench.train import TrainConfig, TrainingData, lr_at, parse_mix, train

TEXT = " ".join(f"Sentence {i} tells of Alice Brown and Bob Green, who walked to Rome on day {i}." for i in range(80))
METHOD_ARGS = {"max_memory_tokens": 4, "memory_tokens": 4, "train_memory_sizes": [2, 4],
               "train_memory_probs": [0.5, 0.5], "save_dtype": "float32"}


@pytest.fixture
def corpus(tmp_path) -> str:
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return str(path)


def config(out: Path, corpus: str, **kw) -> TrainConfig:
    base = dict(method="r3mem", model="tiny-random", data_mix="", data=corpus, steps=6, output=str(out),
                segment_len=12, segments=2, lr=5e-3, warmup=2, checkpoint_every=2, seed=0,
                method_options=dict(METHOD_ARGS))
    return TrainConfig(**{**base, **kw})


def weights(path: Path) -> dict:
    return load_file(str(path / "r3mem.safetensors"))


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_stop_and_resume_gives_identical_weights(tmp_path, corpus, tiny_lm):
    straight = train(config(tmp_path / "a", corpus), quiet=True)
    part = config(tmp_path / "b", corpus)
    train(part, stop_after=3, quiet=True)  # stops after step 3: last checkpoint is step 2
    assert json.loads((tmp_path / "b" / "resume" / "trainer.json").read_text())["step"] == 2
    assert not (tmp_path / "b" / "r3mem.safetensors").exists()
    train(part, quiet=True)
    assert same(weights(straight), weights(tmp_path / "b"))
    other_seed = train(config(tmp_path / "c", corpus, seed=1), quiet=True)
    assert not same(weights(straight), weights(other_seed))
    meta = json.loads((tmp_path / "b" / "r3mem.json").read_text())
    assert meta["training"]["step"] == 6 and meta["training"]["data"]["mix"] == ["file"]
    assert meta["model"] == "tiny-random" and meta["config"]["max_memory_tokens"] == 4
    log = [json.loads(x) for x in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]  # step 3 of the stopped run is not logged twice
    assert not (tmp_path / "b" / "resume").exists()
    train(part, quiet=True)  # finished: nothing to do


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "r3mem_bench.cli", *args]


def test_sigkill_mid_run_then_rerun_matches_uninterrupted(tmp_path, corpus):
    args = ["train", "--method", "r3mem", "--model", "tiny-random", "--data-mix", "", "--data", corpus,
            "--steps", "12", "--segment-len", "12", "--segments", "2", "--lr", "5e-3", "--warmup", "2",
            "--checkpoint-every", "2", "--threads", "1", "--quiet"]
    for k, v in METHOD_ARGS.items():
        args += ["--method-arg", f"{k}={json.dumps(v)}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    straight = subprocess.run(_cli(*args, "--output", str(tmp_path / "a")), capture_output=True, text=True, env=env,
                              timeout=600)
    assert straight.returncode == 0, straight.stderr[-2000:]
    proc = subprocess.Popen(_cli(*args, "--output", str(tmp_path / "b")), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    state = tmp_path / "b" / "resume" / "trainer.json"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if state.exists():
            try:
                if json.loads(state.read_text())["step"] >= 4:
                    break
            except (json.JSONDecodeError, OSError):
                pass
        time.sleep(0.05)
    assert proc.poll() is None, "training ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "b" / "r3mem.safetensors").exists()
    again = subprocess.run(_cli(*args, "--output", str(tmp_path / "b")), capture_output=True, text=True, env=env,
                           timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert same(weights(tmp_path / "a"), weights(tmp_path / "b"))


def test_trained_checkpoint_runs_and_reconstructs_through_the_cli(tmp_path, corpus, cli):
    root = train(config(tmp_path / "ck", corpus, steps=2), quiet=True)
    out = cli("run", "--task", "wikitext2", "--method", "r3mem,r3mem_reset", "--model", "tiny-random",
              "--checkpoint", str(root), "--limit", "1", "--max-tokens", "48", "--segment-len", "16",
              "--output", str(tmp_path / "runs"), "-q", "--threads", "1")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "r3mem_reset" in out.stdout
    rows = [json.loads(x) for x in (tmp_path / "runs" / "wikitext2" / "r3mem" / "results.jsonl").read_text().splitlines()]
    assert rows[0]["n_segments"] == 3 and len(set(rows[0]["state_bytes_series"])) == 1
    rec = cli("reconstruct", "--checkpoint", str(root), "--text", corpus, "--memory-tokens", "4",
              "--segment-len", "16", "--json", "--threads", "1")
    assert rec.returncode == 0, rec.stderr[-2000:]
    report = json.loads(rec.stdout)
    assert 0 <= report["token_accuracy"] <= 1 and report["memory_tokens"] == 4 and report["chunks"] > 1
    missing = cli("run", "--task", "wikitext2", "--method", "r3mem", "--model", "tiny-random", "--limit", "1",
                  "--output", str(tmp_path / "runs2"), "-q")
    assert missing.returncode == 2 and "r3mem-bench train" in missing.stderr


def test_training_data_refuses_evaluation_splits_and_is_deterministic(tiny_lm, corpus):
    for name in ("wikitext2", "pydoc_heldout"):
        with pytest.raises(UserError, match="evaluation split"):
            TrainingData(name, tiny_lm.tokenizer, 16, 2)
    with pytest.raises(UserError, match="unknown training corpus"):
        TrainingData("nosuch", tiny_lm.tokenizer, 16, 2)
    data = TrainingData("", tiny_lm.tokenizer, 16, 2, data=corpus)
    a, b = data.sample(0, 5, 0), data.sample(0, 5, 0)
    assert len(a) == 2 and all(x.numel() == 16 for x in a) and all((x == y).all() for x, y in zip(a, b))
    assert not all((x == y).all() for x, y in zip(a, data.sample(0, 6, 0)))


def test_weighted_mix_samples_corpora_by_weight_and_refuses_bad_weights(tiny_lm, corpus):
    assert parse_mix("wiki_train*2+pydoc_train") == (["wiki_train", "pydoc_train"], [2.0, 1.0])
    for bad in ("wiki_train*0", "wiki_train*-1", "wiki_train*x"):
        with pytest.raises(UserError, match="weight must be a positive number"):
            parse_mix(bad)
    data = TrainingData("wiki_train*3+shakespeare", tiny_lm.tokenizer, 16, 2)
    assert data.description["weights"] == {"wiki_train": 0.75, "shakespeare": 0.25}
    wiki = {tuple(x) for x in data.corpora[0][1]}
    picks = [tuple(torch.cat(data.sample(0, step, 0)).tolist()) for step in range(100)]
    share = sum(any(_inside(p, d) for d in wiki) for p in picks) / 100
    assert 0.6 <= share <= 0.9  # 0.75 expected; uniform sampling would give about 0.5


def _inside(window: tuple, doc: tuple) -> bool:
    n = len(window)
    return any(doc[i: i + n] == window for i in range(len(doc) - n + 1))


def test_bundled_wiki_train_is_disjoint_from_wikitext2_test():
    from r3mem_bench.data import bundled_jsonl, bundled_text
    from r3mem_bench.data.build_wiki_train import ngrams, wikitext_titles, words

    docs = bundled_jsonl("wiki_train")
    assert len(docs) > 150 and all(d["id"].startswith(("hotpotqa/", "musique/")) for d in docs)
    wikitext = bundled_text("wikitext2_test")
    titles, banned = wikitext_titles(wikitext), ngrams(wikitext)
    assert "kiss you one direction song" in titles  # a test article: the title parser works
    for d in docs:
        paragraph_titles = {" ".join(words(p.split("\n", 1)[0])) for p in d["text"].split("\n\n")}
        assert not paragraph_titles & titles and not ngrams(d["text"]) & banned, d["id"]


def test_bundled_qa_pairs_belong_to_kept_documents_and_are_answerable_from_their_passages():
    from r3mem_bench.data import bundled_jsonl, bundled_text
    from r3mem_bench.data.build_wiki_train import ngrams

    docs = {d["id"] for d in bundled_jsonl("wiki_train")}
    pairs = bundled_jsonl("wiki_train_qa")
    assert len(pairs) > 250 and len({p["id"] for p in pairs}) == len(pairs)
    banned = ngrams(bundled_text("wikitext2_test"))
    for p in pairs:
        assert p["id"].rsplit("/", 1)[0] in docs, p["id"]  # only documents that passed decontamination
        assert p["answer"].lower() in " ".join(p["passages"]).lower(), p["id"]
        assert p["answer"].lower() not in ("yes", "no") and "#" not in p["question"], p["id"]
        assert not any(ngrams(x) & banned for x in p["passages"]), p["id"]


def test_schedule_and_refusals(tmp_path, corpus):
    cfg = config(tmp_path / "x", corpus, steps=10, warmup=2)
    assert lr_at(0, cfg) == 0.5 and lr_at(1, cfg) == 1.0 and abs(lr_at(10, cfg) - 0.1) < 1e-9
    with pytest.raises(UserError, match="nothing to train"):
        train(config(tmp_path / "y", corpus, method="no_memory"), quiet=True)
    with pytest.raises(UserError, match="must be positive"):
        train(config(tmp_path / "z", corpus, steps=0), quiet=True)


def test_init_from_starts_a_second_stage_from_finished_weights(tmp_path, corpus):
    warm = {**METHOD_ARGS, "recon_warmup_steps": 2}
    stage1 = train(config(tmp_path / "s1", corpus, steps=2, method_options=warm), quiet=True)
    log = [json.loads(x) for x in (stage1 / "train_log.jsonl").read_text().splitlines()]
    assert all(r.get("level_warmup") == 1 and r["lm"] == 0 for r in log)
    stage2 = train(config(tmp_path / "s2", corpus, steps=2, lr=0.0, warmup=1, init_from=str(stage1)), quiet=True)
    assert same(weights(stage1), weights(stage2))  # lr 0: the second stage starts exactly at the first's weights
    meta = json.loads((stage2 / "r3mem.json").read_text())
    assert meta["training"]["init_from"] == str(stage1)
    assert meta["training"]["init_training"]["method_options"]["recon_warmup_steps"] == 2
    with pytest.raises(UserError, match="--init-from"):
        train(config(tmp_path / "s3", corpus, init_from=str(tmp_path / "nowhere")), quiet=True)


@pytest.mark.parametrize("method, extra", [("r3mem", {"recon_warmup_steps": 10}), ("rmt", {})])
def test_micro_batches_train_and_record_compute(tmp_path, corpus, method, extra):
    opts = dict(METHOD_ARGS, **extra) if method == "r3mem" else {"num_mem_tokens": 2, "lora_r": 4}
    cfg = config(tmp_path / method, corpus, method=method, steps=4, micro_batch=2, precision="bf16",
                 method_options=opts)
    root = train(cfg, quiet=True)
    log = [json.loads(line) for line in (root / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and all(r["cpu_seconds"] > 0 for r in log)
    meta_file = "r3mem.json" if method == "r3mem" else "rmt_config.json"
    training = json.loads((root / meta_file).read_text())["training"]
    assert training["micro_batch"] == 2 and training["precision"] == "bf16" and training["samples"] == 8
    assert training["cpu_seconds"] == pytest.approx(sum(r["cpu_seconds"] for r in log), abs=0.2)
    assert training["torch_threads"] == torch.get_num_threads()


def test_compiled_rmt_training_matches_eager_within_rounding_and_other_methods_refuse(tmp_path, corpus):
    """``--compile`` runs RMT's decoder through torch.compile (dynamo captures graphs) and gives the losses of eager
    bf16 training within bf16 rounding, with the option recorded; a method without a compiled path refuses."""
    from torch._dynamo.utils import counters

    def losses(root):
        return [json.loads(line)["loss"] for line in (root / "train_log.jsonl").read_text().splitlines()]

    opts = {"num_mem_tokens": 2, "lora_r": 4}
    eager = train(config(tmp_path / "eager", corpus, method="rmt", steps=2, micro_batch=2, precision="bf16",
                         method_options=opts), quiet=True)
    counters.clear()
    compiled = train(config(tmp_path / "compiled", corpus, method="rmt", steps=2, micro_batch=2, precision="bf16",
                            compile=True, method_options=opts), quiet=True)
    assert counters["stats"]["unique_graphs"] > 0
    assert losses(compiled) == pytest.approx(losses(eager), rel=1e-2)
    assert json.loads((compiled / "rmt_config.json").read_text())["training"]["compile"] is True
    with pytest.raises(UserError, match="--compile"):
        train(config(tmp_path / "r3mem", corpus, compile=True), quiet=True)


def test_micro_batch_draws_extend_single_sample_draws(tiny_lm, corpus):
    data = TrainingData("", tiny_lm.tokenizer, 12, 2, corpus)
    batch = data.batch(0, 5, 1, 3)  # micro-batch 1 of step 5: draws 3, 4, 5
    assert [tuple(s.shape) for s in batch] == [(3, 12), (3, 12)]
    for j in range(3):
        single = data.sample(0, 5, 3 + j)
        assert all(torch.equal(batch[i][j], single[i]) for i in range(2))
    assert all(torch.equal(a, b) for a, b in zip(data.batch(0, 5, 1, 1), data.sample(0, 5, 1)))


def test_micro_batch_and_precision_refusals(tmp_path, corpus):
    with pytest.raises(UserError, match="--precision"):
        train(config(tmp_path / "p", corpus, precision="fp8"), quiet=True)
    with pytest.raises(UserError, match="--micro-batch"):
        train(config(tmp_path / "m", corpus, micro_batch=0), quiet=True)


def _training_method(tiny_lm, name: str, opts: dict):
    """Method ``name`` built for training from seed 0, its LoRA B matrices drawn nonzero (so every adapter matrix
    gets a gradient)."""
    from r3mem_bench.methods import get_method_class

    torch.manual_seed(0)
    m = get_method_class(name)(tiny_lm, opts)
    m.train(True)
    with torch.no_grad():
        for n, p in m.trainable_parameters().items():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return m


@pytest.mark.parametrize("level_probs", [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
def test_r3mem_micro_batch_losses_are_the_mean_of_its_samples(tiny_lm, level_probs):
    """After the warm-up a micro-batch shares one memory size and level: its losses (and gradients) equal the
    mean of the same samples' losses run one at a time (document level batched, entity level looped)."""
    opts = {"for_training": True, "segment_len": 12, "train_segments": 2, "max_memory_tokens": 4,
            "memory_tokens": 4, "train_memory_sizes": [4], "train_memory_probs": [1.0], "w_cycle": 0.5,
            "level_probs": level_probs}
    ids = tiny_lm.tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    samples = [[torch.tensor(ids[o: o + 12]), torch.tensor(ids[o + 12: o + 24])] for o in (0, 40, 97)]
    m = _training_method(tiny_lm, "r3mem", opts)
    params = list(m.trainable_parameters().values())
    m._pair = lambda segments, level: ([segments[0]], segments[1][:5])  # a fixed pair: no random pick to match

    def run(segments):
        for p in params:
            p.grad = None
        torch.manual_seed(3)
        losses = m.training_losses(segments)
        losses["loss"].backward()
        return {k: float(v.detach()) for k, v in losses.items()}, [p.grad.clone() for p in params if p.grad is not None]

    batched, grads = run([torch.stack([s[i] for s in samples]) for i in range(2)])
    singles = [run(s) for s in samples]
    level = "level_document" if level_probs[0] else "level_entity"
    assert batched[level] == 1 and all(s[0][level] == 1 for s in singles)
    for key in ("lm", "kl", "recon", "cycle", "loss"):
        assert batched[key] == pytest.approx(sum(s[0][key] for s in singles) / 3, rel=1e-4, abs=1e-6), key
    assert batched["lm"] > 0 and batched["recon"] > 0
    for i, g in enumerate(grads):
        assert torch.allclose(g, sum(s[1][i] for s in singles) / 3, rtol=1e-3, atol=1e-6)


def test_cli_stop_after_then_new_step_budget_records_the_schedule_change(tmp_path, corpus, cli):
    """`--steps 6 --stop-after 2`, then `--steps 4`: the run resumes at step 2, records the change, and equals
    the same two calls made through the Python API (the recipe of the shipped R3Mem's second stage)."""
    args = ["train", "--method", "r3mem", "--model", "tiny-random", "--data", corpus, "--data-mix", "",
            "--segment-len", "12", "--segments", "2", "--lr", "5e-3", "--warmup", "2", "--checkpoint-every", "2",
            "--threads", "1", "-q", "--output", str(tmp_path / "cli")]
    opts = [x for k, v in METHOD_ARGS.items() for x in ("--method-arg", f"{k}={json.dumps(v).replace(' ', '')}")]
    bad = cli(*args, *opts, "--steps", "6", "--stop-after", "3")
    assert bad.returncode == 2 and "--stop-after 3" in bad.stderr
    first = cli(*args, *opts, "--steps", "6", "--stop-after", "2")
    assert first.returncode == 0, first.stderr[-2000:]
    assert not (tmp_path / "cli" / "r3mem.safetensors").exists()
    second = cli(*args, *opts, "--steps", "4")
    assert second.returncode == 0, second.stderr[-2000:]
    meta = json.loads((tmp_path / "cli" / "r3mem.json").read_text())
    assert meta["training"]["steps_changes"] == [{"at_step": 2, "from": 6, "to": 4}]
    api = config(tmp_path / "api", corpus, steps=6, threads=1)  # the CLI's thread count: bitwise comparable
    train(api, stop_after=2, quiet=True)
    train(config(tmp_path / "api", corpus, steps=4, threads=1), quiet=True)
    assert same(weights(tmp_path / "cli"), weights(tmp_path / "api"))


@pytest.mark.parametrize("method", ["r3mem", "rmt"])
def test_bf16_training_stores_frozen_matrices_once_with_autocasts_products(tiny_lm, method):
    """bf16 training keeps the frozen base's Linear weights in bfloat16 (the shared model and the trainable
    tensors untouched), with peft's cast of adapter inputs to float32 off, and gives the losses and gradients
    autocast gives from the float32 weights with that cast on."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from r3mem_bench.train import bf16_training

    opts = ({"for_training": True, "segment_len": 12, "train_segments": 2, **METHOD_ARGS, "train_memory_sizes": [4],
             "train_memory_probs": [1.0], "level_probs": [1.0, 0.0, 0.0]} if method == "r3mem" else
            {"for_training": True, "segment_len": 12, "train_segments": 2, "num_mem_tokens": 2, "lora_r": 4})
    ids = tiny_lm.tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    batch = [torch.tensor([ids[o + k * 12: o + (k + 1) * 12] for o in (0, 40)]) for k in range(2)]

    def losses_and_grads(m, context):
        params = list(m.trainable_parameters().values())
        for p in params:
            p.grad = None
        torch.manual_seed(3)
        with context():
            loss = m.training_losses(batch)["loss"]
        loss.backward()
        return float(loss.detach()), [p.grad.clone() for p in params if p.grad is not None]

    reference = losses_and_grads(_training_method(tiny_lm, method, dict(opts)),
                                 lambda: _autocast_math(SDPBackend, sdpa_kernel))
    m = _training_method(tiny_lm, method, dict(opts))
    context = bf16_training(m)
    nets = [v for v in vars(m).values() if isinstance(v, torch.nn.Module)]
    linears = [mod for net in nets for mod in net.modules() if isinstance(mod, torch.nn.Linear)]
    frozen = [mod.weight for mod in linears if not mod.weight.requires_grad]
    assert frozen and all(w.dtype == torch.bfloat16 for w in frozen)
    assert all(p.dtype == torch.float32 for p in m.trainable_parameters().values())
    assert all(p.dtype == torch.float32 for p in tiny_lm.model.parameters())  # the shared model is not touched
    lora = [mod for net in nets for mod in net.modules() if isinstance(mod, BaseTunerLayer)]
    assert lora and not any(mod.cast_input_dtype_enabled for mod in lora)
    loss, grads = losses_and_grads(m, context)
    assert loss == reference[0]
    assert len(grads) == len(reference[1]) and all(torch.equal(a, b) for a, b in zip(grads, reference[1]))


def _autocast_math(SDPBackend, sdpa_kernel):
    stack = contextlib.ExitStack()
    stack.enter_context(torch.autocast("cpu", dtype=torch.bfloat16))
    stack.enter_context(sdpa_kernel(SDPBackend.MATH))
    return stack


def test_r3mem_runs_the_bos_and_empty_memory_passes_once_per_training_sample(tiny_lm):
    """Within one ``training_losses`` call the BOS pass of each adapter and the empty memory run once and every
    use shares their graph: losses equal, gradients within float rounding of recomputing them at every use; a
    call outside a training sample recomputes them from the current weights."""
    opts = {"for_training": True, "segment_len": 12, "train_segments": 3, **METHOD_ARGS, "train_memory_sizes": [4],
            "train_memory_probs": [1.0], "level_probs": [1.0, 0.0, 0.0], "w_cycle": 0.5}
    ids = tiny_lm.tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    segments = [torch.tensor([ids[o + k * 12: o + (k + 1) * 12] for o in (0, 40)]) for k in range(3)]
    m = _training_method(tiny_lm, "r3mem", opts)
    params = list(m.trainable_parameters().values())
    calls = []
    forward = m._forward
    m._forward = lambda past, embeds, start: calls.append((past is None, embeds.shape[1])) or forward(past, embeds, start)

    def run():
        for p in params:
            p.grad = None
        calls.clear()
        torch.manual_seed(3)
        losses = m.training_losses(segments)
        losses["loss"].backward()
        return {k: float(v.detach()) for k, v in losses.items()}, [p.grad.clone() for p in params if p.grad is not None]

    shared, shared_grads = run()
    bos_passes = sum(1 for fresh, t in calls if fresh and t == 1)
    empty_passes = sum(1 for fresh, t in calls if not fresh and t == 4)
    assert (bos_passes, empty_passes) == (2, 1)  # compress and expand adapters; one empty memory
    m._caching = lambda: False  # recompute at every use, as without the cache
    again, again_grads = run()
    assert sum(1 for fresh, t in calls if fresh and t == 1) > 2
    assert again == shared
    for a, b in zip(shared_grads, again_grads):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    del m._caching
    with torch.no_grad():
        m.slots.add_(1.0)
    calls.clear()
    m.empty_memory(4)
    m.empty_memory(4)
    assert calls == [(True, 1), (False, 4)] * 2  # training, outside a sample: recomputed at every use
