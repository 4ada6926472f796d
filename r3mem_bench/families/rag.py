"""Retrieval-augmented generation: a method ingests a corpus, then answers questions asked over it.

The protocol, metrics and costs are the QA family's (``r3mem_bench.families.qa``): per corpus the method is reset
and ingests the passages once (vector RAG indexes chunks, MemoryBank stores items, R3Mem compresses passages,
full_context packs passages up to the model's window, no_memory keeps nothing and answers closed-book), then
answers each question with the task's shared prompt and greedy generator. Metrics: EM and token F1 (the
official SQuAD v1.1 normalisation by default, ``normalization: extended`` for the NFKC / Unicode-punctuation
variant), answer containment, the gold answer's likelihood after the method's prompt (``answer_nll``) and, for
the needle task, whose questions carry candidate codes, ``choice_acc`` (see ``r3mem_bench.families.qa``;
``generate: false`` scores likelihood only), retrieval recall of the gold passages (``gold_ids``) over the ids a
method put in its prompt, prompt tokens per question, storage bytes per 1K corpus tokens, ingest and answer
seconds; EM, F1, containment, answer NLL and choice accuracy are also reported per question category
(``em/<category>``).

Loaders (``dataset.loader``), each reading a local file (``--data FILE``, or ``dataset.path``) in the upstream
schema, or, where ``dataset.hub`` is set and no file is given, the hub copy through ``datasets.load_dataset``:

* ``needle`` — generated offline (``r3mem_bench.generators.needle``); the default task.
* ``squad`` — official SQuAD v1.1 JSON; each article's paragraphs are the corpus its questions are asked over,
  questions in file order, ``gold_ids`` = the question's paragraph. Hub: ``rajpurkar/squad`` rows.
* ``hotpot_qa`` — HotpotQA distractor setting, raw JSON (``_id``, ``[[title, idx]]`` facts, ``[[title, [sents]]]``
  context) or hub rows (``id``, ``{title, sent_id}``, ``{title, sentences}``); each question's ten paragraphs are
  its corpus (or one shared corpus file, ``dataset.corpus``), passage ids are titles, ``gold_ids`` = supporting
  titles, category = ``type`` (bridge / comparison).
* ``nq_open`` — NQ-open JSONL (``question``, ``answer`` list), no passages: closed book, or open retrieval over
  one shared corpus file given as ``dataset.corpus``.
* ``trivia_qa`` — TriviaQA ``rc`` rows as on the hub (``question``, ``question_id``, ``answer {value, aliases,
  normalized_aliases}``, ``entity_pages {title, wiki_context}``, ``search_results {title, search_context}``):
  each question's documents, cut into passages of ``passage_words`` words, are its corpus; ``gold_ids`` are the
  passages containing an answer alias (distant supervision, as TriviaQA itself labels evidence).
* ``ultradomain`` — UltraDomain JSONL (``TommyChien/UltraDomain``, used by MemoRAG and LightRAG). Its dataset
  card documents no schema; assumed from the files and LightRAG's reproduce/Step_0.py (HKUDS/LightRAG @ 08d65b3):
  ``input`` (question), ``answers`` (list or string), ``context`` (a long document), optional ``context_id``,
  ``label`` (domain), ``_id``. Questions sharing a context share one corpus (its text cut into passages); no
  gold evidence ids exist.

Shared corpus files (``dataset.corpus``): JSON ``{title: [sentences] | text}`` (HippoRAG's corpus files), JSON
list or JSONL of ``{id?, title?, text}``, or DPR's TSV (``id``, ``text``, ``title``). Malformed rows (missing or
empty question/answer fields) raise a ``UserError`` naming the file and row; questions left without any passage
(TriviaQA rows with no documents) are skipped and counted in a warning.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from r3mem_bench.errors import UserError
from r3mem_bench.families.base import register_family
from r3mem_bench.families.qa import QA_PARAMS, QAFamily
from r3mem_bench.method import MemoryItem
from r3mem_bench.metrics import normalize_answer

log = logging.getLogger(__name__)

RAG_PARAMS = {**QA_PARAMS, "n_corpora": 8, "n_passages": 12, "passage_words": 100, "questions_per_corpus": 4,
              "distractors": 2, "needle_kinds": "single,multikey,multihop", "filler": "wikitext2_test"}

Rows = list[dict]


# ---- reading files and hub datasets ------------------------------------------------------------------------
def _read_json(path: Path) -> Any:
    """A JSON document, or the rows of a JSONL file (one object per line)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"data file {path}: not found; fix: give an existing file with --data") from None
    except UnicodeDecodeError:
        raise UserError(f"data file {path}: not UTF-8 text; fix: convert it to UTF-8") from None
    if path.suffix == ".jsonl":
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                raise UserError(f"data file {path}: line {n} is not JSON; fix: one JSON object per line") from None
            if not isinstance(obj, dict):
                raise UserError(f"data file {path}: line {n} is not a JSON object; fix: one object per line")
            rows.append(obj)
        return rows
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"data file {path}: not valid JSON ({exc.msg} at line {exc.lineno}); "
                        "fix: give the upstream .json file, or .jsonl with one object per line") from None


