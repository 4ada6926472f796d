"""Seeded needle-in-a-haystack QA over real filler text, for the offline default RAG task.

Each corpus is ``n_passages`` passages of real text (WikiText-2 test articles bundled with the project, or
Python's ``pydoc_data.topics``), cut at sentence boundaries into passages of about ``passage_words`` words, with
short, distinctive facts ("needles") inserted at sentence boundaries. ``questions_per_corpus`` questions are
asked over each corpus (so a method ingests it once for several questions). Question kinds, after RULER's
retrieval tasks (NVIDIA/RULER @ c3f5e3b: scripts/data/synthetic/niah.py, variable_tracking.py):

* ``single``: one fact about the asked key ("The secret code of the blue door is 4821.").
* ``multikey``: the asked fact plus ``distractors`` near-miss facts that share its object with other colours
  ("The secret code of the red door is 7310."); only one is asked (RULER's multi-key NIAH).
* ``multihop``: a chain "The amber clock has the same secret code as the blue door." + "The secret code of the
  blue door is 4821." asked as "What is the secret code of the amber clock?" (RULER's variable tracking,
  two hops, in natural language).

Deviations from RULER: natural-language keys (colour + object) and 4-digit values instead of random words or
numbers in a fixed "special magic number" template, so a 135M chat model can answer when the passage is in
its context; filler is real encyclopedic text (sentences containing WikiText's ``<unk>`` are dropped); the
difficulty knob is corpus length in passages rather than a token budget.
Every value is unique in its corpus and never occurs in the filler; ``gold_ids`` are the ids of the passages
holding the asked needle(s). Each question's ``candidates`` (the QA family's ``choice_acc``) are every code
planted in its corpus, sorted: its gold value, the other asked needles' values and the multi-key near-miss
values (all secret codes, so the same kind of answer); a corpus with a single code gives no candidates. They are
read off the generated corpus and draw nothing from the RNG. Output is a pure function of the arguments
(``random.Random(seed)``).
"""

from __future__ import annotations

import functools
import random
import re
from dataclasses import dataclass

from r3mem_bench.errors import UserError
from r3mem_bench.method import MemoryItem

KINDS = ("single", "multikey", "multihop")
COLOURS = ("red", "blue", "green", "yellow", "purple", "orange", "silver", "golden", "black", "white", "brown",
           "pink", "grey", "crimson", "amber", "violet")
OBJECTS = ("door", "box", "lamp", "gate", "chest", "drawer", "cabinet", "locker", "window", "vault", "trunk",
           "suitcase", "bottle", "jar", "notebook", "envelope", "clock", "bell", "mirror", "basket", "kettle",
           "helmet", "lantern", "wagon")
FACT = "The secret code of the {key} is {value}."
LINK = "The {key} has the same secret code as the {target}."
QUESTION = "What is the secret code of the {key}?"
_SENT_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")


@dataclass
class _Passage:
    sentences: list[str]


@functools.lru_cache(maxsize=4)
def filler_sentences(source: str = "wikitext2_test") -> tuple[tuple[str, ...], ...]:
    """Sentences of each filler document, in order: WikiText-2 test articles or pydoc topics."""
    if source == "wikitext2_test":
        from r3mem_bench.data import bundled_text
        from r3mem_bench.families.lm import split_wikitext_articles

        docs = [d["text"] for d in split_wikitext_articles(bundled_text("wikitext2_test"), "wikitext2_test")]
    elif source == "pydoc":
        from pydoc_data.topics import topics

        docs = [topics[k] for k in sorted(topics)]
    else:
        raise UserError(f"needle filler '{source}' is unknown; fix: use wikitext2_test or pydoc")
    out = []
    for doc in docs:
        sents = []
        for line in doc.splitlines():
            line = " ".join(line.split())
            if not line or line.startswith("="):
                continue
            for s in _SENT_SPLIT.split(line):
                if "<unk>" not in s and 4 <= len(s.split()) <= 60:
                    sents.append(s)
        if sents:
            out.append(tuple(sents))
    return tuple(out)


def _passages(docs: tuple[tuple[str, ...], ...], order: list[int], cursor: list[int], n_passages: int,
              passage_words: int) -> list[_Passage]:
    """``n_passages`` passages of consecutive sentences, taking documents in ``order`` from ``cursor``."""
    passages: list[_Passage] = []
    cur: list[str] = []
    words = 0
    while len(passages) < n_passages:
        doc_i, sent_i = cursor
        doc = docs[order[doc_i % len(order)]]
        if sent_i >= len(doc):
            cursor[0], cursor[1] = doc_i + 1, 0
            continue
        cur.append(doc[sent_i])
        words += len(doc[sent_i].split())
        cursor[1] = sent_i + 1
        if words >= passage_words:
            passages.append(_Passage(cur))
            cur, words = [], 0
    return passages


