"""Build the bundled ``wiki_train.jsonl.gz`` training corpus: Wikipedia paragraphs of HotpotQA and MuSiQue *train*.

Sources (both train splits, as sampled by HippoRAG, yhshu/HippoRAG @ c3424ec):
``data/hotpotqa_train.json`` (HotpotQA, Yang et al. 2018, CC BY-SA 4.0) and ``data/musique_train.json``
(MuSiQue, Trivedi et al. 2022, CC BY 4.0). One document per question: its paragraphs (each once in the whole
corpus), ``Title\\nparagraph`` joined by blank lines, so consecutive segments stay on related topics.

QA pairs (``wiki_train_qa.jsonl.gz``, ``--qa-out``): for each kept document, its question(s) with the passages
that answer them (``question_pairs``); yes/no questions are left out.

Decontamination: a document is dropped when any of its paragraphs shares a title with a WikiText-2 test article
or a word 13-gram with an evaluation text given by ``--eval`` (GPT-3's contamination test, Brown et al. 2020,
appendix C). Usage::

    python -m r3mem_bench.data.build_wiki_train HOTPOT.json MUSIQUE.json --eval squad_dev.json --out wiki_train.jsonl.gz
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
from pathlib import Path

from r3mem_bench.data import bundled_text

NGRAM = 13


def words(text: str) -> list[str]:
    """Lower-cased alphanumeric words (WikiText's ``@-@`` and spacing vanish)."""
    return re.findall(r"[a-z0-9]+", text.lower())


def ngrams(text: str, n: int = NGRAM) -> set[tuple[str, ...]]:
    """The word n-grams of ``text``."""
    w = words(text)
    return {tuple(w[i: i + n]) for i in range(len(w) - n + 1)}


def question_documents(hotpot: list[dict], musique: list[dict]) -> list[dict]:
    """One document per question, ``[{"id", "paragraphs": [(title, text)]}]``; a paragraph is used once."""
    seen: set[str] = set()
    docs = []
    groups = [(f"hotpotqa/{q['_id']}", [(t, " ".join(s)) for t, s in q["context"]]) for q in hotpot]
    groups += [(f"musique/{q['id']}", [(p["title"], p["paragraph_text"]) for p in q["paragraphs"]]) for q in musique]
    for doc_id, paragraphs in groups:
        fresh = []
        for title, text in paragraphs:
            key = text.strip()
            if key and key not in seen:
                seen.add(key)
                fresh.append((title.strip(), key))
        if fresh:
            docs.append({"id": doc_id, "paragraphs": fresh})
    return docs


def question_pairs(hotpot: list[dict], musique: list[dict]) -> dict[str, list[dict]]:
    """Single-passage-set QA pairs per document id, ``{doc_id: [{"question", "answer", "passages"}]}``.

    HotpotQA: the question and answer with its supporting paragraphs (``Title\\ntext``). MuSiQue: each step of
    the question decomposition (``#k`` replaced by step k's answer) with the one paragraph that supports it, so
    every pair can be answered from its passages."""
    out: dict[str, list[dict]] = {}
    for q in hotpot:
        titles = list(dict.fromkeys(t for t, _ in q["supporting_facts"]))
        paras = {t: " ".join(s).strip() for t, s in q["context"]}
        passages = [f"{t.strip()}\n{paras[t]}" for t in titles if t in paras]
        if passages and q["answer"].strip().lower() not in ("yes", "no"):
            out[f"hotpotqa/{q['_id']}"] = [{"question": q["question"].strip(), "answer": q["answer"].strip(),
                                            "passages": passages}]
    for q in musique:
        pairs, answers = [], []
        for step in q["question_decomposition"]:
            answers.append(step["answer"].strip())
            question = re.sub(r"#(\d+)", lambda m: answers[int(m.group(1)) - 1] if int(m.group(1)) <= len(answers)
                              else m.group(0), step["question"]).strip()
            idx = step.get("paragraph_support_idx")
            if idx is None or "#" in question:
                continue
            para = q["paragraphs"][idx]
            pairs.append({"question": question, "answer": answers[-1],
                          "passages": [f"{para['title'].strip()}\n{para['paragraph_text'].strip()}"]})
        if pairs:
            out[f"musique/{q['id']}"] = pairs
    return out


def eval_texts(path: Path) -> list[str]:
    """Texts of an evaluation file: WikiText (``.txt``/``.gz``), SQuAD JSON or a ``.jsonl`` with ``text``."""
    raw = gzip.open(path, "rt", encoding="utf-8").read() if path.suffix == ".gz" else path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        data = json.loads(raw)
        return [p["context"] for art in data["data"] for p in art["paragraphs"]]
    if path.suffix == ".jsonl":
        return [json.loads(line)["text"] for line in raw.splitlines() if line.strip()]
    return [raw]


def wikitext_titles(raw: str) -> set[str]:
    """Article titles of a tokenized WikiText file (`` = Title = `` lines), as lower-cased words."""
    return {" ".join(words(m.group(1))) for m in re.finditer(r"^ = ([^=].*) = $", raw, re.M)}


def write_jsonl_gz(path: Path, lines: list[str]) -> None:
    """JSON lines, gzipped reproducibly (no timestamp in the header)."""
    path.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode("utf-8"), compresslevel=9, mtime=0))


def main() -> None:
    """Write the decontaminated corpus and print what was dropped."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("hotpot", type=Path)
    ap.add_argument("musique", type=Path)
    ap.add_argument("--eval", type=Path, action="append", default=[], help="evaluation text to decontaminate against")
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("wiki_train.jsonl.gz"))
    ap.add_argument("--qa-out", type=Path, default=Path(__file__).with_name("wiki_train_qa.jsonl.gz"),
                    help="QA pairs of the kept documents (R3Mem's QA training level)")
    args = ap.parse_args()
    wikitext = bundled_text("wikitext2_test")
    titles = wikitext_titles(wikitext)
    banned: set[tuple[str, ...]] = set()
    for text in [wikitext] + [t for p in args.eval for t in eval_texts(p)]:
        banned |= ngrams(text)
    hotpot, musique = json.loads(args.hotpot.read_text()), json.loads(args.musique.read_text())
    docs = question_documents(hotpot, musique)
    kept, dropped = [], []
    for d in docs:
        bad = [t for t, x in d["paragraphs"] if " ".join(words(t)) in titles or ngrams(x) & banned]
        (dropped if bad else kept).append((d, bad))
    lines = [json.dumps({"id": d["id"], "text": "\n\n".join(f"{t}\n{x}" for t, x in d["paragraphs"])},
                        ensure_ascii=False) for d, _ in kept]
    write_jsonl_gz(args.out, lines)
    qa = question_pairs(hotpot, musique)
    qa_lines = [json.dumps({"id": f"{d['id']}/{i}", **pair}, ensure_ascii=False)
                for d, _ in kept for i, pair in enumerate(qa.get(d["id"], []))]
    write_jsonl_gz(args.qa_out, qa_lines)
    n_words = sum(len(x.split()) for d, _ in kept for _, x in d["paragraphs"])
    print(json.dumps({"kept": len(kept), "dropped": len(dropped), "words": n_words, "qa_pairs": len(qa_lines),
                      "dropped_for": {d["id"]: bad for d, bad in dropped}}, indent=1))


if __name__ == "__main__":
    main()
