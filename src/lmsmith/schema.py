"""Shared pydantic building blocks for every stage's config.

Every config forbids unknown keys: a typo in a recipe is an error, never a silently ignored setting.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """Base for all lmsmith configs: unknown fields are rejected and assignments re-validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

    # Fields that steer how a stage runs (logging, checkpoint cadence, resuming) but not what it
    # produces: they are recorded in the manifest but left out of the hash that decides a rerun.
    run_control_fields: ClassVar[frozenset[str]] = frozenset()

    def identity(self) -> dict[str, Any]:
        """The config as JSON, without its run-control fields: what the stage's outputs depend on."""
        data = self.model_dump(mode="json")
        for name in self.run_control_fields:
            data.pop(name, None)
        return data
