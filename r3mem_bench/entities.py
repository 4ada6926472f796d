"""Offline entity extraction for R3Mem's entity-level memories: capitalised spans, no model, no download.

An extractor is any ``Callable[[str], list[str]]`` returning the entity strings mentioned in a sentence; the
default, ``capitalised_spans``, takes runs of capitalised words (and ALL-CAPS words such as speaker names),
dropping sentence-initial function words. ``EXTRACTORS`` names the available ones (R3Mem's
``entity_extractor`` option picks one); ``entity_contexts`` groups the sentences of a text by entity.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from typing import Callable

_STOP = set("""a an and as at be but by do for from he her his how i if in is it its let my no not now o of oh on
or our she so that the their then there these they this those thou thy to we what when where which who why will
with yes you your thee ye nay ay well come go good sir here see shall what's i'll i'm o'er 'tis see also note
changed deprecated all added example examples return returns raise raises if else elif for while try except
true false none""".split())
_SPAN = re.compile(r"\b(?:[A-Z][a-z]+|[A-Z]{2,})(?:[ \t]+(?:[A-Z][a-z]+|[A-Z]{2,}))*\b")
_SENTENCE = re.compile(r"(?<=[.!?;:])\s+|\n+")


def sentences(text: str) -> list[str]:
    """Split text into sentences/lines (punctuation or newline boundaries), dropping empty ones."""
    return [s.strip() for s in _SENTENCE.split(text) if s and s.strip()]


def capitalised_spans(sentence: str) -> list[str]:
    """Entity strings in one sentence: capitalised word runs, ALL-CAPS words title-cased, stop words dropped."""
    found = []
    first = len(sentence) - len(sentence.lstrip())
    for match in _SPAN.finditer(sentence):
        if match.start() == first and " " not in match.group(0) and not match.group(0).isupper():
            continue  # a lone capitalised word opening a sentence is usually not a name
        words = [w.title() if w.isupper() and len(w) > 1 else w for w in match.group(0).split()]
        while words and words[0].lower() in _STOP:
            words = words[1:]
        if words and len(" ".join(words)) >= 3:
            found.append(" ".join(words))
    return found


EXTRACTORS: dict[str, Callable[[str], list[str]]] = {"capitalised": capitalised_spans}


def entity_contexts(text: str, min_mentions: int = 2, min_words: int = 4, extractor: Callable[[str], list[str]] = capitalised_spans
                    ) -> "OrderedDict[str, list[str]]":
    """Entities in >= ``min_mentions`` sentences of >= ``min_words`` words -> those sentences, most mentioned first."""
    by_entity: dict[str, list[str]] = {}
    for sent in sentences(text):
        if len(sent.split()) < min_words:
            continue
        for ent in dict.fromkeys(extractor(sent)):
            by_entity.setdefault(ent, []).append(sent)
    kept = [(e, s) for e, s in by_entity.items() if len(s) >= min_mentions]
    kept.sort(key=lambda es: (-len(es[1]), es[0]))
    return OrderedDict(kept)