def _read_rows(path: Path) -> Rows:
    """Rows of a local JSON list, JSONL or Parquet file."""
    if path.suffix == ".parquet":
        import datasets

        return [dict(r) for r in datasets.load_dataset("parquet", data_files=str(path), split="train")]
    obj = _read_json(path)
    if isinstance(obj, dict) and isinstance(obj.get("data"), list):
        obj = obj["data"]
    if not isinstance(obj, list) or not all(isinstance(r, dict) for r in obj):
        raise UserError(f"data file {path}: expected a list of JSON objects; fix: give the upstream file")
    return obj


def _local_path(cfg: dict, data: str | None) -> Path | None:
    """The local file to read: ``--data``, else ``dataset.path``; None when neither is set."""
    given = data or cfg.get("path")
    return Path(given) if given else None


def _hub_rows(cfg: dict, label: str) -> Rows:
    """Rows of the configured hub dataset (``dataset.hub``, ``name``, ``split``, ``data_files``)."""
    hub = cfg.get("hub")
    if not hub:
        raise UserError(f"{label}: no data file; fix: pass --data FILE (a local copy in the upstream schema) "
                        "or set dataset.path in the task YAML")
    import datasets

    try:
        ds = datasets.load_dataset(hub, cfg.get("name"), split=cfg.get("split", "validation"),
                                   data_files=cfg.get("data_files"))
    except Exception as exc:  # offline hub, missing config, bad files
        first = str(exc).splitlines()[0][:160] if str(exc) else ""
        raise UserError(f"{label}: cannot load hub dataset '{hub}' ({type(exc).__name__}: {first}); fix: pass "
                        "--data FILE with a local copy in the upstream schema (or set dataset.path), or allow "
                        "hub access with HF_DATASETS_OFFLINE=0 and HF_HUB_OFFLINE=0") from None
    return [dict(r) for r in ds]


def _source_rows(cfg: dict, data: str | None, label: str) -> tuple[Rows, str]:
    """Rows from the local file when one is given, else from the hub; with a name for messages."""
    path = _local_path(cfg, data)
    if path is not None:
        return _read_rows(path), f"data file {path}"
    return _hub_rows(cfg, label), f"hub dataset {cfg.get('hub')}"


def _text(row: dict, key: str, where: str, n: int, unit: str = "row") -> str:
    """A required non-empty string field of a row (``unit`` names the row in messages: row, question, ...)."""
    value = row.get(key)
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{where}: {unit} {n} has no non-empty string field '{key}'; fix: repair or drop it")
    return value.strip()


def _answers(value: Any, where: str, n: int, key: str, unit: str = "row") -> list[str]:
    """A non-empty list of answer strings from a string or a list field (duplicates dropped, order kept)."""
    items = [value] if isinstance(value, str) else value if isinstance(value, list) else None
    if items is None or not all(isinstance(a, str) for a in items):
        raise UserError(f"{where}: {unit} {n} field '{key}' must be a string or a list of strings; fix: repair it")
    out = list(dict.fromkeys(a.strip() for a in items if a.strip()))
    if not out:
        raise UserError(f"{where}: {unit} {n} has no non-empty answer in '{key}'; fix: repair or drop it")
    return out


def _columns(value: Any, keys: tuple[str, ...]) -> dict[str, list]:
    """A hub ``Sequence`` of structs as columns: accepts ``{key: [..]}`` or ``[{key: ..}, ..]``."""
    if isinstance(value, list):
        return {k: [item.get(k) for item in value if isinstance(item, dict)] for k in keys}
    if isinstance(value, dict):
        return {k: list(value.get(k) or []) for k in keys}
    return {k: [] for k in keys}


