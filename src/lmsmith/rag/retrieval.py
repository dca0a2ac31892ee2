"""The two retrievers and their fusion: dense vectors in FAISS, BM25 over jieba words (bm25s), and
weighted reciprocal-rank fusion.

Dense search is inner product over normalized embeddings (cosine), exact (`IndexFlatIP`) or approximate
(`IndexHNSWFlat`). BM25 tokens come from jieba's search-mode cut, so Chinese text scores by its words
rather than by whitespace (which it has none of). Both retrievers take a row filter, so metadata filters
are exact rather than a post-filter of a short list.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

_WORD = re.compile(r"\w", re.U)
# Function words that say nothing about what a passage is about: a question sharing only these with a
# chunk does not match it.
STOPWORDS = frozenset(
    "的 了 是 在 和 与 及 或 也 都 就 而 为 以 于 对 把 被 从 到 由 这 那 其 之 个 些 有 多少 什么 哪 哪些 哪个 吗 呢 吧 啊 "
    "我 你 他 她 它 我们 你们 他们 请 如何 怎么 怎样 是否 可以 能 会 a an the of to in on for and or is are was were be "
    "by with as at from that this what which who how do does did".split())


def words(text: str) -> list[str]:
    """BM25 tokens: jieba's search-mode words, lowercased, without punctuation, white space or STOPWORDS."""
    import logging

    import jieba

    jieba.setLogLevel(logging.WARNING)
    return [word for word in jieba.lcut_for_search(text.lower()) if _WORD.search(word) and word not in STOPWORDS]


class DenseIndex:
    """FAISS over the chunk vectors; a chunk's row in the index is its row in the KB."""

    def __init__(self, index: Any):
        self.index = index

    @classmethod
    def build(cls, vectors: np.ndarray, kind: str, m: int = 32, ef_construction: int = 80) -> "DenseIndex":
        import faiss

        dims = vectors.shape[1]
        if kind == "hnsw":
            index = faiss.IndexHNSWFlat(dims, m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = ef_construction
        else:
            index = faiss.IndexFlatIP(dims)
        if len(vectors):
            index.add(np.ascontiguousarray(vectors, dtype=np.float32))
        return cls(index)

    @property
    def kind(self) -> str:
        return "hnsw" if type(self.index).__name__.startswith("IndexHNSW") else "flat"

    def add(self, vectors: np.ndarray) -> None:
        self.index.add(np.ascontiguousarray(vectors, dtype=np.float32))

    def search(self, query: np.ndarray, n: int, allowed: np.ndarray | None = None,
               ef_search: int = 128) -> list[tuple[int, float]]:
        import faiss

        if self.index.ntotal == 0:
            return []
        selector = None if allowed is None else faiss.IDSelectorBatch(np.flatnonzero(allowed).astype(np.int64))
        if self.kind == "hnsw":
            params = faiss.SearchParametersHNSW(efSearch=max(ef_search, n), sel=selector)
        else:
            params = faiss.SearchParameters(sel=selector) if selector is not None else None
        scores, rows = self.index.search(np.ascontiguousarray(query.reshape(1, -1), dtype=np.float32),
                                         min(n, self.index.ntotal), params=params)
        return [(int(row), float(score)) for row, score in zip(rows[0], scores[0]) if row >= 0]

    def save(self, path: Path) -> None:
        import faiss

        faiss.write_index(self.index, str(path))

    @classmethod
    def load(cls, path: Path) -> "DenseIndex":
        import faiss

        return cls(faiss.read_index(str(path)))


class SparseIndex:
    """BM25 (bm25s, Lucene's variant) over each chunk's words."""

    def __init__(self, bm25: Any, size: int):
        self.bm25 = bm25
        self.size = size

    @classmethod
    def build(cls, tokens: list[list[str]]) -> "SparseIndex":
        import bm25s

        bm25 = bm25s.BM25()
        if tokens:
            # an empty chunk still needs a row, so rows stay aligned with the KB's
            bm25.index([words or [""] for words in tokens], show_progress=False)
        return cls(bm25, len(tokens))

    def search(self, query_words: list[str], n: int, allowed: np.ndarray | None = None) -> list[tuple[int, float]]:
        if not self.size or not query_words:
            return []
        known = [word for word in query_words if word in self.bm25.vocab_dict]
        if not known:
            return []
        mask = None if allowed is None else allowed.astype(np.float32)
        rows, scores = self.bm25.retrieve([known], k=min(n, self.size), show_progress=False, n_threads=0,
                                          weight_mask=mask)
        return [(int(row), float(score)) for row, score in zip(rows[0], scores[0]) if score > 0]

    def save(self, folder: Path) -> None:
        self.bm25.save(str(folder), show_progress=False)

    @classmethod
    def load(cls, folder: Path, size: int) -> "SparseIndex":
        import bm25s

        return cls(bm25s.BM25.load(str(folder)), size) if size else cls(bm25s.BM25(), 0)


def reciprocal_rank_fusion(rankings: list[tuple[list[tuple[int, float]], float]], k: int) -> list[tuple[int, float]]:
    """Rows by the sum over rankings of weight / (k + rank), rank counted from 1; best first."""
    fused: dict[int, float] = {}
    for ranking, weight in rankings:
        if weight == 0:
            continue
        for rank, (row, _) in enumerate(ranking, start=1):
            fused[row] = fused.get(row, 0.0) + weight / (k + rank)
    return sorted(fused.items(), key=lambda item: (-item[1], item[0]))
