"""Long-context language modeling: documents streamed in segments, scored by every method on the same segments.

Protocol: a document is tokenized once (no special tokens), truncated to ``max_tokens`` when set, and cut into
segments of ``segment_len`` tokens. The method sees the segments in order (``MemoryMethod.score_stream``) and
returns each token's NLL given its memory; the first token of a document is predicted from the model's document
prefix token (recorded in the manifest). Segments before ``warmup_segments`` are fed but not scored.
Metrics: token perplexity and bits per byte over scored segments, ``ppl_after_first`` over segments 1..,
``ppl_beyond_<W>`` over the tokens of segments 1.. at in-segment offsets >= W (``BEYOND``), the NLL per segment
index (position curve), tokens processed, peak memory-state bytes and seconds per segment.
Bits per byte count the UTF-8 bytes of the scored segments: with ``warmup_segments`` 0 they add up to the
document (cut after ``max_tokens`` tokens), which is what lm-eval divides by (``r3mem-bench export-lm-eval``).

Documents: bundled offline texts (WikiText-2 test articles, pydoc held-out topics), a user's ``--data`` file
(``.txt`` = one document, ``.jsonl`` = one per line in ``text``), or hub corpora through ``datasets`` (presets in
``HF_CORPORA``; ``data_files`` points a task at a local copy in the upstream schema). ``min_tokens`` drops short
documents while reading (a streamed corpus stops after ``max_documents`` kept ones).
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
from r3mem_bench.families.base import Family, register_family

LN2 = math.log(2.0)
# In-segment offsets W of ``ppl_beyond_<W>``: the perplexity of the tokens that lie at least W tokens after their
# segment's start (segments after the first), where a raw window of W tokens no longer reaches back into the
# previous segment. 16 and 64: the equal-state windows of R3Mem's default 16-slot memory and of 4x that (a slot
# holds one position's keys and values, as a token does, so on any model M slots = an M-token window).
BEYOND = (16, 64)


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


# Hub corpora that memory papers report on: dataset path, config name, split, text field, id field, and a filter
# on the ``meta`` field (proof-pile tags each row's source in ``meta.config``: arxiv, wiki, ...). Upstream schemas:
# pg19 {short_book_title, publication_date, url, text}; c4 {text, timestamp, url}; proof-pile {text, meta};
# wikitext-103-raw-v1 {text}, one line per row (articles start at `` = Title = `` lines).
HF_CORPORA = {
    "pg19": {"path": "deepmind/pg19", "split": "test", "id_field": "short_book_title"},
    "c4": {"path": "allenai/c4", "name": "en", "split": "validation", "id_field": "url"},
    "proof-pile": {"path": "hoskinson-center/proof-pile", "split": "test"},
    "arxiv": {"path": "hoskinson-center/proof-pile", "split": "test", "meta_filter": {"config": "arxiv"}},
    "wikitext-103": {"path": "Salesforce/wikitext", "name": "wikitext-103-raw-v1", "split": "test",
                     "wikitext_lines": True},
}
_LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".gz": "json", ".parquet": "parquet", ".txt": "text",
                   ".csv": "csv"}


def _meta_matches(meta, want: dict) -> bool:
    """Whether a row's ``meta`` (a dict, or a JSON string of one) has every key/value of ``want``."""
    if isinstance(meta, str):
        try:
            meta = json.loads(meta)
        except json.JSONDecodeError:
            return False
    return isinstance(meta, dict) and all(meta.get(k) == v for k, v in want.items())


def _local_files(data_files) -> list[Path] | None:
    """The files of ``data_files`` when all of them exist on disk (a path, a list, or a {split: paths} dict)."""
    if not data_files:
        return None
    if isinstance(data_files, dict):
        items = [f for v in data_files.values() for f in ([v] if isinstance(v, str) else v)]
    else:
        items = [data_files] if isinstance(data_files, str) else list(data_files)
    paths = [Path(str(f)).expanduser() for f in items]
    return paths if paths and all(p.is_file() for p in paths) else None