def _question(qid: str, question: str, answers: list[str], corpus_id: str, category: str | None = None,
              gold_ids: list[str] | None = None) -> dict:
    """A question in the QA-family format."""
    return {"id": qid, "question": question, "answers": answers, "corpus_id": corpus_id, "category": category,
            "gold_ids": gold_ids or [], "answerable": True, "now": None}


def chunk_words(text: str, words: int, prefix: str, meta: dict | None = None) -> list[MemoryItem]:
    """Cut a long text into passages of ``words`` white-space words (DPR-style 100-word passages)."""
    toks = text.split()
    return [MemoryItem(id=f"{prefix}/{i // words:04d}", text=" ".join(toks[i:i + words]), meta=dict(meta or {}))
            for i in range(0, len(toks), words)]


def load_corpus_file(path: str) -> list[MemoryItem]:
    """A shared retrieval corpus: HippoRAG JSON ``{title: [sents]}``, JSON/JSONL ``{id?, title?, text}``, DPR TSV."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"dataset.corpus {p}: file not found; fix: give a corpus file (JSON, JSONL or DPR TSV)")
    items: list[MemoryItem] = []
    if p.suffix == ".tsv":
        with p.open(encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh, delimiter="\t")
            if not reader.fieldnames or "text" not in reader.fieldnames:
                raise UserError(f"dataset.corpus {p}: TSV needs a header with 'id', 'text', 'title'; fix: use DPR's format")
            for n, row in enumerate(reader, 1):
                title = row.get("title") or ""
                items.append(MemoryItem(id=str(row.get("id") or n), text=f"{title}: {row['text']}" if title else row["text"],
                                        meta={"title": title}))
        return items
    obj = _read_json(p)
    if isinstance(obj, dict):  # HippoRAG: {title: [sentences]} or {title: text}
        for title, body in obj.items():
            text = "".join(body) if isinstance(body, list) else str(body)
            items.append(MemoryItem(id=str(title), text=f"{title}: {text.strip()}", meta={"title": title}))
        return items
    if not isinstance(obj, list):
        raise UserError(f"dataset.corpus {p}: expected a JSON object or a list of passages; fix: see the rag loaders")
    for n, row in enumerate(obj, 1):
        if not isinstance(row, dict):
            raise UserError(f"dataset.corpus {p}: row {n} is not an object; fix: use {{'id', 'title', 'text'}} rows")
        text = _text(row, "text", f"dataset.corpus {p}", n)
        title = str(row.get("title") or "")
        items.append(MemoryItem(id=str(row.get("id", title or n)), text=f"{title}: {text}" if title else text,
                                meta={"title": title}))
    return items


# ---- loaders: (cfg, data_path, params) -> (questions, corpora) --------------------------------------------
def load_needle(cfg: dict, data: str | None, params: dict) -> tuple[list[dict], dict]:
    """Generated needle QA (no file): see ``r3mem_bench.generators.needle``."""
    if data:
        raise UserError("--data: the needle task generates its data and reads no file; fix: drop --data, or use "
                        "--task squad/hotpotqa/nq_open/triviaqa/ultradomain with --data")
    from r3mem_bench.generators.needle import generate

    kinds = tuple(k.strip() for k in str(params["needle_kinds"]).split(",") if k.strip())
    return generate(seed=int(params["seed"]), n_corpora=int(params["n_corpora"]), n_passages=int(params["n_passages"]),
                    passage_words=int(params["passage_words"]), questions_per_corpus=int(params["questions_per_corpus"]),
                    distractors=int(params["distractors"]), kinds=kinds, filler=str(params["filler"]))


def _squad_articles_from_rows(rows: Rows, where: str) -> list[dict]:
    """Hub SQuAD rows (``id, title, context, question, answers{text}``) regrouped as official-format articles."""
    articles: dict[str, dict] = {}
    for n, row in enumerate(rows):
        title = _text(row, "title", where, n)
        art = articles.setdefault(title, {"title": title, "paragraphs": [], "_index": {}})
        ctx = _text(row, "context", where, n)
        if ctx not in art["_index"]:
            art["_index"][ctx] = len(art["paragraphs"])
            art["paragraphs"].append({"context": ctx, "qas": []})
        answers = row.get("answers") or {}
        texts = answers.get("text") if isinstance(answers, dict) else [a.get("text") for a in answers]
        art["paragraphs"][art["_index"][ctx]]["qas"].append(
            {"id": row.get("id"), "question": row.get("question"), "answers": [{"text": t} for t in texts or []]})
    return list(articles.values())


def load_squad(cfg: dict, data: str | None, params: dict) -> tuple[list[dict], dict]:
    """SQuAD v1.1: per article, its paragraphs are the corpus; questions in file order; gold = own paragraph."""
    path = _local_path(cfg, data)
    if path is not None:
        where = f"data file {path}"
        obj = _read_json(path)
        if not isinstance(obj, dict) or not isinstance(obj.get("data"), list):
            raise UserError(f"{where}: not SQuAD v1.1 JSON (expected {{\"version\", \"data\": [articles]}}); "
                            "fix: give the official dev-v1.1.json format")
        articles = obj["data"]
    else:
        where = f"hub dataset {cfg.get('hub')}"
        articles = _squad_articles_from_rows(_hub_rows(cfg, "task squad"), where)
    questions, corpora = [], {}
    for a, art in enumerate(articles):
        if not isinstance(art, dict) or not isinstance(art.get("paragraphs"), list):
            raise UserError(f"{where}: article {a} has no 'paragraphs' list; fix: use the SQuAD v1.1 format")
        title = str(art.get("title") or f"article{a}")
        cid = title if title not in corpora else f"{title}#{a}"
        items = []
        for p, para in enumerate(art["paragraphs"]):
            awhere = f"{where}: article {a} ('{title}')"
            if not isinstance(para, dict):
                raise UserError(f"{awhere} paragraph {p} is not an object; fix: use the SQuAD v1.1 format")
            pid = f"{cid}/{p:03d}"
            items.append(MemoryItem(id=pid, text=_text(para, "context", awhere, p, "paragraph"), meta={"title": title}))
            for q, qa in enumerate(para.get("qas") or []):
                qwhere = f"{awhere} paragraph {p}"
                if not isinstance(qa, dict):
                    raise UserError(f"{qwhere} question {q} is not an object; fix: use the SQuAD v1.1 format")
                golds = [x.get("text") if isinstance(x, dict) else None for x in qa.get("answers") or []]
                qid = qa.get("id")
                if not isinstance(qid, str) or not qid:
                    raise UserError(f"{qwhere} question {q} has no string 'id'; fix: give every question an id")
                questions.append(_question(qid, _text(qa, "question", qwhere, q, "question"),
                                           _answers([g for g in golds if g is not None], qwhere, q, "answers", "question"),
                                           cid, gold_ids=[pid]))
        corpora[cid] = items
    return questions, corpora


def load_hotpot(cfg: dict, data: str | None, params: dict) -> tuple[list[dict], dict]:
    """HotpotQA distractor: each question's ten paragraphs (ids = titles) form its corpus; gold = supporting titles."""
    rows, where = _source_rows(cfg, data, "task hotpotqa")
    shared = load_corpus_file(cfg["corpus"]) if cfg.get("corpus") else None
    questions, corpora = [], {}
    if shared is not None:
        corpora["hotpot-corpus"] = shared
    for n, row in enumerate(rows):
        qid = str(row.get("_id") or row.get("id") or "")
        if not qid:
            raise UserError(f"{where}: row {n} has no '_id' or 'id'; fix: give every question an id")
        facts = row.get("supporting_facts")
        if isinstance(facts, dict):
            titles = list(facts.get("title") or [])
        elif isinstance(facts, list):
            titles = [f[0] for f in facts if isinstance(f, (list, tuple)) and f]
        else:
            raise UserError(f"{where}: row {n} has no 'supporting_facts'; fix: use the distractor-setting file")
        gold = list(dict.fromkeys(str(t) for t in titles))
        if shared is not None:
            cid = "hotpot-corpus"
        else:
            ctx = row.get("context")
            if isinstance(ctx, dict):
                pairs = list(zip(ctx.get("title") or [], ctx.get("sentences") or []))
            elif isinstance(ctx, list):
                pairs = [(c[0], c[1]) for c in ctx if isinstance(c, (list, tuple)) and len(c) == 2]
            else:
                pairs = []
            if not pairs:
                raise UserError(f"{where}: row {n} has no 'context' paragraphs; fix: use the distractor-setting file")
            cid, items, seen = qid, [], set()
            for title, sents in pairs:
                title = str(title)
                pid = title if title not in seen else f"{title}#{len(seen)}"
                seen.add(pid)
                body = "".join(sents) if isinstance(sents, list) else str(sents)
                items.append(MemoryItem(id=pid, text=f"{title}: {body.strip()}", meta={"title": title}))
            corpora[cid] = items
        questions.append(_question(qid, _text(row, "question", where, n), _answers(row.get("answer"), where, n, "answer"),
                                   cid, category=row.get("type") or None, gold_ids=gold))
    return questions, corpora


