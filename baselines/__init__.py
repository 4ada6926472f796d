"""Baseline memory modules (RMT, MemoryBank, vector RAG), one module each, registered on import."""
