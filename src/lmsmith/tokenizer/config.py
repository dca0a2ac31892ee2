from __future__ import annotations

from typing import Literal

from pydantic import Field

from lmsmith.schema import StrictModel


class TokenizerConfig(StrictModel):
    """Train a tokenizer on the cleaned corpus and instructions (HF `tokenizers` does the work)."""

    kind: Literal["byte_bpe"] = Field("byte_bpe", description="Tokenizer algorithm.")
    vocab_size: int = Field(4000, ge=300, description="Target vocabulary size, special tokens included.")
    min_frequency: int = Field(2, ge=1, description="Minimum pair frequency for a BPE merge.")
    chat_template: Literal["chatml"] = Field("chatml", description="Chat template saved with the tokenizer.")
