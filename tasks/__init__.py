"""Builtin task definitions: one YAML per task, grouped by family (lm/, rag/, dialogue/)."""
