"""Shared pydantic building blocks for every stage's config.

Every config forbids unknown keys: a typo in a recipe is an error, never a silently ignored setting.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """Base for all lmsmith configs: unknown fields are rejected and assignments re-validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())
