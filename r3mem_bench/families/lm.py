"""Long-context language modeling: documents streamed in segments, scored by every method on the same segments.

Protocol: a document is tokenized once (no special tokens), truncated to ``max_tokens`` when set, and cut into
segments of ``segment_len`` tokens. The method sees the segments in order (``MemoryMethod.score_stream``) and
returns each token's NLL given its memory; the first token of a document is predicted from the model's document
prefix token (recorded in the manifest). Segments before ``warmup_segments`` are fed but not scored.
Metrics: token perplexity and bits per byte over scored segments, ``ppl_after_first`` over segments 1.., the
NLL per segment index (position curve), tokens processed, peak memory-state bytes and seconds per segment.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from r3mem_bench.data import bundled_text
from r3mem_bench.errors import UserError
from r3mem_bench.families import Family, register_family

LN2 = math.log(2.0)


# ---- document loaders: each returns [{"id": str, "text": str}] -----------------------------------------------
def split_wikitext_articles(raw: str, prefix: str) -> list[dict]:
    """Cut tokenized WikiText into articles at ``= Title =`` lines and detokenize them."""
    from lm_eval.tasks.wikitext.preprocess_wikitext import wikitext_detokenizer

    heads = [m.start() for m in re.finditer(r"^ = [^=].* = $", raw, flags=re.M)]
    docs = []
    for i, start in enumerate(heads):
        body = raw[start: heads[i + 1] if i + 1 < len(heads) else len(raw)]
        title = body.strip().splitlines()[0].strip(" =")
        text = wikitext_detokenizer({"page": body.strip("\n")}).strip()
        docs.append({"id": f"{prefix}/{i:03d}-{re.sub(r'[^A-Za-z0-9]+', '_', title)[:40]}", "text": text})
    return docs


def chunk_text(text: str, chars: int, prefix: str) -> list[dict]:
    """Cut a long text into documents of about ``chars`` characters at blank lines."""
    docs, buf, size = [], [], 0
    for para in re.split(r"\n\s*\n", text):
        buf.append(para)
        size += len(para) + 2
        if size >= chars:
            docs.append("\n\n".join(buf))
            buf, size = [], 0
    if buf and size >= chars // 4:
        docs.append("\n\n".join(buf))
    return [{"id": f"{prefix}/{i:03d}", "text": d} for i, d in enumerate(docs)]


def pydoc_split(key: str) -> str:
    """The fixed split of a ``pydoc_data.topics`` key: a quarter held out for evaluation, the rest for training."""
    return "heldout" if hashlib.sha1(key.encode()).hexdigest()[0] in "0123" else "train"


def load_bundled(cfg: dict, data: str | None) -> list[dict]:
    """A text shipped with the project: WikiText-2 test articles or chunks of tinyshakespeare."""
    name = cfg.get("name", "wikitext2_test")
    raw = bundled_text(name)
    if name.startswith("wikitext"):
        docs = split_wikitext_articles(raw, name)
    else:
        docs = chunk_text(raw, int(cfg.get("doc_chars", 20000)), name)
    return [d for d in docs if len(d["text"]) >= int(cfg.get("min_chars", 0))]


def load_pydoc(cfg: dict, data: str | None) -> list[dict]:
    """Python's own documentation (``pydoc_data.topics``), grouped into documents; split train/heldout/all."""
    from pydoc_data.topics import topics

    split = cfg.get("split", "heldout")
    keys = sorted(k for k in topics if split == "all" or pydoc_split(k) == split)
    text = "\n\n".join(topics[k].strip() for k in keys)
    return chunk_text(text, int(cfg.get("doc_chars", 20000)), f"pydoc-{split}")


def load_text_file(cfg: dict, data: str | None) -> list[dict]:
    """A user's file: ``.txt`` is one document, ``.jsonl`` has one document per line in a ``text`` field."""
    path = Path(data or cfg.get("path", ""))
    if not path.is_file():
        raise UserError(f"--data {path}: file not found; fix: give a .txt or .jsonl file")
    field = cfg.get("text_field", "text")
    try:
        if path.suffix == ".jsonl":
            docs = []
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    raise UserError(f"--data {path}: line {n} is not JSON; fix: one JSON object per line") from None
                if not isinstance(obj, dict) or not isinstance(obj.get(field), str):
                    raise UserError(f"--data {path}: line {n} has no string field '{field}'; fix: add it")
                docs.append({"id": str(obj.get("id", f"{path.stem}/{n:05d}")), "text": obj[field]})
            return docs
        return [{"id": path.stem, "text": path.read_text(encoding="utf-8")}]
    except UnicodeDecodeError:
        raise UserError(f"--data {path}: not UTF-8 text; fix: convert it to UTF-8") from None


