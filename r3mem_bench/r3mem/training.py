"""R3Mem's training losses (see the package docstring): next-segment LM through the recurrent memory, KL to the
base model on the first segment, reconstruction from the memory and the cycle between memory and reconstruction,
over document, paragraph and entity context-query pairs."""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F

from r3mem_bench.entities import EXTRACTORS, entity_contexts, sentences
from r3mem_bench.r3mem.layout import LEVELS
from r3mem_bench.scoring import token_nll


class TrainingMixin:
    """The ``training_losses`` of the trainer interface (``r3mem_bench/train.py``), for :class:`R3Mem`."""

    # ---- training --------------------------------------------------------------------------------------
    def _lm_nll(self, memory: torch.Tensor, tokens: torch.Tensor, write: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Mean NLL of ``tokens`` [1, T] read after ``memory``; also the logits and the written memory."""
        logits, new = self.read(tokens, memory, write=write)
        return token_nll(logits, tokens).mean(), logits, new

    def _recon_and_cycle(self, memory: torch.Tensor, target: torch.Tensor, prev: torch.Tensor) -> dict[str, torch.Tensor]:
        """Reconstruction NLL of ``target`` [B, T] (+EOS) from ``memory`` and the cycle loss via ``prev`` memory.

        The cycle re-compresses the reconstruction after ``prev`` and matches the memory it gives to ``memory``
        (1 - cosine per key/value vector; ``memory`` is the fixed target). ``train_cycle=argmax``: the
        reconstruction is the argmax of the teacher-forced logits, gradient stopped, so only the writer learns
        from it. ``train_cycle=soft``: the reconstruction is the expected embedding under the teacher-forced
        distribution (softmax(logits) @ E), so the cycle's gradient reaches both adapters. Both decode with
        teacher forcing: a free-running decode would cost T sequential passes per sample."""
        out = {}
        eos = torch.full((target.shape[0], 1), self.eos, device=target.device)
        full = torch.cat([target, eos], dim=1)
        if self.cfg["w_recon"] > 0 or self.cfg["w_cycle"] > 0:
            logits = self.expand_logits(memory, full)  # [B, T+1, V]
            best = logits.detach().argmax(-1)  # [B, T+1]
        if self.cfg["w_recon"] > 0:
            out["recon"] = token_nll(logits, full).mean()
            out["recon_acc"] = (best == full).float().mean()
        if self.cfg["w_cycle"] > 0:
            if self.cfg["train_cycle"] == "soft":
                soft = logits[:, :-1].float().softmax(-1) @ self.embed.weight  # [B, T, d]
                _, again = self.compress(None, prev.detach(), embeds=soft.to(self.embed.weight.dtype))
            else:  # the reconstruction, stop-gradient: [B, T]
                _, again = self.compress(best[:, :-1], prev.detach())
            out["cycle"] = (1 - F.cosine_similarity(again, memory.detach(), dim=-1)).mean()
        return out

    def _pair(self, segments: list[torch.Tensor], level: str) -> tuple[list[torch.Tensor], torch.Tensor] | None:
        """(context segments, query target) for a hierarchy level, built from the sample's text."""
        tok = self.lm.tokenizer
        S = int(self.cfg["segment_len"])
        text = tok.decode(torch.cat(segments).tolist())

        def ids(s: str, cap: int) -> torch.Tensor:
            return torch.tensor(tok(s, add_special_tokens=False)["input_ids"][:cap], dtype=torch.long)

        if level == "paragraph":
            paragraphs = [p for p in re.split(r"\n\s*\n", text) if len(p.split()) >= 12]
            if not paragraphs:
                return None
            par = paragraphs[int(torch.randint(len(paragraphs), (1,)))]
            first = sentences(par)[0]
            return [ids(par, S)], ids(first, 48)
        ents = entity_contexts(text, extractor=EXTRACTORS[self.cfg["entity_extractor"]])
        if not ents:
            return None
        names = list(ents)
        sents = ents[names[int(torch.randint(len(names), (1,)))]]
        return [ids(" ".join(sents[:-1]), S)], ids(sents[-1], 48)

    def training_losses(self, segments: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Losses of one training sample (consecutive [S] segments of one document), or of a micro-batch ([B, S]
        segments of B documents); ``loss`` is their weighted sum.

        A micro-batch shares one memory size and one hierarchy level: document-level pairs (and the autoencoding
        warm-up) run as one batched pass; paragraph and entity pairs, whose contexts differ in length, run one
        sample at a time and their losses are averaged. The BOS and empty-memory passes run once per call (the
        weights change between calls) and every use shares their graph."""
        self._cache, self._in_step = {}, True
        try:
            return self._training_losses(segments)
        finally:
            self._cache, self._in_step = {}, False

    def _training_losses(self, segments: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        c = self.cfg
        batched = segments[0].dim() == 2
        warmup = getattr(self, "train_step", 0) < int(c["recon_warmup_steps"])
        sizes, probs = c["train_memory_sizes"], torch.tensor(c["train_memory_probs"], dtype=torch.float)
        M = int(sizes[int(torch.multinomial(probs, 1))])
        dev = self.lm.device
        zero = torch.zeros((), device=dev)
        losses = {"lm": zero, "kl": zero, "recon": zero, "cycle": zero}
        if warmup:
            # autoencoding warm-up (as ICAE's pretraining): the memory of one segment must reconstruct it
            seg = segments[0].to(dev)
            seg = seg if batched else seg.unsqueeze(0)  # [B, S]
            empty = self.empty_memory(M, batch=seg.shape[0])
            _, memory = self.compress(seg, empty)
            losses.update(self._recon_and_cycle(memory, seg, empty))
            losses["loss"] = c["w_recon"] * losses["recon"] + c["w_cycle"] * losses["cycle"]
            losses["M"], losses["level_warmup"] = torch.tensor(float(M)), torch.tensor(1.0)
            return losses
        level = LEVELS[int(torch.multinomial(torch.tensor(c["level_probs"], dtype=torch.float), 1))]
        docs = [s.to(dev) if batched else s.to(dev).unsqueeze(0) for s in segments]  # [B, S] each
        if len(c["level_probs"]) == len(LEVELS):
            losses["qa"] = zero
        pairs = None
        if level == "qa":
            losses["qa"] = torch.stack([self._qa_loss(M) for _ in range(docs[0].shape[0])]).mean()
        elif level != "document":
            samples = [[s[b] for s in segments] for b in range(docs[0].shape[0])] if batched else [segments]
            pairs = [self._pair(sample, level) for sample in samples]
            if any(p is None for p in pairs):
                level, pairs = "document", None
        if level == "document":
            losses.update(self._document_losses(docs, M))
        elif level != "qa":
            parts = [self._pair_losses(context, query, M) for context, query in pairs]
            for k in parts[0]:
                losses[k] = torch.stack([p[k] for p in parts]).mean()
        losses["loss"] = (c["w_lm"] * losses["lm"] + c["w_kl"] * losses["kl"] + c["w_recon"] * losses["recon"]
                          + c["w_cycle"] * losses["cycle"] + c["w_qa"] * losses.get("qa", zero))
        losses["M"] = torch.tensor(float(M))
        losses[f"level_{level}"] = torch.tensor(1.0)
        return losses

    def _document_losses(self, docs: list[torch.Tensor], M: int) -> dict[str, torch.Tensor]:
        """Document level: LM of segments 2.. through the recurrent memory, KL to the base model on the first,
        reconstruction and cycle of the last segment from the last memory (``train_recon_segments=last``) or of
        every segment from the memory that has just absorbed it (``all``, one batched pass); ``docs`` [B, S]
        segments of B documents."""
        c, dev = self.cfg, self.lm.device
        out: dict[str, torch.Tensor] = {}
        memory, lm_terms = self.empty_memory(M, batch=docs[0].shape[0]), []
        written: list[tuple[torch.Tensor, torch.Tensor]] = []  # (memory before, memory after) each segment
        for t, tokens in enumerate(docs):
            if t == 0:  # the first segment's LM loss is not used (its KL to the base model is, if weighted)
                logits, new = self.read(tokens, memory, write=True)
            else:
                nll, logits, new = self._lm_nll(memory, tokens, write=True)
            if t == 0 and c["w_kl"] > 0:
                with torch.no_grad(), self.net.disable_adapter():
                    bos = torch.full((tokens.shape[0], 1), self.bos, device=dev)
                    ref = self.net(input_ids=torch.cat([bos, tokens], 1)).logits[:, :-1]
                out["kl"] = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(ref, -1), log_target=True,
                                     reduction="none").sum(-1).mean()
                self._adapter = None  # disable_adapter changed peft's state; re-select on next use
            elif t > 0:
                lm_terms.append(nll)
            written.append((memory, new))
            prev, memory = memory, new
        if lm_terms:
            out["lm"] = torch.stack(lm_terms).mean()
        if c["train_recon_segments"] == "all":  # segments stacked on the batch axis: [K*B, S]
            out.update(self._recon_and_cycle(torch.cat([after for _, after in written], dim=2), torch.cat(docs),
                                             torch.cat([before for before, _ in written], dim=2)))
        else:
            out.update(self._recon_and_cycle(memory, docs[-1], prev))
        return out

    def _qa_loss(self, M: int) -> torch.Tensor:
        """QA level (a fourth ``level_probs`` entry): a question of the bundled training pairs
        (``wiki_train_qa``: the questions of the ``wiki_train`` documents with the passages that answer them), its
        passages compressed one memory each from the empty memory and set side by side as ``qa_reader=memory``
        reads them (as many as fit in ``max_memory_tokens``), then the mean NLL of the gold answer read after
        ``[BOS][memories][read marker][closed-book prompt]`` through the reading adapter, with the prompt
        encoded as the QA tasks encode it (chat template, the shared system text)."""
        if not hasattr(self, "_qa_data"):
            from r3mem_bench.data import bundled_jsonl
            from r3mem_bench.generation import HFGenerator, PromptTemplate

            template = PromptTemplate()
            self._qa_data = (bundled_jsonl("wiki_train_qa"), template, HFGenerator(self.lm, system=template.system))
        data, template, enc = self._qa_data
        pair = data[int(torch.randint(len(data), (1,)))]
        dev, tok = self.lm.device, self.lm.tokenizer
        room = max(1, int(self.cfg["max_memory_tokens"]) // M)
        S = int(self.cfg["segment_len"])
        memory = self.side_by_side([self.compress(torch.tensor([tok(passage, add_special_tokens=False)["input_ids"][:S]],
                                                               device=dev), self.empty_memory(M))[1]
                                    for passage in pair["passages"][:room]])  # [L,2,1,H,n*M,D]
        prompt = enc.encode(template.render(question=pair["question"], context=""))
        answer = enc.continuation_ids(pair["answer"])
        _, hidden, _ = self.read_after(memory, prompt + answer[:-1])
        C = len(answer)  # the prompt's last token predicts answer[0]
        return token_nll(self.lm_head(hidden[:, -C:]), torch.tensor([answer], device=dev)).mean()

    def _pair_losses(self, context: list[torch.Tensor], query: torch.Tensor, M: int) -> dict[str, torch.Tensor]:
        """Paragraph or entity level: LM of the query read after the memory of its context, reconstruction and
        cycle of the context's last piece."""
        dev = self.lm.device
        memory = self.empty_memory(M)
        for seg in context:
            prev, (_, memory) = memory, self.compress(seg.to(dev).unsqueeze(0), memory)
        out = {"lm": self._lm_nll(memory, query.to(dev).unsqueeze(0), write=False)[0]}
        out.update(self._recon_and_cycle(memory, context[-1].to(dev).unsqueeze(0), prev))
        return out
