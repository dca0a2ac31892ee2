"""Retrieval-augmented generation: knowledge bases over the user's documents.

- `ingest.py`: files (txt, md, html, jsonl, csv, pdf, docx) into documents; unreadable ones skipped with a reason.
- `chunking.py`: sentence-aware token windows, within markdown/html sections.
- `retrieval.py`: FAISS dense search, BM25 over jieba words (bm25s), reciprocal-rank fusion.
- `kb.py`: `KnowledgeBase` (build, add, remove, search), a folder with a manifest.
- `cli.py`: `lmsmith rag ...`.
"""
