"""Settings of `lmsmith serve` and of the serve stage (light: no torch import)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from lmsmith.schema import StrictModel


class ServeConfig(StrictModel):
    """Serving settings; in a recipe, the serve stage starts the server and asks it held-out questions."""

    host: str = "127.0.0.1"
    port: int = Field(0, ge=0, le=65535, description="0 picks a free port (pipeline smoke check).")
    smoke_questions: int = Field(3, ge=0, description="Held-out questions asked through the API.")
    max_new_tokens: int = Field(96, ge=1, description="max_tokens of a request that gives none.")
    device: str = Field("auto", description="torch device for the model; auto: cuda when present, else cpu.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weight dtype; auto keeps the dtype the model was saved in."
    )
