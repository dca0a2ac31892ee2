"""Path fields that are resolved against the recipe's folder and checked when the recipe is loaded."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, ValidationInfo


def resolve_existing(value: Path | str, info: ValidationInfo) -> Path:
    base = (info.context or {}).get("base_dir") if info.context else None
    path = Path(value).expanduser()
    if not path.is_absolute() and base is not None:
        path = Path(base) / path
    if not path.exists():
        raise ValueError(f"file not found: {path}")
    return path.resolve()


# A file or folder that must exist; relative paths are taken from the recipe's folder.
InputPath = Annotated[Path, AfterValidator(resolve_existing)]
