"""Activation Beacon as an LM memory, trainable with ``r3mem-bench train --method beacon``.

Papers: Zhang, Liu, Xiao, Shao, Ye, Dou, "Long Context Compression with Activation Beacon" (arXiv 2401.03462,
ICLR 2025; its first version "Soaring from 4K to 400K"). Official code: FlagOpen/FlagEmbedding,
``research/Long_LLM/activation_beacon`` (read at 7ed43d67ec03fbe5c31c0992dbfa941fb1860549; last change to the
folder 0247d32): ``src/modeling_beacon.py`` (``Memory``: windows, interleaving, what is kept), ``src/llama/
modeling_llama.py`` (beacon projections, routing by ``beacon_indices``), ``src/modeling_utils.py`` (keys cached
before RoPE, re-rotated at every window), ``examples/training.md`` (the released recipes).

What the released (v3) recipe does and this adapter follows (``beacon``):

* The context is processed window by window (here: one window per LM segment). ``ratio`` sets how many raw tokens
  one beacon condenses: a beacon token (one learned embedding, initialised from EOS) follows every ``ratio`` raw
  tokens of the window (``beacon_pos=interleave``), attention is plain causal over ``[sink][memory][window]``
  (``beacon_attn=full-coverage``).
* Beacon tokens use their own q, k and v projections (``beacon_param q k v``), copied from the base weights; only
  these and the beacon embedding train (``only_train_beacon``); the base model is frozen.
* After a window only the beacons' keys and values are kept (the raw tokens' are dropped), appended to the memory,
  which grows by ``segment / ratio`` entries per window (no cap in the official code). Keys are kept before RoPE
  and the memory is re-placed at consecutive positions after the sink at every window; the first token (the
  model's document prefix token here) stays as an attention sink (``beacon_sink_size 1``, the Llama-3 recipe).
* Loss: token NLL of every raw token of every window (beacon positions carry no label); memory is not detached,
  so the loss of a window trains the beacons of all earlier windows. The ratio is drawn anew for every window
  from ``train_ratios`` (default 2, 4, 8, 16, 32: the pretraining set, ``beacon_ratio_mix step-random``).
* The last raw token of a window predicts the first token of the next (labels shifted over the whole text, as
  in the official ``prepare``); the first token of a document is predicted from the sink, as ``no_memory`` does.

Deviations: (1) windows are the suite's 128-token LM segments (official 1,024-2,048) and the evaluation ratio
is fixed by ``ratio`` (default 8: 16 beacons per segment, R3Mem's M = 16) instead of ``adapt-1024``; (2) the
learning rate and step count fit the CPU budget and are recorded in the checkpoint (the official runs use the
HF default 5e-5 on 1B tokens); (3) ``max_beacons`` (0:
unbounded, the official behaviour) keeps only the latest beacons, so the memory can be matched to another
method's state bytes; (4) the beacon projections are stored in float16 in the checkpoint (trained in fp32).
* ``beacon_reset``: the same checkpoint with the memory emptied at every segment (its beacons still run inside
  each window, and a window's last raw token still predicts the next segment's first token): the difference to
  ``beacon`` is what the carried activations contribute.

QA families: the corpus or dialogue history (items in order, each line with its date when it has one) is read
window by window (``segment_len`` raw tokens, a beacon after every ``ratio``), keeping every window's beacons (the
latest that fit in half the model's window, or ``max_beacons``); the answer is generated greedily, and
``answer_nll`` scores gold and candidate answers, after ``[sink][beacons][shared closed-book chat prompt]`` run
through the plain projections. Deviation: the corpus's last, partial window is condensed like the others (the
official model keeps a partial window's raw activations until it fills, so the question would share it). No
item ids are retrieved. ``beacon_reset`` answers after the sink alone (no memory).

Shipped checkpoint and its training command: ``results/beacon/README.md``. For a model without a checkpoint
``beacon`` refuses to run until one is trained (``r3mem-bench train --method beacon --model MODEL --output DIR``,
then ``--checkpoint DIR``).

Costs: ``tokens_processed`` counts every position pushed through the model (raw tokens and beacons; the sink
once per document); ``state_bytes`` is the beacons' keys and values carried into the next segment.
"""

