"""lmsmith: turn an open LLM into a served domain expert."""

__version__ = "0.1.0"