def load_nq_open(cfg: dict, data: str | None, params: dict) -> tuple[list[dict], dict]:
    """NQ-open: questions with answer lists; closed book, or open retrieval over ``dataset.corpus``."""
    rows, where = _source_rows(cfg, data, "task nq_open")
    cid = "nq-corpus" if cfg.get("corpus") else "closed-book"
    corpora = {cid: load_corpus_file(cfg["corpus"]) if cfg.get("corpus") else []}
    questions = []
    for n, row in enumerate(rows):
        qid = str(row.get("id") or f"nq-{n:05d}")
        questions.append(_question(qid, _text(row, "question", where, n), _answers(row.get("answer"), where, n, "answer"), cid))
    return questions, corpora


def load_trivia_qa(cfg: dict, data: str | None, params: dict) -> tuple[list[dict], dict]:
    """TriviaQA rc: each question's wiki and search documents, cut into passages, are its corpus."""
    rows, where = _source_rows(cfg, data, "task triviaqa")
    words = int(params["passage_words"])
    questions, corpora, skipped = [], {}, 0
    for n, row in enumerate(rows):
        qid = str(row.get("question_id") or f"tqa-{n:05d}")
        ans = row.get("answer")
        if not isinstance(ans, dict):
            raise UserError(f"{where}: row {n} has no 'answer' object; fix: use the trivia_qa rc schema")
        golds = _answers([ans.get("value") or ""] + list(ans.get("aliases") or []), where, n, "answer.value/aliases")
        wiki = _columns(row.get("entity_pages"), ("title", "wiki_context"))
        search = _columns(row.get("search_results"), ("title", "search_context"))
        items: list[MemoryItem] = []
        for kind, cols, field in (("wiki", wiki, "wiki_context"), ("search", search, "search_context")):
            for d, (title, text) in enumerate(zip(cols["title"], cols[field])):
                if isinstance(text, str) and text.strip():
                    items += chunk_words(text, words, f"{qid}/{kind}{d}", {"title": title})
        if not items:
            skipped += 1
            continue
        aliases = {normalize_answer(a) for a in golds + list(ans.get("normalized_aliases") or [])} - {""}
        gold = [it.id for it in items if any(f" {a} " in f" {normalize_answer(it.text)} " for a in aliases)]
        corpora[qid] = items
        questions.append(_question(qid, _text(row, "question", where, n), golds, qid, gold_ids=gold))
    if skipped:
        log.warning("%s: skipped %d of %d questions with no wiki or search context", where, skipped, len(rows))
    return questions, corpora