def _new_value(rng: random.Random, used: set[str], filler_text: str) -> str:
    """A 4-digit code not used yet in this corpus and absent from its filler text."""
    while True:
        v = str(rng.randint(1000, 9999))
        if v not in used and v not in filler_text:
            used.add(v)
            return v


def generate(seed: int = 0, n_corpora: int = 8, n_passages: int = 12, passage_words: int = 100,
             questions_per_corpus: int = 4, distractors: int = 2, kinds: tuple[str, ...] = KINDS,
             filler: str = "wikitext2_test") -> tuple[list[dict], dict[str, list[MemoryItem]]]:
    """(questions, corpora) in the QA-family format; identical output for identical arguments."""
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise UserError(f"needle kinds {list(kinds)}: unknown kind {bad[:1]}; fix: use some of {list(KINDS)}")
    for name, value, low in (("n_corpora", n_corpora, 1), ("n_passages", n_passages, 2),
                             ("passage_words", passage_words, 10), ("questions_per_corpus", questions_per_corpus, 1),
                             ("distractors", distractors, 0)):
        if value < low:
            raise UserError(f"needle parameter {name}={value} is too small; fix: use {low} or more")
    need_objects = questions_per_corpus * (2 if "multihop" in kinds else 1)
    if need_objects > len(OBJECTS) or distractors >= len(COLOURS):
        raise UserError(f"needle: {questions_per_corpus} questions per corpus with {distractors} distractors need "
                        f"more keys than exist; fix: at most {len(OBJECTS) // 2} questions per corpus and "
                        f"{len(COLOURS) - 1} distractors")
    rng = random.Random(f"needle:{seed}")
    docs = filler_sentences(filler)
    order = list(range(len(docs)))
    rng.shuffle(order)
    cursor = [0, 0]
    questions: list[dict] = []
    corpora: dict[str, list[MemoryItem]] = {}
    for c in range(n_corpora):
        cid = f"needle-s{seed}-c{c:03d}"
        passages = _passages(docs, order, cursor, n_passages, passage_words)
        filler_text = " ".join(s for p in passages for s in p.sentences)
        used_values: set[str] = set()
        objects = rng.sample(OBJECTS, need_objects)
        placed: list[tuple[int, str]] = []  # (passage index, sentence)
        qs = []
        for qi in range(questions_per_corpus):
            kind = kinds[(c * questions_per_corpus + qi) % len(kinds)]
            colour = rng.choice(COLOURS)
            key = f"{colour} {objects.pop()}"
            value = _new_value(rng, used_values, filler_text)
            slots = rng.sample(range(n_passages), 2)
            if kind == "multihop":
                source = f"{rng.choice(COLOURS)} {objects.pop()}"
                placed += [(slots[0], LINK.format(key=source, target=key)), (slots[1], FACT.format(key=key, value=value))]
                gold, asked = [slots[0], slots[1]], source
            else:
                placed.append((slots[0], FACT.format(key=key, value=value)))
                gold, asked = [slots[0]], key
                if kind == "multikey":
                    obj = key.split(" ", 1)[1]
                    for other in rng.sample([x for x in COLOURS if x != colour], distractors):
                        placed.append((rng.randrange(n_passages), FACT.format(key=f"{other} {obj}", value=_new_value(rng, used_values, filler_text))))
            qs.append((qi, kind, asked, value, gold))
        for p_i, sentence in placed:
            sents = passages[p_i].sentences
            sents.insert(rng.randint(0, len(sents)), sentence)
        corpora[cid] = [MemoryItem(id=f"{cid}/p{i:03d}", text=" ".join(p.sentences), meta={"source": filler})
                        for i, p in enumerate(passages)]
        codes = sorted(used_values)  # every code planted in this corpus: the answer candidates of its questions
        for qi, kind, asked, value, gold in qs:
            questions.append({
                "id": f"{cid}-q{qi}", "question": QUESTION.format(key=asked), "answers": [value], "corpus_id": cid,
                "category": kind, "gold_ids": [f"{cid}/p{i:03d}" for i in gold], "answerable": True, "now": None,
                **({"candidates": list(codes)} if len(codes) > 1 else {}),
            })
    return questions, corpora
