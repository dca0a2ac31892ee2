"""Content hashes for configs and artifacts, so that a rerun can tell what changed."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20


def hash_json(value: Any) -> str:
    """Stable sha256 of a JSON-serialisable value (keys sorted)."""
    payload = json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def hash_path(path: Path) -> str:
    """Hash a file, or a directory as the sorted list of (relative path, file hash)."""
    path = Path(path)
    if path.is_file():
        return hash_file(path)
    entries = [
        (str(p.relative_to(path)), hash_file(p)) for p in sorted(path.rglob("*")) if p.is_file()
    ]
    return hash_json(entries)
