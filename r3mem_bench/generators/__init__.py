"""Seeded generators of synthetic evaluation data (offline, deterministic per seed).

``needle``: needle-in-a-haystack QA over real filler text (RULER-style single, multi-key and multi-hop needles).
"""