# Hub corpora that memory papers report on: (dataset path, config name, split, text field, id field).
HF_CORPORA = {
    "pg19": ("deepmind/pg19", None, "test", "text", "short_book_title"),
    "c4": ("allenai/c4", "en", "validation", "text", "url"),
    "proof-pile": ("hoskinson-center/proof-pile", None, "test", "text", None),
    "arxiv": ("hoskinson-center/proof-pile", None, "test", "text", None),
    "wikitext-103": ("Salesforce/wikitext", "wikitext-103-raw-v1", "test", "text", None),
}


def load_hf(cfg: dict, data: str | None) -> list[dict]:
    """A corpus through ``datasets``: a preset (pg19, c4, proof-pile, arxiv, wikitext-103) or any path/name."""
    import datasets

    preset = HF_CORPORA.get(cfg.get("corpus", ""), (None, None, "test", "text", None))
    path = cfg.get("path") or preset[0]
    name, split = cfg.get("name", preset[1]), cfg.get("split", preset[2])
    field, id_field = cfg.get("text_field", preset[3]), cfg.get("id_field", preset[4])
    data_files = data or cfg.get("data_files")
    if data_files and not path:
        path = "json" if str(data_files).endswith((".json", ".jsonl")) else "text"
    limit = int(cfg.get("max_documents", 0))
    try:
        ds = datasets.load_dataset(path, name, split=split, data_files=data_files,
                                   streaming=bool(cfg.get("streaming", False)))
    except Exception as exc:  # hub unreachable, missing files, bad config
        raise UserError(
            f"dataset '{path}'{f' ({name})' if name else ''}: cannot load ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:120] if str(exc) else ''}); fix: point `dataset.data_files` or --data at "
            "a local copy in the upstream schema, or set HF_DATASETS_OFFLINE=0 with a reachable hub"
        ) from None
    if cfg.get("corpus") == "wikitext-103" or cfg.get("wikitext_lines"):
        raw = "".join(row[field] for row in ds)
        docs = split_wikitext_articles(raw, "wikitext-103")
        return docs[:limit] if limit else docs
    docs = []
    for i, row in enumerate(ds):
        if field not in row:
            raise UserError(f"dataset '{path}': rows have no field '{field}'; fix: set dataset.text_field")
        ident = str(row[id_field]) if id_field and row.get(id_field) else f"{Path(str(path)).name}/{i:05d}"
        docs.append({"id": ident, "text": row[field]})
        if limit and len(docs) >= limit:
            break
    return docs


