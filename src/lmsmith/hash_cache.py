"""Remembered file hashes, so that deciding whether a stage is up to date costs a `stat` per unchanged
file instead of a read: a local 7B base model folder is 15 GB, hashed on every `lmsmith run`.

A remembered hash is trusted only while the file's absolute path, size and mtime_ns are what they were
when it was read. Files modified in the last `RACY_SECONDS` are not remembered: a second write within
the filesystem's timestamp granularity could keep both size and mtime and go unnoticed.

The cache is one JSON file, `$LMSMITH_HASH_CACHE`, else `$XDG_CACHE_HOME/lmsmith/file-hashes.json`, else
`~/.cache/lmsmith/file-hashes.json`. It is only an optimisation: an unreadable or corrupt file is ignored
(every hash is recomputed and the file rewritten), an unwritable one is left alone, and each write
replaces the file atomically, so concurrent runs (or ranks) at worst lose each other's new entries.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Optional

CACHE_ENV = "LMSMITH_HASH_CACHE"
RACY_SECONDS = 2.0
# The oldest entries are dropped beyond this (about 14 MB, 0.15 s to load), so files hashed once long ago do
# not grow the cache forever.
MAX_ENTRIES = 100_000
_FORMAT = 1


def hash_cache_file() -> Path:
    """Where the cache lives (see the module docstring)."""
    chosen = os.environ.get(CACHE_ENV)
    if chosen:
        return Path(chosen).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "lmsmith" / "file-hashes.json"


class HashCache:
    """The cache file's entries, `absolute path → [size, mtime_ns, sha256]`, loaded once per `hash_path`
    call and written back only when something new was hashed."""

    def __init__(self, file: Path, entries: dict[str, list]):
        self.file = file
        self.entries = entries
        self.changed = False

    @classmethod
    def load(cls, file: Optional[Path] = None) -> "HashCache":
        file = hash_cache_file() if file is None else file
        return cls(file, _read_entries(file))

    def lookup(self, path: Path, stat: os.stat_result) -> Optional[str]:
        entry = self.entries.get(_key(path))
        if entry is not None and entry[0] == stat.st_size and entry[1] == stat.st_mtime_ns:
            return entry[2]
        return None

    def remember(self, path: Path, stat: os.stat_result, digest: str) -> None:
        if time.time_ns() - stat.st_mtime_ns < RACY_SECONDS * 1e9:
            return
        key = _key(path)
        self.entries.pop(key, None)  # re-inserted last: the newest entry, evicted last
        self.entries[key] = [stat.st_size, stat.st_mtime_ns, digest]
        self.changed = True

    def save(self) -> None:
        if not self.changed:
            return
        entries = self.entries
        if len(entries) > MAX_ENTRIES:
            entries = dict(list(entries.items())[-MAX_ENTRIES:])
        try:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            handle, temp = tempfile.mkstemp(prefix=f".{self.file.name}.", suffix=".tmp", dir=self.file.parent)
        except OSError:
            return  # a read-only home: hashes are recomputed next time, nothing is wrong
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as out:
                json.dump({"format": _FORMAT, "files": entries}, out, separators=(",", ":"))
            os.replace(temp, self.file)
            self.changed = False
        except OSError:
            Path(temp).unlink(missing_ok=True)


def _key(path: Path) -> str:
    return os.path.abspath(path)


def _read_entries(file: Path) -> dict[str, list]:
    """The well-formed entries of the cache file; none when it is missing, unreadable or corrupt."""
    try:
        payload = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    if not isinstance(payload, dict) or payload.get("format") != _FORMAT or not isinstance(payload.get("files"), dict):
        return {}
    return {
        path: entry for path, entry in payload["files"].items()
        if isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], int)
        and isinstance(entry[1], int) and isinstance(entry[2], str)
    }
