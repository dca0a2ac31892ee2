"""The on-disk file hash cache: an unchanged file costs a `stat`, a changed one is read again, and a
broken cache file only costs the reads it would have saved."""

from __future__ import annotations

import hashlib
import json
import os
import time

import pytest

from lmsmith import hash_cache, hashing
from lmsmith.hashing import hash_json, hash_path


@pytest.fixture
def cache_file(tmp_path, monkeypatch):
    path = tmp_path / "cache" / "file-hashes.json"
    monkeypatch.setenv(hash_cache.CACHE_ENV, str(path))
    return path


@pytest.fixture
def reads(monkeypatch):
    """The files `hash_path` actually reads, in order."""
    seen = []
    real = hashing.hash_file

    def counting(path):
        seen.append(path.name)
        return real(path)

    monkeypatch.setattr(hashing, "hash_file", counting)
    return seen


def _write_old(path, data: bytes, age_s: float = 60.0):
    """Write `data` with an mtime `age_s` in the past, out of reach of the recently-modified rule."""
    path.write_bytes(data)
    past = time.time_ns() - int(age_s * 1e9)
    os.utime(path, ns=(past, past))
    return path


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_an_unchanged_file_is_not_read_twice(tmp_path, cache_file, reads):
    weights = _write_old(tmp_path / "weights.bin", b"x" * 3000)
    assert hash_path(weights) == _sha(b"x" * 3000)
    assert hash_path(weights) == _sha(b"x" * 3000)
    assert reads == ["weights.bin"]
    assert json.loads(cache_file.read_text())["files"][str(weights)][2] == _sha(b"x" * 3000)


def test_a_folder_hash_keeps_its_meaning_and_is_served_from_the_cache(tmp_path, cache_file, reads):
    model = tmp_path / "model"
    (model / "sub").mkdir(parents=True)
    files = {"config.json": b"{}", "model.safetensors": b"w" * 500, "sub/tokenizer.json": b"t"}
    for rel, data in files.items():
        _write_old(model / rel, data)
    expected = hash_json([(rel, _sha(data)) for rel, data in sorted(files.items())])
    assert hash_path(model) == expected
    assert len(reads) == 3
    assert hash_path(model) == expected
    assert len(reads) == 3


def test_a_touched_or_resized_file_is_read_again(tmp_path, cache_file, reads):
    table = _write_old(tmp_path / "table.csv", b"a,1\n", age_s=60)
    hash_path(table)
    _write_old(table, b"a,2\n", age_s=30)  # same size, new mtime
    assert hash_path(table) == _sha(b"a,2\n")
    before = table.stat().st_mtime_ns
    table.write_bytes(b"a,20\n")  # new size, mtime put back as it was
    os.utime(table, ns=(before, before))
    assert hash_path(table) == _sha(b"a,20\n")
    assert reads == ["table.csv"] * 3


def test_a_file_modified_just_now_is_not_remembered(tmp_path, cache_file, reads):
    # A second write in the same timestamp tick could keep size and mtime: such a file is always read.
    fresh = tmp_path / "fresh.txt"
    fresh.write_bytes(b"abc")
    hash_path(fresh)
    hash_path(fresh)
    assert reads == ["fresh.txt", "fresh.txt"]
    assert not cache_file.exists()


@pytest.mark.parametrize("garbage", ["{not json", "[1, 2]", '{"format": 1, "files": {"/x": "bad"}}', "\udcff"])
def test_a_corrupt_cache_file_is_ignored_and_rewritten(tmp_path, cache_file, reads, garbage):
    cache_file.parent.mkdir(parents=True)
    cache_file.write_bytes(garbage.encode("utf-8", "surrogateescape"))
    words = _write_old(tmp_path / "words.txt", b"spam\n")
    assert hash_path(words) == _sha(b"spam\n")
    assert hash_path(words) == _sha(b"spam\n")
    assert reads == ["words.txt"]
    assert set(json.loads(cache_file.read_text())["files"]) == {str(words)}


def test_an_unwritable_cache_only_costs_the_reads(tmp_path, monkeypatch, reads):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv(hash_cache.CACHE_ENV, str(blocker / "file-hashes.json"))
    words = _write_old(tmp_path / "words.txt", b"spam\n")
    assert hash_path(words) == hash_path(words) == _sha(b"spam\n")
    assert reads == ["words.txt", "words.txt"]
    assert not list(tmp_path.glob("**/*.tmp"))


def test_the_oldest_entries_are_dropped_beyond_the_limit(tmp_path, cache_file, monkeypatch):
    monkeypatch.setattr(hash_cache, "MAX_ENTRIES", 2)
    paths = [_write_old(tmp_path / f"{name}.txt", name.encode()) for name in ("a", "b", "c")]
    for path in paths:
        hash_path(path)
    assert list(json.loads(cache_file.read_text())["files"]) == [str(paths[1]), str(paths[2])]


def test_the_cache_file_follows_xdg_cache_home_then_home(tmp_path, monkeypatch):
    monkeypatch.delenv(hash_cache.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hash_cache.hash_cache_file() == tmp_path / "xdg" / "lmsmith" / "file-hashes.json"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert hash_cache.hash_cache_file() == tmp_path / "home" / ".cache" / "lmsmith" / "file-hashes.json"
    monkeypatch.setenv(hash_cache.CACHE_ENV, str(tmp_path / "chosen.json"))
    assert hash_cache.hash_cache_file() == tmp_path / "chosen.json"