def load_hf(cfg: dict, data: str | None, keep: Callable[[str], bool] | None = None) -> list[dict]:
    """A corpus through ``datasets``: a preset (pg19, c4, proof-pile, arxiv, wikitext-103) or any path/name.

    ``data_files`` (YAML) or ``--data`` pointing at local files in the upstream schema loads them with the
    matching ``datasets`` builder (json, parquet, text, csv) instead of the hub; other keys: ``path``, ``name``,
    ``split``, ``revision``, ``text_field``, ``id_field``, ``meta_filter``, ``streaming``, ``max_documents``.
    ``keep(text)`` filters documents while reading, so a streamed corpus stops after ``max_documents`` kept ones.
    """
    import datasets

    corpus = cfg.get("corpus")
    if corpus and corpus not in HF_CORPORA:
        raise UserError(f"dataset.corpus '{corpus}' is unknown; fix: use one of {sorted(HF_CORPORA)} or set dataset.path")
    c = {"split": "test", "text_field": "text", **HF_CORPORA.get(corpus or "", {}),
         **{k: v for k, v in cfg.items() if k not in ("loader", "corpus")}}
    if data:
        c["data_files"] = data
    path, name, split, data_files = c.get("path"), c.get("name"), c["split"], c.get("data_files")
    local = _local_files(data_files)
    if local:  # a local copy in the upstream schema: read it with the generic builder, never the hub
        suffix = local[0].suffixes[-2] if local[0].suffix == ".gz" and len(local[0].suffixes) > 1 else local[0].suffix
        path, name, split = _LOCAL_BUILDERS.get(suffix, "json"), None, "train"
        data_files = [str(p) for p in local]
    if not path:
        raise UserError("dataset: no `path`, `corpus` or local `data_files`; fix: set one of them in the task YAML")
    label = f"'{path}'" + (f" ({name})" if name else "") + (f" [data_files={data_files}]" if data_files else "")
    try:
        ds = datasets.load_dataset(path, name, split=split, data_files=data_files, revision=c.get("revision"),
                                   streaming=bool(c.get("streaming", False)))
    except Exception as exc:  # hub unreachable (offline), missing files, script-only dataset, bad config
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
        raise UserError(
            f"dataset {label}: cannot load ({type(exc).__name__}: {first}); fix: download it where the hub is "
            "reachable and point the task at the local copy in the upstream schema (`dataset.data_files: "
            "/path/file.jsonl|.parquet` in the task YAML, or --data FILE), or unset HF_DATASETS_OFFLINE / "
            "HF_HUB_OFFLINE with a reachable hub"
        ) from None
    field, id_field, limit = c["text_field"], c.get("id_field"), int(c.get("max_documents", 0) or 0)
    want = c.get("meta_filter") or {}
    stem = Path(str(c.get("path") or path)).name
    if c.get("wikitext_lines"):
        raw = "".join(_field(row, field, label) for row in ds)
        docs = [d for d in split_wikitext_articles(raw, stem) if keep is None or keep(d["text"])]
        return docs[:limit] if limit else docs
    docs = []
    for i, row in enumerate(ds):
        text = _field(row, field, label)
        if (want and not _meta_matches(row.get("meta"), want)) or (keep is not None and not keep(text)):
            continue
        ident = str(row[id_field]) if id_field and row.get(id_field) else f"{stem}/{i:05d}"
        docs.append({"id": ident, "text": text})
        if limit and len(docs) >= limit:
            break
    return docs


def _field(row: dict, field: str, label: str) -> str:
    """The text field of a dataset row, or a UserError naming the field and the dataset."""
    if not isinstance(row.get(field), str):
        raise UserError(f"dataset {label}: rows have no text field '{field}' (fields: {sorted(row)}); "
                        "fix: set dataset.text_field")
    return row[field]


def truncate_text(text: str, tokenizer, max_tokens: int) -> str:
    """``text`` cut after its first ``max_tokens`` tokens (the exact span a run scores); whole text if 0."""
    if not max_tokens:
        return text
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if len(enc["input_ids"]) <= max_tokens:
        return text
    return text[: enc["offset_mapping"][max_tokens - 1][1]]