from __future__ import annotations

import copy

import torch

from r3mem_bench.baselines._trained import TrainedBaseline
from r3mem_bench.errors import UserError
from r3mem_bench.method import Answer, AnswerNLL, tensor_bytes
from r3mem_bench.methods.checkpoints import (SHIPPED, load_checkpoint_files, read_checkpoint_config,
                                             save_checkpoint_files)
from r3mem_bench.methods.registry import register_method
from r3mem_bench.r3mem.layout import continuation_nll_after, greedy_after, kv_pass, rotate_keys
from r3mem_bench.scoring import kv_bytes, token_nll

CONFIG_FILE = "beacon_config.json"
WEIGHTS_FILE = "beacon.safetensors"
PROJECTIONS = ("q_proj", "k_proj", "v_proj")


def _ratios(value) -> list[int]:
    return [int(v) for v in (value if isinstance(value, (list, tuple)) else str(value).split(",")) if str(v).strip()]


class _Route:
    """Which positions of the current pass are beacons: a [B, T] bool mask, or None (no beacon)."""

    mask: torch.Tensor | None = None


class _Routed(torch.nn.Module):
    """A projection that sends beacon positions through a beacon-specific copy of the base weights."""

    def __init__(self, base: torch.nn.Linear, route: _Route):
        super().__init__()
        self.base = base
        self.beacon = copy.deepcopy(base)
        self.route = route

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, T, d_in] -> [B, T, d_out]
        out = self.base(x)
        mask = self.route.mask
        if mask is None or not bool(mask.any()):
            return out
        picked = self.beacon(x[mask])  # [n_beacons, d_out]
        return out.masked_scatter(mask.unsqueeze(-1), picked.to(out.dtype))


