"""Content hashes for configs and artifacts, so that a rerun can tell what changed."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from lmsmith.hash_cache import HashCache

_CHUNK = 1 << 20


def hash_json(value: Any) -> str:
    """Stable sha256 of a JSON-serialisable value (keys sorted)."""
    payload = json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def hash_file(path: Path) -> str:
    """sha256 of a file's bytes, read in full (`hash_path` avoids the read for a file it has seen)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def hash_path(path: Path) -> str:
    """Hash a file, or a directory as the sorted list of (relative path, file hash).

    A file whose path, size and mtime match an entry of the on-disk hash cache (`lmsmith.hash_cache`)
    is not read again, so checking an unchanged model folder costs a `stat` per file.
    """
    path = Path(path)
    cache = HashCache.load()
    try:
        if path.is_file():
            return _cached_file_hash(path, cache)
        entries = [
            (str(p.relative_to(path)), _cached_file_hash(p, cache))
            for p in sorted(path.rglob("*")) if p.is_file()
        ]
    finally:
        cache.save()
    return hash_json(entries)


def _cached_file_hash(path: Path, cache: HashCache) -> str:
    # stat before reading: a write during the read changes the mtime, so the entry stored under the
    # older stat will not match the file again and the next check reads it anew.
    stat = path.stat()
    digest = cache.lookup(path, stat)
    if digest is None:
        digest = hash_file(path)
        cache.remember(path, stat, digest)
    return digest
