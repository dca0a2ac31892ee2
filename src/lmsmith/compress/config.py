from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from lmsmith.schema import StrictModel


class CompressConfig(StrictModel):
    """Quantize the merged model and measure size, speed and metric change against fp32."""

    method: Literal["dynamic_int8"] = "dynamic_int8"
    bench_new_tokens: int = Field(64, ge=1, description="Tokens generated per prompt for tok/s.")
    bench_prompts: int = Field(4, ge=1)
    bench_repeats: int = Field(3, ge=1, description="Timed runs per measurement; the fastest is kept.")
    max_samples: Optional[int] = Field(30, ge=1, description="Held-out instructions for the metric delta.")
    max_new_tokens: int = Field(96, ge=1, description="Answer length cap for the metric delta.")
    batch_size: int = Field(16, ge=1, description="Prompts per batch for the metric delta.")
    ppl_docs: int = Field(8, ge=1, description="Held-out documents for the perplexity delta.")
