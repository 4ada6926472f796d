"""QA for methods whose memory is a sequence of input vectors (RMT's memory tokens, ICAE's slots): the closed-book
prompt with the memory spliced in after its first token, for generation and for answer likelihood."""

from __future__ import annotations

import contextlib

import torch

from r3mem_bench.method import Answer, AnswerNLL


def _prefixed(method, gen, question: str, memory: torch.Tensor) -> torch.Tensor:
    """``[first prompt token][memory [1, K, H]][rest of the closed-book chat prompt]`` as input embeddings."""
    ids = torch.tensor(gen.encode(method.prompt.render(question=question, context="")), dtype=torch.long)
    emb = method.body.get_input_embeddings()(ids.view(1, -1).to(method.lm.device))
    return torch.cat([emb[:, :1], memory.to(emb.dtype), emb[:, 1:]], dim=1)


@torch.no_grad()
def answer_from_memory(method, memory: torch.Tensor, question: str, reader=contextlib.nullcontext) -> Answer:
    """Generate greedily from the memory-prefixed prompt with ``method.body`` (under ``reader()``, e.g. with an
    adapter switched off); counts prompt and generated tokens."""
    from r3mem_bench.generation import HFGenerator

    gen = method.generator if hasattr(method.generator, "encode") else HFGenerator(method.lm)
    max_new = int(getattr(method.generator, "max_new_tokens", 32))
    x = _prefixed(method, gen, question, memory)
    mask = torch.ones(x.shape[:2], dtype=torch.long, device=x.device)
    tok = method.lm.tokenizer
    with reader():
        out = method.body.generate(inputs_embeds=x, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                                   num_beams=1, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    new = out[0].tolist()
    if tok.eos_token_id in new:
        new = new[: new.index(tok.eos_token_id)]
    method.tokens_processed += x.shape[1] + len(new)
    return Answer(text=tok.decode(new, skip_special_tokens=True).strip(), retrieved_ids=[],
                  prompt_tokens=x.shape[1], context="")


@torch.no_grad()
def answer_nll_from_memory(method, memory: torch.Tensor, question: str, texts: list[str], given: Answer | None,
                           reader=contextlib.nullcontext) -> AnswerNLL:
    """Mean per-token NLL of each text after the memory-prefixed prompt (the input ``answer_from_memory``
    generates from), run once through ``method.body`` with a KV cache."""
    from r3mem_bench.generation import HFGenerator, continuation_nll

    gen = method.generator
    if not hasattr(gen, "continuation_ids"):
        gen = HFGenerator(method.lm, system=method.prompt.system)
    x = _prefixed(method, gen, question, memory)
    conts = [gen.continuation_ids(t)[: method.lm.max_length // 2] for t in texts]
    if given is None:
        method.tokens_processed += x.shape[1]
    with reader():
        scored = continuation_nll(method.body, conts, prompt_embeds=x)
    return AnswerNLL([s for s, _ in scored], [n for _, n in scored], x.shape[1], [], "")
