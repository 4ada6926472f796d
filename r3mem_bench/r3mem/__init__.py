"""R3Mem: retention and retrieval through reversible context compression.

The package: ``layout`` (options, slot layout, key rotation), ``model`` (the memory network: construction, the
compress / expand / read passes, LM streams, checkpoints), ``training`` (the losses), ``qa`` (hierarchical memories,
retrieval and the two answering paths) and ``variants`` (ablations and controls).

What the paper states (Wang, Wang, Zhu, Liu, "R3Mem: Bridging Memory Retention and Retrieval via Reversible
Compression", Findings of ACL 2025, arXiv 2502.15957; abstract and Figure 2 caption; no public code)
------------------------------------------------------------------------------------------------------------
* A memory network optimised for both retention and retrieval through reversible context compression.
* Virtual memory tokens compress and encode arbitrarily long histories.
* Hierarchical compression: raw text becomes compact representations at document, paragraph and entity level,
  with context-query pairs built at those levels.
* A reversible architecture: a forward model compresses; a backward model reconstructs the original information
  from the compressed memory ("invoking the model backward").
* Parameter-efficient fine-tuning (adapters), so it attaches to any Transformer; bidirectional and
  cycle-consistent training losses.

Design choices made here to fill the gaps (see ../shared/design/r3mem.md for the probes behind them)
------------------------------------------------------------------------------------------------------
* Base: the frozen decoder; two peft LoRA adapters on every linear layer, ``compress`` (forward model) and
  ``expand`` (backward model), switched per pass; M learned memory-slot embeddings and one learned
  reconstruction-marker embedding. Relatives: ICAE (Ge et al. 2024, getao/icae: LoRA encoder + memory slots,
  frozen decoder reconstructs from ``[memory, AE token]``), RMT (Bulatov et al. 2022,
  booydar/recurrent-memory-transformer: recurrent memory tokens across segments), gisting (Mu et al. 2023:
  the gist tokens' keys/values are the compressed prompt).
* Memory = the slots' keys and values at every layer (a KV memory, as in gisting), not last-layer states re-fed
  as embeddings. Measured in the design doc with SmolLM2-135M on 2 CPU threads: re-fed last-layer states wreck
  the model unless rescaled (PPL 856 -> 60) and barely reconstruct (33% token accuracy vs 32% with an empty
  memory); a KV memory with LoRA r16 on every linear layer at lr 1e-3 reconstructs at 53.5% vs 18.4% empty.
* Layout of every pass: ``[BOS @0][memory @1..M][marker @M+1][text and new slots @M+2..]``. A real token
  stays at position 0 (attention sink: a memory vector there derailed the model in the probe). The new slots
  sit among the text at their natural positions (``slot_layout``, below); their keys are then re-rotated (RoPE
  is a rotation, so rotating by -shift moves a key to another position exactly) to positions 1..M, so a memory
  is position-independent and the recurrence ``memory_t = compress(segment_t | memory_{t-1})`` keeps the same
  layout for ever: a constant-size state for any history length. ``slot_positions=ordered`` (default) keys
  written slot j at position 1+j, as the empty memory's slots sit; ``collapsed`` keys every written slot at
  position 1, which is how the shipped checkpoints were trained (a checkpoint without the key loads as
  ``collapsed``).
* Where the slots go (``slot_layout=anchored``, the one layout implemented): slot j right after text token
  ceil((j+1)T/M)-1, so each slot follows the span it summarises, as Activation Beacon's beacons do (Zhang et
  al. 2024, arXiv 2401.03462), and every slot still sees the whole prefix; slot j's input embedding is its learned
  vector plus the embedding of the text token just before it, so each virtual token starts out as a copy of a
  real one and the expand adapter can read it as text. In the autoencoding stage it reconstructed better than
  all slots after the text and than the same interleaving without the anchor, on the same data and seed (the
  probe is in ../shared/design/r3mem.md and git history).
* Forward (retain, ``compress`` adapter): ``[BOS][memory][BOS as read marker][segment][slots]`` writes the next
  memory (the slots' keys/values). The memory before the first segment is the "empty" memory: the slots run
  through ``[BOS][slots]`` alone.
* Backward (retrieve, ``expand`` adapter): ``[BOS][memory][AE marker]`` decodes the text (teacher forcing in
  training, greedy in ``reconstruct(memory)``), ending with EOS.
* Reading the memory for the next segment (``reader=expand``, the one reader implemented): the decoder side
  reads, as in ICAE where one decoder both reconstructs (AE token) and continues (LM token) from the memory:
  ``[BOS][memory][BOS][segment]`` under ``expand`` scores the segment (the read marker BOS predicts its first
  token; no_memory starts from the same BOS), then a ``compress`` pass writes. The writer may change freely
  while the reader is the adapter that has learnt to attend to memories. Cost: two passes per segment, counted
  in ``tokens_processed``.
* Training in two stages with the project's ``train`` command: (1) ``recon_warmup_steps`` steps of
  autoencoding only (one segment -> memory -> reconstruct it; ICAE's pretraining objective), which teaches the
  writer to put the text into the slots; (2) ``train --init-from STAGE1`` with every loss below.
* Losses (weights in the options): ``lm`` = next-segment NLL given the recurrent memory (segments 2..K);
  ``kl`` = KL(base || adapted) on the first segment, read with the empty memory (keeps the adapter's own drift
  small: the probe lost ~8 PPL to drift on other text); ``recon`` = reconstruction NLL of the last segment
  from the memory (g(f(x)) ~ x); ``cycle`` = 1 - cosine between the memory of the (argmax, stop-gradient)
  reconstruction and the memory itself (f(g(m)) ~ m). Training options for the backward path:
  ``train_recon_segments=all`` reconstructs every segment from the memory that has just absorbed it (default
  ``last``: the last segment only); ``train_cycle=soft`` re-compresses the expected embeddings of the
  teacher-forced reconstruction, so the cycle also trains the expand adapter (default ``argmax``).
* Hierarchy, as context-query pairs sampled per training sample (``level_probs``): document (the recurrent
  memory over consecutive segments -> next segment), paragraph (one paragraph's memory -> its key sentence,
  taken as its first sentence) and entity (the sentences mentioning an entity, found by the pluggable offline
  extractor of ``r3mem_bench.entities`` -> another sentence about it). In QA, each item (passage / turn /
  session) becomes a paragraph memory, frequent entities get entity memories keyed by their name, and a
  document memory runs over the whole history (items packed into segments of up to ``segment_len``
  tokens). A question is matched to paragraph memories by query
  likelihood (how much a memory lowers the NLL of the question through the read path, relative to the
  empty memory) and to entity memories by name. ``qa_reader=reconstruct`` (default): the chosen memories are
  reconstructed and the reconstructions are the context of the shared prompt. ``qa_reader=memory`` (variant
  ``r3mem_kv``): the answer is read, as gist tokens and ICAE condition generation do, directly after the chosen
  memories' key/values, ``[BOS][memories][read marker][closed-book prompt]``, through the reading adapter (as many
  memories as fit in ``max_memory_tokens`` slots); no text context. The QA level below trains this reader (the
  shipped recipe gives it 30% of the second stage's samples). Stored memories are float16.
* QA pairs as a fourth level (``level_probs`` with a fourth share, off by default): a question of the bundled
  ``wiki_train_qa`` pairs (the questions behind the ``wiki_train`` documents, with the passages that answer
  them), each passage compressed into its own memory, and the gold answer's NLL read after
  ``[BOS][memories][read marker][closed-book prompt]`` exactly as ``qa_reader=memory`` answers (loss ``qa``,
  weight ``w_qa``), so the reader learns to answer from memories and the writer to keep what answers need.
* Memory size: the checkpoint holds ``max_memory_tokens`` slots and training samples M from
  ``train_memory_sizes`` per sample (nested slots), so one checkpoint serves ``memory_tokens`` = 8/16/32/64.
* Variants: ``r3mem_kv`` (QA answered from the memories' key/values, above), ``r3mem_reset`` (same weights,
  memory emptied at every segment: the adapter's share),
  ``r3mem_no_recon`` (no reconstruction and no cycle loss), ``r3mem_no_cycle`` (reconstruction kept, cycle
  loss off) and ``r3mem_no_hier`` (document-level pairs only, a QA share kept; QA keeps one recurrent memory). The ablations
  change training: each loads its own shipped checkpoint (``results/checkpoints/<variant>-<model>``) when there
  is one, else R3Mem's (then it differs from ``r3mem`` only at inference). The shipped ones are matched: the
  shipped recipe's second stage (same stage-1 initialisation, layout, data, steps, schedule, seed and thread
  count) with the one part removed; under one seed every variant draws the same samples and memory sizes (and,
  hierarchy kept, the same levels) as R3Mem.
* Training data (not from the paper; the paper trains on large corpora we cannot fetch offline): the
  bundled Wikipedia paragraphs of HotpotQA/MuSiQue train, pydoc train topics and tinyshakespeare (2:1:1); the
  Wikipedia share is what makes the memory help on held-out prose as well as on pydoc.

Measured numbers of the shipped checkpoints live next to their runs, in ``results/r3mem/README.md``.
"""

from r3mem_bench.r3mem.layout import (ARCH_DEFAULTS, RUN_DEFAULTS, repeated_ngram_ends, rotate_keys, slot_order,
                                      trained_arch)
from r3mem_bench.r3mem.model import R3Mem
from r3mem_bench.r3mem.qa import rouge_l
from r3mem_bench.r3mem.variants import R3MemKV, R3MemNoCycle, R3MemNoHier, R3MemReset  # registered on import

__all__ = ["ARCH_DEFAULTS", "RUN_DEFAULTS", "R3Mem", "R3MemKV", "R3MemNoCycle", "R3MemNoHier", "R3MemReset",
           "repeated_ngram_ends", "rotate_keys", "rouge_l", "slot_order", "trained_arch"]
