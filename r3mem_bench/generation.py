"""Generation backends and the shared prompt template of the QA families.

``Generator`` is the interface (``generate(prompts) -> [Generation]``); ``HFGenerator`` implements it with
``transformers`` ``generate`` (greedy, batched with left padding, KV cache). A vLLM backend plugs in behind the
same interface. Prompts go through the tokenizer's chat template when it has one.

Answer likelihood (the QA families' ``answer_nll`` and ``choice_acc``) scores texts as continuations of the same
encoded prompt the generator would answer from: ``HFGenerator.continuation_ids`` tokenises an answer as the
model would emit it after that prompt (plain tokens after a chat template's assistant header; with a leading
space after a plain-text prompt) and :func:`continuation_nll` runs the prompt once (its leading blocks reused
from the previous prompt through a ``PromptCache``), then every continuation in one packed pass on its KV cache.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from r3mem_bench.models import LoadedModel

DEFAULT_SYSTEM = "Answer the question with a short phrase, using the context when it helps."
DEFAULT_TEMPLATE = "Context:\n{context}\n\nQuestion: {question}\nAnswer:"
CLOSED_BOOK_TEMPLATE = "Question: {question}\nAnswer:"


@dataclass
class PromptTemplate:
    """The prompt every method of a QA task shares (``{context}`` and ``{question}`` placeholders)."""

    template: str = DEFAULT_TEMPLATE
    closed_book: str = CLOSED_BOOK_TEMPLATE
    system: str = DEFAULT_SYSTEM

    def render(self, question: str, context: str) -> str:
        """The user message: the context template when there is context, else the closed-book one."""
        if context.strip():
            return self.template.replace("{context}", context).replace("{question}", question)
        return self.closed_book.replace("{question}", question)


@dataclass
class Generation:
    """One generated answer and its token counts."""

    text: str
    prompt_tokens: int
    new_tokens: int


class Generator:
    """Interface of a generation backend."""

    name = "base"

    def generate(self, prompts: list[str]) -> list[Generation]:
        """Greedy answers for user messages ``prompts``."""
        raise NotImplementedError


class HFGenerator(Generator):
    """Hugging Face ``generate``: greedy, batched, left-padded, KV cache on."""

    name = "hf"

    def __init__(self, lm: LoadedModel, max_new_tokens: int = 32, system: str = DEFAULT_SYSTEM,
                 max_prompt_tokens: int | None = None, batch_size: int = 8, chat: bool = True):
        self.lm = lm
        self.chat = chat  # the tokenizer's chat template around prompts (when it has one)
        self.max_new_tokens = max_new_tokens
        self.system = system
        self.batch_size = batch_size
        self.max_prompt_tokens = max_prompt_tokens or (lm.max_length - max_new_tokens)

    def encode(self, prompt: str) -> list[int]:
        """Token ids of a user message, through the chat template when the tokenizer has one."""
        tok = self.lm.tokenizer
        if self.chat and getattr(tok, "chat_template", None):
            messages = [{"role": "system", "content": self.system}, {"role": "user", "content": prompt}]
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            ids = tok(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tok(f"{self.system}\n\n{prompt}" if self.system else prompt, add_special_tokens=True)["input_ids"]
        if len(ids) > self.max_prompt_tokens:  # keep the end: the question and the answer cue
            ids = ids[-self.max_prompt_tokens:]
        return ids

    def continuation_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` as an answer after an encoded prompt (no special tokens, no end-of-turn token)."""
        tok = self.lm.tokenizer
        if self.chat and getattr(tok, "chat_template", None):  # the assistant header ends the prompt: bare answer
            return tok(text.strip(), add_special_tokens=False)["input_ids"]
        return tok(" " + text.strip(), add_special_tokens=False)["input_ids"]  # after "Answer:" comes a space

    @torch.no_grad()
    def generate(self, prompts: list[str]) -> list[Generation]:
        """Greedy answers, batched with left padding."""
        tok = self.lm.tokenizer
        out: list[Generation] = []
        for start in range(0, len(prompts), self.batch_size):
            batch = [self.encode(p) for p in prompts[start:start + self.batch_size]]
            width = max(len(ids) for ids in batch)
            input_ids = torch.full((len(batch), width), tok.pad_token_id, dtype=torch.long)
            attention = torch.zeros((len(batch), width), dtype=torch.long)
            for i, ids in enumerate(batch):
                input_ids[i, width - len(ids):] = torch.tensor(ids)
                attention[i, width - len(ids):] = 1
            gen = self.lm.model.generate(
                input_ids=input_ids.to(self.lm.device), attention_mask=attention.to(self.lm.device),
                max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1,
                pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
            )
            for i, ids in enumerate(batch):
                new = gen[i, width:].tolist()
                if tok.eos_token_id in new:
                    new = new[: new.index(tok.eos_token_id)]
                out.append(Generation(tok.decode(new, skip_special_tokens=True).strip(), len(ids), len(new)))
        return out


