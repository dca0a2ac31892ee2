"""A knowledge base: a folder holding chunks, their embeddings and both indexes, built from documents and
updated by document id without re-embedding what did not change.

    KB/manifest.json   settings, embedding model, documents (id -> source, digest, chunks), counts, skipped files
    KB/chunks.jsonl    one chunk per line, row-aligned with the vectors (text, offsets, headings, metadata, words)
    KB/vectors.npy     float32 [chunks, dims], normalized
    KB/dense.faiss     FAISS index over the vectors (flat or HNSW)
    KB/bm25/           bm25s index over the chunks' jieba words

Every change writes a complete new folder beside the old one and swaps it in, so an interrupted update
leaves the old KB as it was.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from lmsmith.errors import UserError
from lmsmith.jsonl import iter_jsonl, write_jsonl
from lmsmith.rag.chunking import Chunk, Chunker
from lmsmith.rag.config import FLAT_BELOW, KBConfig, SearchConfig
from lmsmith.rag.ingest import KBDocument, Skipped, document_digest, read_documents
from lmsmith.rag.retrieval import DenseIndex, SparseIndex, reciprocal_rank_fusion, words

FORMAT = 1
MANIFEST = "manifest.json"
_CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")


@dataclass
class Hit:
    """A retrieved chunk: its fused rank score, and the retrievers' own scores where it was found."""

    row: int
    score: float
    chunk: dict[str, Any]
    dense: float | None = None
    sparse: float | None = None
    rerank: float | None = None

    def body(self) -> dict[str, Any]:
        chunk = self.chunk
        return {"doc_id": chunk["doc_id"], "source": chunk["source"], "title": chunk["title"],
                "title_path": chunk["title_path"], "start": chunk["start"], "end": chunk["end"],
                "metadata": chunk["metadata"], "text": chunk["text"], "score": round(self.score, 6),
                "dense_score": self.dense, "sparse_score": self.sparse, "rerank_score": self.rerank}


@dataclass
class Change:
    """What a build, add or remove did."""

    files_read: int = 0
    documents_added: int = 0
    documents_replaced: int = 0
    documents_unchanged: int = 0
    documents_removed: int = 0
    chunks_added: int = 0
    skipped: list[Skipped] | None = None


