"""Texts that install with the project (see ``SOURCES.md`` beside this file) and the LM corpus loaders."""

from __future__ import annotations

import gzip
from importlib import resources

BUNDLED = {
    "wikitext2_test": "wikitext2_test.txt.gz",
    "tinyshakespeare": "tinyshakespeare.txt.gz",
    "wiki_train": "wiki_train.jsonl.gz",
    "wiki_train_qa": "wiki_train_qa.jsonl.gz",
}


def bundled_text(name: str) -> str:
    """The text of a bundled corpus (``wikitext2_test``, ``tinyshakespeare``, ``wiki_train``, ``wiki_train_qa``)."""
    from r3mem_bench.errors import UserError

    if name not in BUNDLED:
        raise UserError(f"bundled text '{name}' does not exist; fix: use one of {sorted(BUNDLED)}")
    blob = resources.files("r3mem_bench.data").joinpath(BUNDLED[name]).read_bytes()
    return gzip.decompress(blob).decode("utf-8")


def bundled_jsonl(name: str) -> list[dict]:
    """The records of a bundled JSON-lines file: ``wiki_train`` documents ``[{"id", "text"}]``, ``wiki_train_qa``
    pairs ``[{"id", "question", "answer", "passages"}]``."""
    import json

    return [json.loads(line) for line in bundled_text(name).splitlines() if line.strip()]