def segment_document(text: str, tokenizer, segment_len: int, max_tokens: int = 0):
    """Token ids of ``text`` cut into segments, and the UTF-8 byte count each segment covers."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    truncated = bool(max_tokens) and len(ids) > max_tokens
    if truncated:
        ids, offsets = ids[:max_tokens], offsets[:max_tokens]
    char_bytes = np.concatenate([[0], np.cumsum([len(c.encode("utf-8")) for c in text])])
    bounds = list(range(0, len(ids), segment_len)) + [len(ids)]
    segments, seg_bytes, prev_end = [], [], 0
    for k in range(len(bounds) - 1):
        a, b = bounds[k], bounds[k + 1]
        last = k == len(bounds) - 2
        end = int(char_bytes[-1]) if (last and not truncated) else int(char_bytes[offsets[b - 1][1]])
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
    row_fields = {"id": "str", "segment_nll_sum": "list[num]", "segment_tokens": "list[count]",
                  "segment_bytes": "list[count]", "tokens_processed": "count", "state_bytes_peak": "count",
                  "seconds_per_segment": "num"}
    row_parallel = ("segment_nll_sum", "segment_tokens", "segment_bytes")

    def examples(self, task, data: str | None = None, tokenizer=None) -> list[dict]:
        """Documents of the task (``--data`` replaces the dataset with a .txt/.jsonl file)."""
        cfg = task.spec.dataset
        p = task.params
        if p["segment_len"] <= 0:
            raise UserError(f"--segment-len {p['segment_len']}: must be a positive number of tokens; fix: e.g. 512")
        for key in ("max_tokens", "min_tokens", "warmup_segments", "max_documents"):
            if p[key] < 0:
                raise UserError(f"task parameter {key}={p[key]}: must be >= 0; fix: use 0 (off) or a positive number")

        def long_enough(text: str) -> bool:
            if not text.strip():
                return False
            return not (p["min_tokens"] and tokenizer is not None) or \
                len(tokenizer(text, add_special_tokens=False)["input_ids"]) >= p["min_tokens"]

        # a user's file: .txt = one document; hub-corpus tasks read other formats in their upstream schema
        if cfg["loader"] == "hf" and not (data and Path(data).suffix == ".txt"):
            limit = p["max_documents"] or int(cfg.get("max_documents", 0) or 0)
            docs = load_hf({**cfg, "max_documents": limit}, data, keep=long_enough)  # stops early when streaming
        else:
            docs = load_text_file(cfg, data) if data else self.loaders[cfg["loader"]](cfg, data)
            docs = [d for d in docs if long_enough(d["text"])]
        seen: dict[str, int] = {}
        for d in docs:  # ids key the resumable store: make repeated titles unique
            n = seen.get(d["id"], 0)
            seen[d["id"]] = n + 1
            if n:
                d["id"] = f"{d['id']}#{n}"
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
            tail_nll = {str(w): [float(x[w:].double().sum()) for x in nlls] for w in BEYOND}
            tail_tok = {str(w): [max(0, int(x.numel()) - w) for x in nlls] for w in BEYOND}
            states = list(getattr(method, "segment_state_bytes", []) or [method.state_bytes()])
            emit({
                "id": doc["id"], "n_segments": len(segments), "segment_nll_sum": seg_nll, "segment_tokens": seg_tok,
                "segment_bytes": seg_bytes, "segment_tail_nll_sum": tail_nll, "segment_tail_tokens": tail_tok,
                "tokens_processed": method.tokens_processed - before,
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
        for w in BEYOND:  # rows written before the tail sums existed have none: then the metric is absent
            tails = [r for r in rows if str(w) in (r.get("segment_tail_tokens") or {})]
            nll_t = sum(sum(r["segment_tail_nll_sum"][str(w)][after:]) for r in tails)
            tok_t = sum(sum(r["segment_tail_tokens"][str(w)][after:]) for r in tails)
            if tails and len(tails) == len(rows) and tok_t:
                out[f"ppl_beyond_{w}"] = math.exp(nll_t / tok_t)
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
