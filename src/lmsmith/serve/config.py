from __future__ import annotations

from pydantic import Field

from lmsmith.schema import StrictModel


class ServeConfig(StrictModel):
    """Serving settings; in a recipe, the serve stage starts the server and asks it held-out questions."""

    host: str = "127.0.0.1"
    port: int = Field(0, ge=0, le=65535, description="0 picks a free port (pipeline smoke check).")
    smoke_questions: int = Field(3, ge=0, description="Held-out questions asked through the API.")
    max_new_tokens: int = Field(96, ge=1)