class PromptCache:
    """The key/values of the last prompt :func:`continuation_nll` read, kept for the next call.

    Prompts are read in blocks of ``block`` tokens aligned at position 0, so a prompt's key/values are the same
    tensors whether its leading blocks were read now or kept from an earlier prompt that shared them: reuse
    changes no number, only the time (full-context QA asks several questions after one long corpus prefix).
    Only the last prompt is kept (one key/value copy of it); its blocks up to the one holding the new prompt's
    last token are reused when the token ids agree.
    """

    block = 256

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = []  # per layer (keys, values) [1, H, P, D]

    def reusable(self, ids: list[int]) -> int:
        """Tokens of ``ids`` whose key/values can be taken from the kept prompt: whole shared blocks that end
        before ``ids``' last token (whose logits the call needs)."""
        shared = 0
        for a, b in zip(self.ids, ids):
            if a != b:
                break
            shared += 1
        return min(shared, len(ids) - 1) // self.block * self.block


def _cache_of(layers: list[tuple[torch.Tensor, torch.Tensor]], length: int | None = None):
    """A ``DynamicCache`` holding the first ``length`` positions of ``layers`` (all when None; views, nothing is
    copied: a pass on the cache concatenates into new tensors and leaves ``layers`` as they are)."""
    from transformers import DynamicCache

    data = [(k[:, :, :length], v[:, :, :length]) for k, v in layers]
    return DynamicCache(ddp_cache_data=data) if data else DynamicCache()


def _layers_of(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) of each layer of a transformers cache."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return [(k, v) for k, v in zip(cache.key_cache, cache.value_cache)]