def segment_document(text: str, tokenizer, segment_len: int, max_tokens: int = 0):
    """Token ids of ``text`` cut into segments, and the UTF-8 byte count each segment covers."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    if max_tokens:
        ids, offsets = ids[:max_tokens], offsets[:max_tokens]
    char_bytes = np.concatenate([[0], np.cumsum([len(c.encode("utf-8")) for c in text])])
    bounds = list(range(0, len(ids), segment_len)) + [len(ids)]
    segments, seg_bytes, prev_end = [], [], 0
    for k in range(len(bounds) - 1):
        a, b = bounds[k], bounds[k + 1]
        last = k == len(bounds) - 2
        end = int(char_bytes[-1]) if (last and not max_tokens) else int(char_bytes[offsets[b - 1][1]])
        segments.append(torch.tensor(ids[a:b], dtype=torch.long))
        seg_bytes.append(end - prev_end)
        prev_end = end
    return segments, seg_bytes


@register_family
class LMFamily(Family):
    """Long-context LM: perplexity and bits per byte by segment, on the same token streams for every method."""

    name = "lm"
    default_params = {"segment_len": 512, "warmup_segments": 0, "max_tokens": 0, "min_tokens": 0,
                      "memory_budget": 0, "max_documents": 0}
    loaders = {"bundled_text": load_bundled, "pydoc": load_pydoc, "text_file": load_text_file, "hf": load_hf}

    def examples(self, task, data: str | None = None, tokenizer=None) -> list[dict]:
        """Documents of the task (``--data`` replaces the dataset with a .txt/.jsonl file)."""
        cfg = task.spec.dataset
        loader = load_text_file if data else self.loaders[cfg["loader"]]
        docs = loader(cfg, data)
        p = task.params
        if p["segment_len"] <= 0:
            raise UserError("--segment-len must be a positive number of tokens")
        if p["min_tokens"] and tokenizer is not None:
            docs = [d for d in docs if len(tokenizer(d["text"], add_special_tokens=False)["input_ids"]) >= p["min_tokens"]]
        docs = [d for d in docs if d["text"].strip()]
        if p["max_documents"]:
            docs = docs[: p["max_documents"]]
        if not docs:
            raise UserError(f"task '{task.name}': no documents to score; fix: check the data or lower min_tokens")
        return docs

    def evaluate(self, task, method, examples: list[dict], emit: Callable[[dict], None], progress=None) -> None:
        """Stream each document through the method and emit one row per document."""
        p = task.params
        tok = method.lm.tokenizer
        for doc in examples:
            segments, seg_bytes = segment_document(doc["text"], tok, p["segment_len"], p["max_tokens"])
            method.begin(doc["id"])
            method.reset()
            before = method.tokens_processed
            t0 = time.perf_counter()
            nlls = method.score_stream(segments)
            elapsed = time.perf_counter() - t0
            seg_nll = [float(x.double().sum()) for x in nlls]
            seg_tok = [int(x.numel()) for x in nlls]
            states = list(getattr(method, "segment_state_bytes", []) or [method.state_bytes()])
            emit({
                "id": doc["id"], "n_segments": len(segments), "segment_nll_sum": seg_nll, "segment_tokens": seg_tok,
                "segment_bytes": seg_bytes, "tokens_processed": method.tokens_processed - before,
                "state_bytes_peak": max(states), "state_bytes_series": states,
                "latency_s": elapsed, "seconds_per_segment": elapsed / max(1, len(segments)),
                "metrics": self.doc_metrics(seg_nll, seg_tok, seg_bytes, p["warmup_segments"]),
            })
            if progress:
                progress(sum(seg_tok))

    @staticmethod
    def doc_metrics(seg_nll, seg_tok, seg_bytes, warmup: int) -> dict:
        """Per-document perplexity and bits per byte over scored segments."""
        nll, ntok, nbytes = sum(seg_nll[warmup:]), sum(seg_tok[warmup:]), sum(seg_bytes[warmup:])
        after = max(1, warmup)
        nll_a, tok_a = sum(seg_nll[after:]), sum(seg_tok[after:])
        return {
            "ppl": math.exp(nll / ntok) if ntok else float("nan"),
            "bits_per_byte": nll / LN2 / nbytes if nbytes else float("nan"),
            "ppl_after_first": math.exp(nll_a / tok_a) if tok_a else float("nan"),
        }

    def aggregate(self, rows: Iterable[dict], params: dict) -> dict[str, float]:
        """Corpus-level metrics: token-weighted perplexity, bits per byte, costs and the position curve."""
        rows = list(rows)
        w = params.get("warmup_segments", 0)
        after = max(1, w)
        nll = sum(sum(r["segment_nll_sum"][w:]) for r in rows)
        ntok = sum(sum(r["segment_tokens"][w:]) for r in rows)
        nbytes = sum(sum(r["segment_bytes"][w:]) for r in rows)
        nll_a = sum(sum(r["segment_nll_sum"][after:]) for r in rows)
        tok_a = sum(sum(r["segment_tokens"][after:]) for r in rows)
        out = {
            "ppl": math.exp(nll / ntok) if ntok else float("nan"),
            "bits_per_byte": nll / LN2 / nbytes if nbytes else float("nan"),
            "ppl_after_first": math.exp(nll_a / tok_a) if tok_a else float("nan"),
            "tokens_scored": float(ntok),
            "tokens_processed": float(sum(r["tokens_processed"] for r in rows)),
            "state_bytes": float(max((r["state_bytes_peak"] for r in rows), default=0)),
            "seconds_per_segment": float(np.mean([r["seconds_per_segment"] for r in rows])) if rows else 0.0,
        }
        return out

    @staticmethod
    def position_curve(rows: Iterable[dict]) -> list[float]:
        """Mean NLL per token at each segment index, over documents that reach it."""
        sums: dict[int, list[float]] = {}
        for r in rows:
            for i, (s, n) in enumerate(zip(r["segment_nll_sum"], r["segment_tokens"])):
                acc = sums.setdefault(i, [0.0, 0])
                acc[0] += s
                acc[1] += n
        return [sums[i][0] / sums[i][1] for i in sorted(sums) if sums[i][1]]