def load_ultradomain(cfg: dict, data: str | None, params: dict) -> tuple[list[dict], dict]:
    """UltraDomain: questions over one long context each; a context's passages are shared by its questions."""
    rows, where = _source_rows(cfg, data, "task ultradomain")
    words = int(params["passage_words"])
    questions, corpora = [], {}
    for n, row in enumerate(rows):
        context = _text(row, "context", where, n)
        cid = str(row.get("context_id") or "ctx-" + hashlib.sha1(context.encode()).hexdigest()[:12])
        if cid not in corpora:
            corpora[cid] = chunk_words(context, words, cid)
        qid = str(row.get("_id") or row.get("id") or f"ud-{n:05d}")
        questions.append(_question(qid, _text(row, "input", where, n), _answers(row.get("answers"), where, n, "answers"),
                                   cid, category=row.get("label") or None))
    return questions, corpora


LOADERS: dict[str, Callable] = {"needle": load_needle, "squad": load_squad, "hotpot_qa": load_hotpot,
                                "nq_open": load_nq_open, "trivia_qa": load_trivia_qa, "ultradomain": load_ultradomain}


@register_family
class RAGFamily(QAFamily):
    """Question answering over a corpus ingested once (see the module docstring)."""

    name = "rag"
    default_params = RAG_PARAMS
    loaders = LOADERS

    def aggregate(self, rows: Iterable[dict], params: dict) -> dict[str, float]:
        """The QA aggregates plus answer containment per category (when answers were generated)."""
        rows = list(rows)
        out = super().aggregate(rows, params)
        for cat in sorted({r["category"] for r in rows if r.get("category")}):
            vals = [r["metrics"]["contains"] for r in rows if r.get("category") == cat and "contains" in r["metrics"]]
            if vals:
                out[f"contains/{cat}"] = float(np.mean(vals))
        return out
