"""Generation backends and the shared prompt template of the QA families.

``Generator`` is the interface (``generate(prompts) -> [Generation]``); ``HFGenerator`` implements it with
``transformers`` ``generate`` (greedy, batched with left padding, KV cache). A vLLM backend plugs in behind the
same interface. Prompts go through the tokenizer's chat template when it has one.

Answer likelihood (the QA families' ``answer_nll`` and ``choice_acc``) scores texts as continuations of the same
encoded prompt the generator would answer from: ``HFGenerator.continuation_ids`` tokenises an answer as the
model would emit it after that prompt (plain tokens after a chat template's assistant header; with a leading
space after a plain-text prompt) and :func:`continuation_nll` runs the prompt once, then every continuation on
its KV cache.
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


@torch.no_grad()
def continuation_nll(model, continuations: list[list[int]], prompt_ids: list[int] | None = None,
                     prompt_embeds: torch.Tensor | None = None) -> list[tuple[float, int]]:
    """(mean per-token NLL in nats, token count) of each continuation after one shared prompt.

    The prompt (token ids, or input embeddings [1, P, H] for methods that splice vectors into it) goes through
    ``model`` once with a KV cache; each continuation is then run on that cache, which is cropped back to the
    prompt afterwards. Its first token is predicted from the prompt's last position. An empty continuation
    gives ``(nan, 0)``; no continuation runs nothing.
    """
    if not continuations:
        return []
    device = next(model.parameters()).device
    params = inspect.signature(model.forward).parameters
    cache_arg = "cache" if "cache" in params else "past_key_values"  # transformers 5 renamed it
    keep = next(({k: 1} for k in ("logits_to_keep", "num_logits_to_keep") if k in params), {})  # last logits only
    if prompt_embeds is not None:
        out = model(inputs_embeds=prompt_embeds.to(device), use_cache=True, **keep)
        n_prompt = prompt_embeds.shape[1]
    else:
        out = model(input_ids=torch.tensor([prompt_ids], dtype=torch.long, device=device), use_cache=True, **keep)
        n_prompt = len(prompt_ids)
    cache = getattr(out, "cache", None) or out.past_key_values
    last = out.logits[:, -1:]
    scores = []
    for ids in continuations:
        if not ids:
            scores.append((float("nan"), 0))
            continue
        target = torch.tensor([ids], dtype=torch.long, device=device)
        logits = last
        if len(ids) > 1:
            step = model(input_ids=target[:, :-1], use_cache=True, **{cache_arg: cache})
            logits = torch.cat([last, step.logits], dim=1)
            cache.crop(-(cache.get_seq_length() - n_prompt))  # negative: drop that many (old and new APIs)
        nll = F.cross_entropy(logits[0].float(), target[0], reduction="sum")
        scores.append((float(nll) / len(ids), len(ids)))
    return scores


def make_prompt(params: dict) -> PromptTemplate:
    """The task's shared prompt template from its params (``prompt_template``, ``system_prompt``)."""
    return PromptTemplate(
        template=params.get("prompt_template") or DEFAULT_TEMPLATE,
        closed_book=params.get("closed_book_template") or CLOSED_BOOK_TEMPLATE,
        system=params.get("system_prompt") or DEFAULT_SYSTEM,
    )