def padded_continuations(continuations: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The non-empty continuations as one batch: (inputs [N, C-1], every token but each row's last, right-padded
    with ``pad``; targets [N, C], right-padded with -100, which cross-entropy ignores), C the longest length.
    Right padding leaves every real position's logits as an unpadded pass computes them (attention is causal)."""
    width = max(len(ids) for ids in continuations)
    targets = torch.full((len(continuations), width), -100, dtype=torch.long)
    inputs = torch.full((len(continuations), max(width - 1, 0)), pad, dtype=torch.long)
    for i, ids in enumerate(continuations):
        targets[i, :len(ids)] = torch.tensor(ids)
        inputs[i, :len(ids) - 1] = torch.tensor(ids[:-1])
    return inputs, targets


def batched_nll(last: torch.Tensor, step_logits: torch.Tensor | None, targets: torch.Tensor) -> list[float]:
    """Mean per-token NLL of each padded continuation from the prompt's last logits ``last`` [1, V], the batched
    pass's logits ``step_logits`` [N, C-1, V] (None when every continuation is one token) and the padded
    ``targets`` [N, C] (-100 past each row's end)."""
    n = targets.shape[0]
    logits = last.reshape(1, 1, -1).expand(n, 1, -1)
    if step_logits is not None:
        logits = torch.cat([logits, step_logits], dim=1)
    nll = F.cross_entropy(logits.float().transpose(1, 2), targets.to(logits.device), reduction="none").sum(1)
    return [total / count for total, count in zip(nll.tolist(), (targets != -100).sum(1).tolist())]


def in_place(continuations: list[list[int]], score) -> list[tuple[float, int]]:
    """(mean NLL, token count) of each continuation, where ``score(filled)`` gives the mean NLLs of the non-empty
    ones in order (called only when there are some); an empty continuation gives ``(nan, 0)``."""
    filled = [ids for ids in continuations if ids]
    scores = iter(score(filled) if filled else [])
    return [(next(scores), len(ids)) if ids else (float("nan"), 0) for ids in continuations]


@torch.no_grad()
def continuation_nll(model, continuations: list[list[int]], prompt_ids: list[int] | None = None,
                     prompt_embeds: torch.Tensor | None = None,
                     prompt_cache: PromptCache | None = None) -> list[tuple[float, int]]:
    """(mean per-token NLL in nats, token count) of each continuation after one shared prompt.

    The prompt (token ids, or input embeddings [1, P, H] for methods that splice vectors into it) goes through
    ``model`` once with a KV cache (token ids in ``PromptCache.block``-token blocks, the leading ones taken from
    ``prompt_cache`` when it holds them); the continuations then run packed into one row on that cache
    (``packed_continuations``). Each continuation's first token is predicted from the prompt's last position. An
    empty continuation gives ``(nan, 0)``; no continuation runs nothing.
    """
    if not continuations:
        return []
    device = next(model.parameters()).device
    params = inspect.signature(model.forward).parameters
    cache_arg = "cache" if "cache" in params else "past_key_values"  # transformers 5 renamed it
    keep = next(({k: 1} for k in ("logits_to_keep", "num_logits_to_keep") if k in params), {})  # last logits only
    if prompt_embeds is not None:
        out = model(inputs_embeds=prompt_embeds.to(device), use_cache=True, **keep)
        layers = _layers_of(getattr(out, "cache", None) or out.past_key_values)
    else:
        ids = list(prompt_ids)
        start = prompt_cache.reusable(ids) if prompt_cache is not None else 0
        cache = _cache_of(prompt_cache.layers, start) if start else None
        block = PromptCache.block
        for pos in range(start, len(ids), block):
            chunk = torch.tensor([ids[pos:pos + block]], dtype=torch.long, device=device)
            out = model(input_ids=chunk, use_cache=True, **keep, **({cache_arg: cache} if cache is not None else {}))
            cache = getattr(out, "cache", None) or out.past_key_values
        layers = _layers_of(cache)
        if prompt_cache is not None:
            prompt_cache.ids, prompt_cache.layers = ids, layers
    last = out.logits[:, -1]  # [1, V]
    n_prompt = layers[0][0].shape[2] if layers else 0

    def packed(filled: list[list[int]]) -> list[float]:
        inputs, positions, mask = packed_continuations(filled, n_prompt, dtype=last.dtype)
        rows = [last[:0]] * len(filled)  # per continuation: logits after each of its tokens but the last [C-1, V]
        if inputs.shape[1]:
            step = model(input_ids=inputs.to(device), position_ids=positions.to(device),
                         attention_mask=mask.to(device), use_cache=True, **{cache_arg: _cache_of(layers)})
            rows = step.logits[0].split([len(ids) - 1 for ids in filled])
        return [float(F.cross_entropy(torch.cat([last, own]).float(), torch.tensor(ids, device=device),
                                      reduction="sum")) / len(ids) for ids, own in zip(filled, rows)]

    return in_place(continuations, packed)


def packed_continuations(continuations: list[list[int]], n_prompt: int, dtype=torch.float32
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every continuation but its last token, packed into one row after an ``n_prompt``-token prompt cache:
    (input ids [1, Q], position ids [1, Q], each continuation restarting at ``n_prompt``; an additive attention
    mask [1, 1, Q, n_prompt + Q] letting each token see the whole prompt and only its own continuation's earlier
    tokens). One pass then scores all continuations as separate passes would, reading the prompt's key/values
    once instead of once per continuation."""
    lengths = [len(ids) - 1 for ids in continuations]
    inputs = torch.tensor([[t for ids in continuations for t in ids[:-1]]], dtype=torch.long).reshape(1, -1)
    offsets = torch.cat([torch.arange(n) for n in lengths]) if lengths else torch.zeros(0, dtype=torch.long)
    owner = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths, dtype=torch.long))
    own = (owner[:, None] == owner[None, :]) & (offsets[:, None] >= offsets[None, :])  # [Q, Q]
    allowed = torch.cat([torch.ones(len(owner), n_prompt, dtype=torch.bool), own], dim=1)
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    return inputs, (n_prompt + offsets).reshape(1, -1), mask[None, None]


def make_prompt(params: dict) -> PromptTemplate:
    """The task's shared prompt template from its params (``prompt_template``, ``system_prompt``)."""
    return PromptTemplate(
        template=params.get("prompt_template") or DEFAULT_TEMPLATE,
        closed_book=params.get("closed_book_template") or CLOSED_BOOK_TEMPLATE,
        system=params.get("system_prompt") or DEFAULT_SYSTEM,
    )
