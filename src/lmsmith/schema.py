"""Shared pydantic building blocks for every stage's config.

Every config forbids unknown keys: a typo in a recipe is an error, never a silently ignored setting.
"""

from __future__ import annotations

from pathlib import Path
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


def read_yaml_mapping(path: Path, what: str) -> dict[str, Any]:
    """A YAML file that must hold a mapping (a recipe, a task); a missing file, invalid YAML (with its line)
    or another shape is a one-line `UserError`. An empty file is an empty mapping."""
    import yaml

    from lmsmith.errors import UserError

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: {what} file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise UserError(f"{where}: invalid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a {what} file must be a mapping of settings")
    return raw