@register_method
class Beacon(TrainedBaseline):
    """Activation Beacon: beacon tokens condense each window; their key/value activations are the memory."""

    name = "beacon"
    config_file = CONFIG_FILE
    checkpoint_owner = "beacon"
    families = ("lm", "rag", "dialogue")
    description = "Activation Beacon: interleaved beacon tokens with their own q/k/v; their KV is kept as memory"
    trainable = True
    batched_training = True

    def __init__(self, lm, options=None, generator=None, prompt=None):
        super().__init__(lm, options, generator, prompt)
        o = self.options
        ckpt = self._checkpoint_dir(o.get("checkpoint"))
        saved = read_checkpoint_config(ckpt, CONFIG_FILE, "beacon") if ckpt else {}
        self.segment_len = int(o.get("segment_len", saved.get("segment_len", 128)))
        self.ratio = int(o.get("ratio", 8))
        self.train_ratios = _ratios(o.get("train_ratios", saved.get("train_ratios", "2,4,8,16,32")))
        self.max_beacons = int(o.get("max_beacons", 0))
        for r in [self.ratio, *self.train_ratios]:
            if r <= 0:
                raise UserError(f"beacon: ratio {r}; fix: a positive number of raw tokens per beacon")
        if self.max_beacons < 0:
            raise UserError(f"beacon: max_beacons={self.max_beacons}; fix: 0 (unbounded) or a positive cap")
        self._build()
        self.checkpoint_id = ""
        if ckpt:
            self.load_checkpoint(ckpt)
        self.reset()

    # ---- model -------------------------------------------------------------------------------------------
    def _build(self) -> None:
        self.model = copy.deepcopy(self.lm.model)  # the run's other methods keep the plain model
        self.net = self.model
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.route = _Route()
        self.stack = self.model.get_decoder()
        for layer in self.stack.layers:
            for name in PROJECTIONS:
                setattr(layer.self_attn, name, _Routed(getattr(layer.self_attn, name), self.route))
        self.head = self.model.get_output_embeddings()
        self.rotary = self.stack.rotary_emb
        emb = self.model.get_input_embeddings().weight.detach()
        eos = self.lm.tokenizer.eos_token_id
        self.beacon_embed = torch.nn.Parameter(emb[eos if eos is not None else 0].clone())  # [H], official "eos"
        self.model.eval()

    def trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        """The beacon q/k/v copies of every layer and the beacon embedding (the base model stays frozen)."""
        params = {n: p for n, p in self.model.named_parameters() if ".beacon." in n}
        params["beacon.embed"] = self.beacon_embed
        return params

    def _pass(self, past: torch.Tensor | None, embeds: torch.Tensor, start: int, beacons: torch.Tensor | None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """``kv_pass`` of the decoder with the beacon positions ``beacons`` [B, T] (None: none) routed through the
        beacon projections: hidden states [B, T, d] and the pass's KV [L, 2, B, H, T, D] (RoPE'd keys)."""
        self.route.mask = beacons
        try:
            return kv_pass(self.stack, past, embeds, start)
        finally:
            self.route.mask = None

    def _run_sink(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The prefix token at position 0: its KV [L, 2, B, H, 1, D] and the logits [B, V] it predicts with."""
        hidden, kv = self._pass(None, self._sink(batch), 0, None)
        return kv, self.head(hidden[:, -1])

    def _after_sink(self, sink_kv: torch.Tensor, memory: torch.Tensor | None) -> torch.Tensor:
        """The KV a pass reads: the sink's, then the memory (pre-RoPE) placed at positions 1..m."""
        if memory is None or not memory.shape[-2]:
            return sink_kv
        keys = rotate_keys(memory[:, 0], torch.arange(1, memory.shape[-2] + 1), self.rotary)
        return torch.cat([sink_kv, torch.stack([keys, memory[:, 1]], dim=1)], dim=-2)

    def window(self, seg_ids: torch.Tensor, memory: torch.Tensor | None, sink_kv: torch.Tensor, ratio: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """One window [B, S] after the sink and ``memory`` (pre-RoPE beacon KV [L, 2, B, H, m, D] or None).

        Returns the hidden states of the S raw tokens [B, S, d] (raw token i predicts raw token i+1) and the
        window's beacons' KV, pre-RoPE [L, 2, B, H, S // ratio, D]."""
        b, s = seg_ids.shape
        m = 0 if memory is None else memory.shape[-2]
        past = self._after_sink(sink_kv, memory)
        n_beacons = s // ratio
        raw = self._embed(seg_ids)  # [B, S, d]
        if n_beacons == 0:
            hidden, _ = self._pass(past, raw, 1 + m, None)
            return hidden, raw.new_zeros(past.shape[0], 2, b, past.shape[3], 0, past.shape[-1])
        # pass order: after every `ratio` raw tokens one beacon; raw tokens left over go at the end
        is_beacon = torch.zeros(s + n_beacons, dtype=torch.bool)
        is_beacon[torch.arange(1, n_beacons + 1) * (ratio + 1) - 1] = True
        body = raw.new_empty(b, s + n_beacons, raw.shape[-1])
        body[:, ~is_beacon] = raw
        body[:, is_beacon] = self.beacon_embed.to(raw.dtype)
        hidden, kv = self._pass(past, body, 1 + m, is_beacon.to(raw.device).unsqueeze(0).expand(b, -1))
        where = is_beacon.nonzero()[:, 0]
        beacon_kv = kv[..., where.to(kv.device), :]  # [L, 2, B, H, n, D], keys at positions 1+m+where
        keys = rotate_keys(beacon_kv[:, 0], -(1 + m + where), self.rotary)  # back to pre-RoPE
        return hidden[:, ~is_beacon.to(hidden.device)], torch.stack([keys, beacon_kv[:, 1]], dim=1)

    def _step(self, seg: torch.Tensor, memory: torch.Tensor | None, sink_kv: torch.Tensor, first: torch.Tensor,
              ratio: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """One window [B, S] after ``memory`` (ignored by the reset control): the logits [B, S, V] of its raw tokens
        (the first one's are ``first`` [B, V], from the previous window), those its last raw token gives the next
        window's first token, the memory the next window reads (this window's beacons appended, at most
        ``max_beacons`` kept; the reset control keeps only this window's) and the positions run per row."""
        if self.reset_each_segment:
            memory = None
        hidden, beacons = self.window(seg, memory, sink_kv, ratio)
        logits = torch.cat([first.unsqueeze(1), self.head(hidden[:, :-1])], dim=1)
        kept = beacons if memory is None else torch.cat([memory, beacons], dim=-2)
        kept = kept[..., -self.max_beacons:, :] if self.max_beacons else kept
        return logits, self.head(hidden[:, -1]), kept, seg.shape[1] + beacons.shape[-2]

    # ---- LM streams ----------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Start a document: no memory, the sink not yet run, the first token predicted from the sink."""
        self.memory: torch.Tensor | None = None
        self._sink_kv: torch.Tensor | None = None
        self._next_logits: torch.Tensor | None = None  # [1, V] predicting the next segment's first token

    def state_bytes(self) -> int:
        """The beacons' keys and values carried into the next segment."""
        return tensor_bytes(self.memory) if self.memory is not None and not self.reset_each_segment else 0

    def lm_state_bytes(self) -> int | None:
        """``max_beacons`` key/value entries (None while the memory is unbounded: it grows with the document)."""
        if self.reset_each_segment:
            return 0
        return kv_bytes(self.lm, self.max_beacons) if self.max_beacons else None

    @torch.no_grad()
    def score_segment(self, segment_ids: torch.Tensor) -> torch.Tensor:
        """NLL of the segment given the sink, the carried beacons and (first token) the previous window's last raw
        token; then keep this window's beacons."""
        seg = segment_ids.view(1, -1).to(self.lm.device)
        if self._sink_kv is None:
            self._sink_kv, self._next_logits = self._run_sink(1)
            self.tokens_processed += 1
        logits, self._next_logits, self.memory, run = self._step(seg, self.memory, self._sink_kv,
                                                                 self._next_logits, self.ratio)
        self.tokens_processed += run
        return token_nll(logits, seg)[0].cpu()

    # ---- training ------------------------------------------------------------------------------------------
    def training_losses(self, segments) -> dict[str, torch.Tensor]:
        """Token NLL of every raw token of n consecutive windows, memory carried with gradients, one ratio drawn
        per window from ``train_ratios``."""
        segs = [s if s.dim() == 2 else s.view(1, -1) for s in segments]
        if not segs:
            raise UserError("beacon training: empty sample; fix: give samples of at least one segment")
        b = segs[0].shape[0]
        sink_kv, next_logits = self._run_sink(b)
        memory, total, count = None, 0.0, 0
        for seg in segs:
            seg = seg.to(self.lm.device)
            ratio = self.train_ratios[int(torch.randint(len(self.train_ratios), (1,)))]
            logits, next_logits, memory, run = self._step(seg, memory, sink_kv, next_logits, ratio)
            nll = token_nll(logits, seg)
            total, count = total + nll.sum(), count + nll.numel()
            self.tokens_processed += b * run
        loss = total / count
        return {"loss": loss, "nll": loss.detach()}

    # ---- QA ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def ingest(self, items) -> None:
        """Read the items (dated lines, in order) window by window, ``segment_len`` raw tokens each, at ``ratio``;
        the answer reads every window's beacons (the latest that fit in half the model's window, or
        ``max_beacons``). The reset control reads nothing."""
        self.reset()
        self._sink_kv, _ = self._run_sink(1)
        self.tokens_processed += 1
        if self.reset_each_segment:
            return
        cap = min(self.max_beacons or self.lm.max_length // 2, self.lm.max_length // 2)
        for chunk in self._history_segments(items):
            _, beacons = self.window(chunk.view(1, -1).to(self.lm.device), self.memory, self._sink_kv, self.ratio)
            self.memory = beacons if self.memory is None else torch.cat([self.memory, beacons], dim=-2)[..., -cap:, :]
            self.tokens_processed += chunk.numel() + beacons.shape[-2]

    def _read_prompt(self, question: str) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """``[sink][beacons][closed-book prompt]`` through the plain projections: the logits [1, V] of the first
        answer token, the KV after the prompt [L, 2, 1, H, P, D], the position of the next token and the number
        of prompt tokens run."""
        if self._sink_kv is None:
            self._sink_kv, _ = self._run_sink(1)
            self.tokens_processed += 1
        past = self._after_sink(self._sink_kv, self.memory)
        m = past.shape[-2] - 1
        prompt = self._encoder().encode(self.prompt.render(question=question, context=""))
        hidden, kv = self._read(past, self._embed(torch.tensor([prompt])), 1 + m)
        return self.head(hidden[:, -1]), torch.cat([past, kv], dim=-2), 1 + m + len(prompt), len(prompt)

    def _read(self, past: torch.Tensor, embeds: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._pass(past, embeds, start, None)

    @torch.no_grad()
    def answer(self, question: str, now: float | None = None) -> Answer:
        """Greedy answer after ``[sink][beacons of the ingested text][closed-book prompt]``."""
        logits, past, pos, run = self._read_prompt(question)
        max_new = int(getattr(self.generator, "max_new_tokens", 32))
        out = greedy_after(self._read, self._embed, self.head, past, logits, pos, max_new,
                           self.lm.tokenizer.eos_token_id)
        self.tokens_processed += run + len(out)
        text = self.lm.tokenizer.decode(out, skip_special_tokens=True).strip()
        return Answer(text=text, retrieved_ids=[], prompt_tokens=pos, context="")

    @torch.no_grad()
    def answer_nll(self, question: str, texts: list[str], now: float | None = None,
                   given: Answer | None = None) -> AnswerNLL:
        """Mean per-token NLL of each text after the input ``answer`` generates from."""
        last, past, pos, run = self._read_prompt(question)
        if given is None:
            self.tokens_processed += run
        conts = [self._encoder().continuation_ids(t)[: self.lm.max_length // 2] for t in texts]
        scored = continuation_nll_after(self._read, self._embed, self.head, past, last, pos, conts)
        return AnswerNLL([s for s, _ in scored], [n for _, n in scored], pos, [], "")

    # ---- checkpoints -----------------------------------------------------------------------------------------
    def save_checkpoint(self, directory, meta: dict | None = None) -> None:
        """The beacon projections and embedding (float16) and the settings with ``meta``."""
        half = {n: p.detach().to(torch.float16) for n, p in self.trainable_parameters().items()}
        cfg = {"method": "beacon", "base_model": self.lm.name, "segment_len": self.segment_len,
               "train_ratios": self.train_ratios, **(meta or {})}
        save_checkpoint_files(directory, None, half, WEIGHTS_FILE, cfg, CONFIG_FILE)

    def load_checkpoint(self, directory) -> None:
        """Load what ``save_checkpoint`` wrote (float16, into the float32 parameters)."""
        self.checkpoint_id = load_checkpoint_files(directory, None, self.trainable_parameters(), WEIGHTS_FILE,
                                                   CONFIG_FILE, "beacon", self.lm.name, SHIPPED)

    def config(self) -> dict:
        return {"name": self.name, **self.options, "checkpoint_id": self.checkpoint_id, "ratio": self.ratio,
                "max_beacons": self.max_beacons, "carry_memory": not self.reset_each_segment}


@register_method
class BeaconReset(Beacon):
    """Activation Beacon with the memory emptied at every segment (the carried activations' contribution)."""

    name = "beacon_reset"
    description = "Activation Beacon, memory emptied at every segment (control)"
    reset_each_segment = True
