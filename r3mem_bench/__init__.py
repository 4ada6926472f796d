"""r3mem-bench: an evaluation suite for memory modules of language models (R3Mem, RMT, MemoryBank, vector RAG).

Where things live: ``task.py`` (Task contract + YAML registry), ``method.py`` (MemoryMethod contract),
``families/`` (protocols, loaders, metrics), ``methods/`` (references), ``r3mem/`` (R3Mem), ``runner.py`` (the
one evaluate path), ``cli.py`` (the ``r3mem-bench`` command).
"""

__version__ = "0.1.0"
