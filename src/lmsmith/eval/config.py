from __future__ import annotations

from typing import Optional

from pydantic import Field

from lmsmith.schema import StrictModel


class EvalConfig(StrictModel):
    """Perplexity, BLEU-4, ROUGE-L and numeric accuracy: base model against tuned model."""

    max_new_tokens: int = Field(96, ge=1)
    max_samples: Optional[int] = Field(60, ge=1, description="Cap on held-out instructions generated.")
    ppl_max_docs: Optional[int] = Field(200, ge=1, description="Cap on held-out documents for perplexity.")
    batch_size: int = Field(16, ge=1)
    numeric_rel_tol: float = Field(0.01, ge=0, description="Relative tolerance for numeric accuracy.")
