"""Input paths: the files and folders a recipe names, resolved against the recipe's folder and checked
when it is loaded, and fingerprinted by the pipeline so that editing one reruns the stages that read it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

from pydantic import AfterValidator, ValidationInfo


def resolve_existing(value: Path | str, info: ValidationInfo) -> Path:
    base = (info.context or {}).get("base_dir") if info.context else None
    path = Path(value).expanduser()
    if not path.is_absolute() and base is not None:
        path = Path(base) / path
    if not path.exists():
        raise ValueError(f"file not found: {path}")
    return path.resolve()


resolve_existing.resolves_paths = True  # see `names_a_path`

# A file or folder that must exist; relative paths are taken from the recipe's folder. Its value is an
# absolute Path, which `as_input_path` (and so the pipeline's fingerprint) recognises wherever it sits.
InputPath = Annotated[Path, AfterValidator(resolve_existing)]

# Longer strings are text, not paths; checking them would only cost a `stat` each.
_MAX_PATH_CHARS = 4096


def as_input_path(value: Any) -> Optional[Path]:
    """The existing file or folder a config value names, or None.

    A `Path` value (an `InputPath` field, or any other Path-typed one) counts when it exists. So does a
    string with a `/` that exists: fields typed as plain strings (`data.corpus`, a data operator's
    `file`) hold paths too. A string naming a filesystem root (`/` as a regex or a keyword) is text, not
    an input: hashing it would read the whole disk.
    """
    if isinstance(value, Path):
        return value if value.exists() else None
    if not isinstance(value, str) or "/" not in value or len(value) >= _MAX_PATH_CHARS:
        return None
    path = Path(value)
    if not path.exists():
        return None
    resolved = path.resolve()
    return None if resolved == Path(resolved.anchor) else path


def names_a_path(model: type, dotted: str) -> bool:
    """Whether the field at `dotted` (e.g. `model.path`) of a config class holds a file path: a Path type,
    or a validator marked `resolves_paths`, anywhere in its annotation."""
    from pydantic import BaseModel

    annotation: object = model
    for key in dotted.split("."):
        models = [arg for arg in _type_parts(annotation) if isinstance(arg, type) and issubclass(arg, BaseModel)]
        field = next((m.model_fields[key] for m in models if key in m.model_fields), None)
        if field is None:
            return False
        annotation = (field.annotation, *field.metadata)
    return any(part is Path or getattr(getattr(part, "func", None), "resolves_paths", False)
               for part in _type_parts(annotation))


def _type_parts(annotation) -> list:
    """Every type argument and Annotated metadata item inside `annotation`, itself included."""
    import typing

    parts, stack = [], [annotation]
    while stack:
        item = stack.pop()
        parts.append(item)
        if isinstance(item, tuple):
            stack.extend(item)
            continue
        stack.extend(typing.get_args(item))
        stack.extend(getattr(item, "__metadata__", ()))
    return parts