class KnowledgeBase:
    def __init__(self, folder: Path, config: KBConfig, chunks: list[dict[str, Any]], vectors: np.ndarray,
                 documents: dict[str, dict[str, Any]], manifest: dict[str, Any]):
        self.folder = folder
        self.config = config
        self.chunks = chunks
        self.vectors = vectors
        self.documents = documents
        self.manifest = manifest
        self._dense: DenseIndex | None = None
        self._sparse: SparseIndex | None = None
        self._embedder: Any = None

    # ----- opening and building -----

    @classmethod
    def open(cls, folder: str | Path) -> "KnowledgeBase":
        folder = Path(folder)
        path = folder / MANIFEST
        if not path.is_file():
            raise UserError(f"{folder}: not a knowledge base (no {MANIFEST}); build one with `lmsmith rag build`")
        manifest = json.loads(path.read_text(encoding="utf-8"))
        if manifest.get("format") != FORMAT:
            raise UserError(f"{path}: knowledge base format {manifest.get('format')!r}; this lmsmith reads {FORMAT}")
        chunks = [row for _, row in iter_jsonl(folder / "chunks.jsonl")] if manifest["counts"]["chunks"] else []
        vectors = np.load(folder / "vectors.npy", allow_pickle=False)
        if len(chunks) != len(vectors):
            raise UserError(f"{folder}: chunks.jsonl has {len(chunks)} rows and vectors.npy {len(vectors)}; "
                            "rebuild the knowledge base")
        kb = cls(folder, KBConfig.model_validate(manifest["config"]), chunks, vectors, manifest["documents"], manifest)
        kb._dense = DenseIndex.load(folder / "dense.faiss")
        kb._sparse = SparseIndex.load(folder / "bm25", len(chunks))
        return kb

    @classmethod
    def build(cls, paths: list[Path], folder: str | Path, config: KBConfig | None = None) -> tuple["KnowledgeBase", Change]:
        """A new KB at `folder` from the documents under `paths` (an existing KB there is replaced)."""
        config = config or KBConfig()
        kb = cls(Path(folder), config, [], np.zeros((0, 0), dtype=np.float32), {}, {})
        change = kb._ingest(paths)
        kb._save()
        return kb, change

    # ----- changing -----

    def add(self, paths: list[Path]) -> Change:
        """Index the documents under `paths`: new ids are added, changed ones replaced, unchanged ones kept
        (their vectors are not computed again)."""
        change = self._ingest(paths)
        self._save()
        return change

    def remove(self, ids: list[str]) -> Change:
        """Drop documents by id, or every document of a source file when an id names one."""
        doomed = {doc for doc, entry in self.documents.items() if doc in ids or entry["source"] in ids}
        unknown = [name for name in ids if name not in self.documents and
                   not any(entry["source"] == name for entry in self.documents.values())]
        if unknown:
            raise UserError(f"{self.folder}: no document or source named {', '.join(map(repr, unknown))}")
        self._drop(doomed)
        self._save()
        return Change(documents_removed=len(doomed))

    def _drop(self, doc_ids: set[str]) -> None:
        if not doc_ids:
            return
        keep = np.array([chunk["doc_id"] not in doc_ids for chunk in self.chunks], dtype=bool)
        self.chunks = [chunk for chunk, kept in zip(self.chunks, keep) if kept]
        self.vectors = self.vectors[keep] if len(self.vectors) else self.vectors
        for doc_id in doc_ids:
            self.documents.pop(doc_id, None)
        self._dense = self._sparse = None  # rebuilt from the kept vectors and words: nothing is embedded again

    def _ingest(self, paths: list[Path]) -> Change:
        from lmsmith.console import console

        with console.status("reading documents"):
            documents, skipped, files = read_documents(paths)
        clean = self.config.cleaner()
        if clean is not None:
            for document in documents:
                document.text = clean(document.text)
            emptied = [document.id for document in documents if not document.text.strip()]
            documents = [document for document in documents if document.text.strip()]
        else:
            emptied = []
        seen: dict[str, KBDocument] = {}
        for document in documents:
            if document.id in seen:
                raise UserError(f"{document.source}: document id {document.id!r} also comes from "
                                f"{seen[document.id].source}; ids must be unique in a knowledge base")
            seen[document.id] = document
        change = Change(files_read=files, skipped=skipped)
        fresh: list[tuple[KBDocument, str]] = []
        for document in documents:
            digest = document_digest(document)
            entry = self.documents.get(document.id)
            if entry is not None and entry["digest"] == digest:
                change.documents_unchanged += 1
                continue
            if entry is not None:
                change.documents_replaced += 1
            else:
                change.documents_added += 1
            fresh.append((document, digest))
        self._drop({document.id for document, _ in fresh if document.id in self.documents})
        new_chunks = self._chunk_and_embed([document for document, _ in fresh])
        change.chunks_added = len(new_chunks)
        per_document = Counter(chunk["doc_id"] for chunk in new_chunks)
        for document, digest in fresh:
            self.documents[document.id] = {"source": document.source, "title": document.title, "digest": digest,
                                           "chunks": per_document[document.id]}
        self.manifest["skipped"] = [{"path": s.path, "reason": s.reason} for s in skipped]
        self.manifest["last_change"] = {
            "files_read": files, "files_indexed": files - len(skipped), "documents_added": change.documents_added,
            "documents_replaced": change.documents_replaced, "documents_unchanged": change.documents_unchanged,
            "files_skipped": len(skipped), "chunks_added": change.chunks_added,
            "documents_emptied_by_clean": emptied}
        return change

    def _chunk_and_embed(self, documents: list[KBDocument]) -> list[dict[str, Any]]:
        from rich.progress import Progress

        from lmsmith.console import console

        embedder = self.embedder()
        chunk_tokens = self.chunk_tokens()
        chunker = Chunker(embedder.tokenizer, chunk_tokens, self.config.overlap_tokens,
                          self.config.split == "headings")
        chunks: list[Chunk] = []
        for document in documents:
            chunks += chunker.chunk(document)
        records = [chunk.record() | {"words": words(chunk.text)} for chunk in chunks]
        vectors = np.zeros((len(records), self.dimensions()), dtype=np.float32)
        batch = 64
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task(f"embedding {len(records)} chunks", total=len(records))
            for start in range(0, len(records), batch):
                texts = [_embedded_text(record) for record in records[start:start + batch]]
                vectors[start:start + len(texts)] = embedder.encode(texts, batch_size=batch)
                progress.advance(task, len(texts))
        if len(records):
            self.vectors = np.concatenate([self.vectors, vectors]) if len(self.chunks) else vectors
            self.chunks += records
            if self._dense is not None and self._dense.kind == self._index_kind():
                self._dense.add(vectors)
            else:
                self._dense = None
            self._sparse = None  # bm25s indexes are not incremental: rebuilt from the stored words
        return records

    # ----- the model -----

    def embedder(self) -> Any:
        if self._embedder is None:
            from lmsmith.serve.embeddings import Embedder

            self._embedder = Embedder(self.config.embedding_model)
            stored = self.manifest.get("embedding")
            if stored and stored["fingerprint"] != self._embedder.fingerprint():
                raise UserError(
                    f"{self.folder}: built with embedding model {stored['model']} (fingerprint {stored['fingerprint']}), "
                    f"but {self.config.embedding_model} is now {self._embedder.model_id} with different weights; "
                    "vectors of two models cannot be mixed: rebuild with `lmsmith rag build`")
        return self._embedder

    def dimensions(self) -> int:
        return int(self.embedder().dimensions)

    def chunk_tokens(self) -> int:
        if self.config.chunk_tokens is None:
            return min(512, self.embedder().max_seq_length)
        return int(self.config.chunk_tokens)

    def _index_kind(self) -> str:
        if self.config.index != "auto":
            return self.config.index
        return "flat" if len(self.chunks) < FLAT_BELOW else "hnsw"

    # ----- searching -----

    def dense(self) -> DenseIndex:
        if self._dense is None:
            self._dense = DenseIndex.build(self.vectors, self._index_kind(), self.config.hnsw_m,
                                           self.config.hnsw_ef_construction)
        return self._dense

    def sparse(self) -> SparseIndex:
        if self._sparse is None:
            self._sparse = SparseIndex.build([chunk["words"] for chunk in self.chunks])
        return self._sparse

    def search(self, query: str, settings: SearchConfig | None = None) -> list[Hit]:
        return self.search_many([query], settings)[0]

    def search_many(self, queries: Sequence[str], settings: SearchConfig | None = None) -> list[list[Hit]]:
        """`search` for each query, the queries embedded in one batch (the cost of batch work such as
        evaluation is the embedding model's per-call overhead, not the index)."""
        settings = settings or SearchConfig()
        for query in queries:
            if not query.strip():
                raise UserError("the query is empty")
        allowed = self._filter_rows(settings.filter)
        if not queries or (allowed is not None and not allowed.any()):
            return [[] for _ in queries]
        dense_wanted = settings.mode in ("hybrid", "dense") and bool(self.chunks)
        vectors = self.embedder().encode(list(queries)) if dense_wanted else [None] * len(queries)
        return [self._search_one(query, vector, settings, allowed) for query, vector in zip(queries, vectors)]

    def _search_one(self, query: str, vector: np.ndarray | None, settings: SearchConfig,
                    allowed: np.ndarray | None) -> list[Hit]:
        n = max(settings.candidates, settings.k)
        dense: list[tuple[int, float]] = []
        sparse: list[tuple[int, float]] = []
        if vector is not None:
            dense = self.dense().search(vector, n, allowed, settings.hnsw_ef_search)
        if settings.mode in ("hybrid", "sparse") and self.chunks:
            sparse = self.sparse().search(words(query), n, allowed)
        weights = {"dense": self._dense_weight(settings, query) if settings.mode != "sparse" else 0.0,
                   "sparse": settings.sparse_weight if settings.mode != "dense" else 0.0}
        fused = reciprocal_rank_fusion([(dense, weights["dense"]), (sparse, weights["sparse"])], settings.rrf_k)
        dense_scores, sparse_scores = dict(dense), dict(sparse)
        hits = [Hit(row, score, self._public(row), dense_scores.get(row), sparse_scores.get(row))
                for row, score in fused[:n]]
        if settings.reranker:
            hits = self._rerank(query, hits, settings.reranker)
        return hits[:settings.k]

    def _dense_weight(self, settings: SearchConfig, query: str) -> float:
        if settings.dense_weight is not None or settings.mode == "dense":
            return 1.0 if settings.dense_weight is None else settings.dense_weight
        from lmsmith.serve.embeddings import BUNDLED

        english_only = self.config.embedding_model == BUNDLED
        return 0.0 if english_only and _CJK.search(query) else 1.0

    def _public(self, row: int) -> dict[str, Any]:
        return {key: value for key, value in self.chunks[row].items() if key != "words"}

    def _filter_rows(self, filters: list[str]) -> np.ndarray | None:
        if not filters:
            return None
        wanted = []
        for item in filters:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise UserError(f"filter {item!r}: expected KEY=VALUE")
            wanted.append((key, value))

        def matches(chunk: dict[str, Any]) -> bool:
            return all(str(chunk.get(key, chunk["metadata"].get(key))) == value for key, value in wanted)

        return np.array([matches(chunk) for chunk in self.chunks], dtype=bool)

    def _rerank(self, query: str, hits: list[Hit], folder: str) -> list[Hit]:
        from sentence_transformers import CrossEncoder

        path = Path(folder).expanduser()
        if not path.is_dir():
            raise UserError(f"reranker {folder}: no such cross-encoder folder")
        scores = CrossEncoder(str(path), device="cpu").predict([(query, hit.chunk["text"]) for hit in hits])
        for hit, score in zip(hits, scores):
            hit.rerank = float(score)
        return sorted(hits, key=lambda hit: -(hit.rerank or 0.0))

    # ----- saving -----

    def _save(self) -> None:
        """Write the whole KB into a fresh folder beside the target, then swap it in."""
        target = self.folder
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.with_name(f".{target.name}.writing")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        embedder = self.embedder()
        if not len(self.vectors):
            self.vectors = np.zeros((0, self.dimensions()), dtype=np.float32)
        write_jsonl(staging / "chunks.jsonl", self.chunks)
        np.save(staging / "vectors.npy", self.vectors.astype(np.float32), allow_pickle=False)
        self.dense().save(staging / "dense.faiss")
        (staging / "bm25").mkdir()
        if self.chunks:
            self.sparse().save(staging / "bm25")
        self.manifest |= {
            "format": FORMAT,
            "config": self.config.model_dump(),
            "embedding": {"model": embedder.model_id, "fingerprint": embedder.fingerprint(),
                          "dimensions": self.dimensions(), "chunk_tokens": self.chunk_tokens()},
            "index": self.dense().kind,
            "counts": {"documents": len(self.documents), "chunks": len(self.chunks)},
            "documents": self.documents,
            "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (staging / MANIFEST).write_text(json.dumps(self.manifest, ensure_ascii=False, indent=2), encoding="utf-8")
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if target.exists():
            if not (target / MANIFEST).is_file() and any(target.iterdir()):
                shutil.rmtree(staging)
                raise UserError(f"{target}: exists and is not a knowledge base; choose another --out")
            target.rename(old)
        staging.rename(target)
        shutil.rmtree(old, ignore_errors=True)


def _embedded_text(record: dict[str, Any]) -> str:
    """What the embedding model reads: the heading path first, so a chunk knows what section it is in."""
    heading = " / ".join(record["title_path"])
    return f"{heading}\n{record['text']}" if heading and not record["text"].startswith("#") else record["text"]
