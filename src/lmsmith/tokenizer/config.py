from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from lmsmith.paths import InputPath
from lmsmith.schema import StrictModel


class MineTermsConfig(StrictModel):
    """Mine domain terms from corpus_train: jieba words, most frequent first."""

    top_k: int = Field(200, ge=1, description="Add at most this many terms.")
    min_count: int = Field(5, ge=1, description="Only terms seen at least this many times in corpus_train.")
    min_chars: int = Field(2, ge=1, description="Shortest term, in characters.")


class ExtendConfig(StrictModel):
    """Add domain vocabulary to an existing tokenizer instead of training a new one."""

    base: InputPath = Field(
        ...,
        description="A tokenizer folder, or an HF model folder: then the stage also writes the model with "
        "its embeddings grown, new rows set to the mean of their old sub-token rows.",
    )
    terms: Optional[InputPath] = Field(None, description="Term list file: one term per line, # comments.")
    mine: Optional[MineTermsConfig] = Field(None, description="Mine terms from corpus_train by frequency.")

    @model_validator(mode="after")
    def _has_a_source(self) -> "ExtendConfig":
        if self.terms is None and self.mine is None:
            raise ValueError("set terms (a file), mine (from the corpus), or both")
        return self


TRAINING_SOURCES = ("corpus", "instructions")


class TokenizerConfig(StrictModel):
    """Train a tokenizer on the cleaned corpus and/or instructions, or extend an existing one (HF `tokenizers`)."""

    kind: Literal["byte_bpe", "wordpiece", "char"] = Field(
        "byte_bpe",
        description="byte_bpe: byte-level BPE with Qwen2's pre-tokenizer (never unknown, AutoTokenizer-exact "
        "in qwen2 folders); wordpiece: BERT-style with [UNK]; char: one token per character.",
    )
    vocab_size: int = Field(4000, ge=300, description="Target vocabulary size, special tokens included.")
    min_frequency: int = Field(2, ge=1, description="Minimum frequency of a merge (BPE, WordPiece) or character (char).")
    chat_template: Literal["chatml"] = Field("chatml", description="Chat template saved with the tokenizer.")
    train_on: list[Literal["corpus", "instructions"]] = Field(
        default_factory=lambda: list(TRAINING_SOURCES),
        min_length=1,
        description="What a new vocabulary is trained on: corpus = corpus_train documents, instructions = every "
        "message of sft_train. Use [corpus] with sft.privacy: DP-SGD's ε does not cover the vocabulary. "
        "Unused with extend, which mines corpus_train only.",
    )
    extend: Optional[ExtendConfig] = Field(
        None, description="Extend this existing tokenizer instead of training (kind and vocab_size are then unused)."
    )
