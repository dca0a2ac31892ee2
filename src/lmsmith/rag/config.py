"""Settings of a knowledge base (stored in its manifest) and of a search."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, field_validator

from lmsmith.schema import StrictModel

FLAT_BELOW = 50_000  # chunks: exact search up to here, HNSW above (`index: auto`)


class KBConfig(StrictModel):
    """How documents become searchable chunks. Fixed when the KB is built: `lmsmith rag add` reuses it."""

    embedding_model: str = Field(
        "minilm", description="sentence-transformers model: minilm (bundled, offline) or a local folder "
        "(e.g. bge-small-zh).")
    chunk_tokens: Optional[int] = Field(
        None, ge=8, description="Largest chunk, in the embedding model's tokens; none: its max sequence length up "
        "to 512 (256 for MiniLM, 512 for BGE).")
    overlap_tokens: int = Field(64, ge=0, description="Tokens of the previous chunk repeated at a chunk's start.")
    split: Literal["sentences", "headings"] = Field(
        "headings", description="sentences: token windows that end at sentence ends (。！？；.!?); headings: "
        "the same within each markdown/html section, so no chunk spans two sections.")
    clean: list[str] = Field(
        default_factory=list, description="Data-stage operators (their mappers) run on each document's text before "
        "chunking, e.g. unicode_normalize, mask_pii, normalize_numbers; 'default' is the data stage's default "
        "pipeline. Chunk offsets refer to the cleaned text.")
    index: Literal["auto", "flat", "hnsw"] = Field(
        "auto", description=f"Dense index: flat (exact) or hnsw (approximate); auto: flat below {FLAT_BELOW:,} "
        "chunks.")
    hnsw_m: int = Field(32, ge=4, le=128, description="HNSW: links per node.")
    hnsw_ef_construction: int = Field(80, ge=8, description="HNSW: candidate list while building.")

    @field_validator("clean")
    @classmethod
    def _known_operators(cls, value: list[str]) -> list[str]:
        from lmsmith.data.steps import validate_op_spec

        for name in value:
            if name != "default":
                validate_op_spec({"op": name})
        return value

    def cleaner(self):
        """The text-to-text function of `clean` (None when there is nothing to run)."""
        if not self.clean:
            return None
        from lmsmith.data.steps import DEFAULT_OPS, rewriter

        specs = [dict(spec) for spec in DEFAULT_OPS] if "default" in self.clean else []
        specs += [{"op": name} for name in self.clean if name != "default"]
        return rewriter(specs, "corpus")


class SearchConfig(StrictModel):
    """One search: how many chunks, and how dense and sparse rankings are fused."""

    k: int = Field(5, ge=1, le=1000, description="Chunks returned.")
    mode: Literal["hybrid", "dense", "sparse"] = Field("hybrid", description="Which retrievers rank.")
    dense_weight: Optional[float] = Field(
        None, ge=0, description="Weight of the dense ranking in reciprocal-rank fusion; none: 1, but 0 for a Chinese "
        "query when the KB's embedding model is the bundled English MiniLM (its ranking of Chinese is noise that "
        "fusion would mix in: docs/rag.md has the measurement).")
    sparse_weight: float = Field(1.0, ge=0, description="Weight of the BM25 ranking in reciprocal-rank fusion.")
    rrf_k: int = Field(60, ge=1, description="Reciprocal-rank fusion constant: 1 / (rrf_k + rank).")
    candidates: int = Field(50, ge=1, le=10_000, description="Chunks each retriever hands to fusion.")
    hnsw_ef_search: int = Field(128, ge=1, description="HNSW: candidate list while searching.")
    filter: list[str] = Field(
        default_factory=list, description="KEY=VALUE: only chunks whose metadata holds it (keys: source, doc_id, "
        "title, and a jsonl document's metadata fields); several must all hold.")
    reranker: Optional[str] = Field(
        None, description="A sentence-transformers cross-encoder folder that reorders the fused candidates.")
