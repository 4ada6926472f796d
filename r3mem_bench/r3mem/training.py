"""R3Mem's training losses (see the package docstring): next-segment LM through the recurrent memory, KL to the
base model on the first segment, reconstruction from the memory and the cycle between memory and reconstruction,
over document, paragraph and entity context-query pairs."""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F

from r3mem_bench.entities import EXTRACTORS, entity_contexts, sentences
from r3mem_bench.errors import UserError
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
        """Reconstruction NLL of ``target`` [B, T] (+EOS) from ``memory`` and the cycle loss via ``prev`` memory."""
        out = {}
        eos = torch.full((target.shape[0], 1), self.eos, device=target.device)
        full = torch.cat([target, eos], dim=1)
        if self.cfg["w_recon"] > 0:
            logits = self.expand_logits(memory, full)
            nll = token_nll(logits, full)
            out["recon"] = nll.mean()
            out["recon_acc"] = (logits.argmax(-1) == full).float().mean().detach()
        if self.cfg["w_cycle"] > 0:
            if "recon" not in out:
                logits = self.expand_logits(memory, full)
            guess = logits[:, :-1].argmax(-1).detach()  # the reconstruction, stop-gradient: [1, T]
            _, again = self.compress(guess, prev.detach())
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

        Only the autoencoding warm-up takes a micro-batch (one pass for all B samples); after it each sample draws
        its own memory size and hierarchy level, so a micro-batch is refused (``--grad-accum`` gives the batch)."""
        c = self.cfg
        batched = segments[0].dim() == 2
        warmup = getattr(self, "train_step", 0) < int(c["recon_warmup_steps"])
        if batched and not warmup:
            raise UserError("r3mem: --micro-batch > 1 batches only the autoencoding warm-up (recon_warmup_steps); "
                            "fix: train later stages with --micro-batch 1 and --grad-accum for the batch")
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
        empty = self.empty_memory(M)
        level = LEVELS[int(torch.multinomial(torch.tensor(c["level_probs"], dtype=torch.float), 1))]
        pair = self._pair(segments, level) if level != "document" else None
        if pair is None:
            level = "document"
        if level == "document":
            memory, lm_terms = empty, []
            for t, seg in enumerate(segments):
                tokens = seg.to(dev).unsqueeze(0)
                nll, logits, new = self._lm_nll(memory, tokens, write=True)
                if t == 0 and c["w_kl"] > 0:
                    with torch.no_grad(), self.net.disable_adapter():
                        ref = self.net(input_ids=torch.cat([torch.tensor([[self.bos]], device=dev), tokens], 1)).logits[:, :-1]
                    losses["kl"] = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(ref, -1), log_target=True,
                                            reduction="none").sum(-1).mean()
                    self._adapter = None  # disable_adapter changed peft's state; re-select on next use
                elif t > 0:
                    lm_terms.append(nll)
                prev, memory = memory, new
            losses["lm"] = torch.stack(lm_terms).mean() if lm_terms else zero
            losses.update(self._recon_and_cycle(memory, segments[-1].to(dev).unsqueeze(0), prev))
        else:
            context, query = pair
            memory = empty
            for seg in context:
                prev, (_, memory) = memory, self.compress(seg.to(dev).unsqueeze(0), memory)
            losses["lm"], _, _ = self._lm_nll(memory, query.to(dev).unsqueeze(0), write=False)
            losses.update(self._recon_and_cycle(memory, context[-1].to(dev).unsqueeze(0), prev))
        losses["loss"] = (c["w_lm"] * losses["lm"] + c["w_kl"] * losses["kl"] + c["w_recon"] * losses["recon"]
                          + c["w_cycle"] * losses["cycle"])
        losses["M"] = torch.tensor(float(M))
        losses[f"level_{level}"] = torch.tensor(1.0)
        return losses
