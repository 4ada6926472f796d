"""An lm-evaluation-harness model that runs any lm-eval task through a memory method ("with memory").

Importing this module registers the model ``r3mem-bench`` in lm-eval's registry. lm-eval 0.4.13 discovers no
plugin entry points (its registry only loads built-in names and lazy ``module:attr`` strings), so the CLI route is
our wrapper, which imports this module and then hands all arguments to ``lm_eval``'s own CLI::

    HF_HUB_OFFLINE=1 r3mem-bench lm-eval --model r3mem-bench \\
        --model_args model=smollm2-135m,method=no_memory,segment_len=512 --tasks lambada_openai --limit 20

From Python: ``lm_eval.simple_evaluate(model=R3MemLM(model="tiny-random", method="full_context"), tasks=[...])``.
Model args: ``model`` (a ``--model`` name), ``method`` (a registered memory method), ``checkpoint`` (trained
adapter dir), ``segment_len`` (tokens per memory segment, default 512), ``backend`` (hf|vllm|auto, for QA
generation), ``threads``; any other ``key=value`` becomes a method option (like ``--method-arg``).

Request types:

* ``loglikelihood(context, continuation)``: the method is reset, the context is streamed through it in segments
  of ``segment_len`` tokens and the continuation is the last segment of the same stream, so its NLL is given the
  method's memory of the context. ``is_greedy`` (lambada's ``acc``) is whether every continuation token was the
  argmax where it was scored, recorded by the shared NLL helpers (``scoring.recording_greedy``); a plugin method
  that scores without them gets False and a warning.
* ``loglikelihood_rolling(text)``: the document is scored as an LM stream (same as our LM family).
* ``generate_until(context, gen_kwargs)``: lm-eval's prompt is used as it is, with no template of ours around it.
  Methods that apply to QA families ingest the context (all but its last blank-line-separated block, cut into
  ``segment_len``-token items) and answer the last block after their retrieved context (``method.answer`` with
  the prompt ``{context}\n\n{question}`` and no chat template); LM-only methods generate greedily from the raw
  context with ``transformers``. Output is cut at the first ``until`` string. lm-eval's ``--apply_chat_template``
  formats prompts with the tokenizer's chat template (``apply_chat_template`` below) before they arrive here.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from r3mem_bench.errors import UserError

log = logging.getLogger(__name__)
RAW_TEMPLATE = "{context}\n\n{question}"  # QA methods: retrieved context, then lm-eval's last block


@register_model("r3mem-bench")
class R3MemLM(LM):
    """A base model plus a memory method, as an lm-eval ``LM``."""

    def __init__(self, model: str = "smollm2-135m", method: str = "full_context", checkpoint: str | None = None,
                 segment_len: int = 512, backend: str = "hf", threads: int | None = None,
                 device: str | None = None, **kwargs: Any):
        super().__init__()
        from r3mem_bench.methods import get_method_class
        from r3mem_bench.models import load_model

        for key in ("batch_size", "max_batch_size", "max_length"):  # lm-eval's generic args: not used here
            kwargs.pop(key, None)
        self.segment_len = int(segment_len)
        if self.segment_len <= 0:
            raise UserError(f"segment_len={segment_len}: must be positive; fix: e.g. segment_len=512")
        if device and str(device).startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's CLI passes its default device (cuda); fall back to the CPU as lm-eval's own hf model does
            import warnings

            warnings.warn(f"r3mem-bench lm-eval adapter: device={device} but CUDA is not available; using cpu",
                          stacklevel=2)
            device = "cpu"
        self.lm = load_model(model, device=device or None, threads=int(threads) if threads else None)
        cls = get_method_class(method)
        options = dict(kwargs)
        if checkpoint:
            options["checkpoint"] = checkpoint
        self.qa = bool({"rag", "dialogue"} & set(cls.families))
        generator = prompt = None
        if self.qa:
            from r3mem_bench.backends import make_generator
            from r3mem_bench.generation import make_prompt

            generator = make_generator(self.lm, {}, backend)
            generator.chat, generator.system = False, ""  # lm-eval's prompt as it is
            prompt = make_prompt({"prompt_template": RAW_TEMPLATE, "closed_book_template": "{question}"})
        self.method = cls(self.lm, options, generator=generator, prompt=prompt)
        self._warned_greedy = False

    # ---- helpers ----------------------------------------------------------------------------------------
    def _encode(self, text: str) -> list[int]:
        return self.lm.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _segments(self, ids: list[int]) -> list[torch.Tensor]:
        return [torch.tensor(ids[i:i + self.segment_len], dtype=torch.long) for i in range(0, len(ids), self.segment_len)]

    def _stream(self, key: str, ids: list[int], tail: list[int] | None = None) -> list[torch.Tensor]:
        """Reset the method and score ``ids`` (then ``tail`` as the final segment) as one stream."""
        if "lm" not in type(self.method).families:
            raise UserError(f"method '{self.method.name}' scores no token likelihoods (families: "
                            f"{', '.join(type(self.method).families)}), so it cannot serve loglikelihood requests; "
                            "fix: use it on generate_until tasks, or pick a method of the lm family")
        segments = self._segments(ids) + ([torch.tensor(tail, dtype=torch.long)] if tail else [])
        self.method.begin(key)
        self.method.reset()
        return self.method.score_stream(segments)

    # ---- lm-eval API ------------------------------------------------------------------------------------
    @property
    def tokenizer_name(self) -> str:
        """Fingerprint of the chat template for lm-eval's request cache."""
        return str(getattr(self.lm.tokenizer, "name_or_path", self.lm.name)).replace("/", "__")

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """lm-eval's ``--apply_chat_template``: the tokenizer's chat template around the few-shot history."""
        return self.lm.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                     add_generation_prompt=add_generation_prompt)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """Log-likelihood of each continuation after its context streamed through the memory method, and whether
        it is the greedy continuation."""
        from tqdm import tqdm

        from r3mem_bench.scoring import recording_greedy

        out = []
        for n, req in enumerate(tqdm(requests, disable=disable_tqdm, desc="r3mem-bench loglikelihood")):
            context, continuation = req.args
            # as lm-eval's HFLM does: trailing whitespace of the context belongs to the continuation
            spaces = len(context) - len(context.rstrip())
            if spaces:
                context, continuation = context[:-spaces], context[-spaces:] + continuation
            whole = self._encode(context + continuation)
            ctx = self._encode(context) if context else []
            cont = whole[len(ctx):]
            if not cont:
                raise UserError(f"request {n}: empty continuation after tokenization; fix: check the task's target")
            with recording_greedy() as flags:
                nll = self._stream(f"ll-{n}", whole[:len(ctx)], cont)[-1]
            scored = torch.cat(flags) if flags else torch.empty(0, dtype=torch.bool)
            if scored.numel() < len(cont):  # the method scored without the shared helpers
                if not self._warned_greedy:
                    log.warning("r3mem-bench: method '%s' records no argmax; is_greedy is reported False",
                                self.method.name)
                    self._warned_greedy = True
                greedy = False
            else:
                greedy = bool(scored[-len(cont):].all())  # the continuation is the stream's last tokens scored
            out.append((-float(nll.double().sum()), greedy))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole document, scored as an LM stream through the method."""
        from tqdm import tqdm

        out = []
        for n, req in enumerate(tqdm(requests, disable=disable_tqdm, desc="r3mem-bench loglikelihood_rolling")):
            (text,) = req.args[:1]
            ids = self._encode(text)
            nlls = self._stream(f"roll-{n}", ids) if ids else []
            out.append(-sum(float(x.double().sum()) for x in nlls))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy generation: ``method.answer`` for QA methods, else HF generate on the raw context."""
        from tqdm import tqdm

        from r3mem_bench.method import MemoryItem

        out = []
        for n, req in enumerate(tqdm(requests, disable=disable_tqdm, desc="r3mem-bench generate_until")):
            context, gen_kwargs = req.args
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.get("max_gen_toks", 256))
            if self.qa:
                head, _, question = context.rstrip().rpartition("\n\n")
                ids = self._encode(head)
                items = [MemoryItem(id=f"ctx-{i}", text=self.lm.tokenizer.decode(seg.tolist()))
                         for i, seg in enumerate(self._segments(ids))]
                self.method.begin(f"gen-{n}")
                self.method.reset()
                if items:
                    self.method.ingest(items)
                self.method.generator.max_new_tokens = max_new
                text = self.method.answer(question).text
            else:
                text = self._hf_generate(context, max_new)
            for stop in until:
                if stop and stop in text:
                    text = text[: text.index(stop)]
            out.append(text)
        return out

    @torch.no_grad()
    def _hf_generate(self, context: str, max_new: int) -> str:
        """Greedy continuation of the raw context (left-truncated to fit the window)."""
        tok = self.lm.tokenizer
        ids = [self.lm.prefix_token_id] + self._encode(context)
        ids = ids[-(self.lm.max_length - max_new):]
        gen = self.lm.model.generate(input_ids=torch.tensor([ids], device=self.lm.device), max_new_tokens=max_new,
                                     do_sample=False, num_beams=1, pad_token_id=tok.pad_token_id)
        return tok.decode(gen[0, len(ids):].tolist(), skip_special_tokens=True)
