"""Streaming readers for the `lmsmith data` commands: jsonl, json, csv, parquet and folders of txt/markdown,
each optionally gzip-compressed, holding alpaca, sharegpt, messages or raw-text records.

The standard library parses json/csv/gzip; pyarrow reads parquet one row group batch at a time. Every
record comes with `where` (`file:line`, or `file:row N` for parquet) so that a malformed one can be named.
Nothing holds more than one file's current batch: a 10 GB jsonl streams in constant memory. A `.json`
file is the exception, being one JSON value: it is decoded element by element but read whole.

Record formats (auto-detected per record unless one is named):

- text:     {"text": ...}; a txt/md block or file becomes {"text": ...}
- alpaca:   {"instruction", "input"?, "output", "system"?}
- sharegpt: {"conversations": [{"from", "value"}, ...]} (multi-turn)
- messages: {"messages": [{"role", "content"}, ...]} (multi-turn)

The row keeps every other field (id, category, ...) untouched; cleaning rewrites only the text fields.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Optional

from lmsmith.errors import UserError

RecordFormat = Literal["auto", "text", "alpaca", "sharegpt", "messages"]
TextUnit = Literal["block", "file"]
SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt", ".md")


@dataclass
class RawRecord:
    """One record as read: its parsed row, or the reason it could not be parsed."""

    where: str
    row: Optional[dict[str, Any]]
    size: int
    error: Optional[str] = None
    raw: Optional[str] = None  # the unparseable text (cut to 2,000 characters), for dropped.jsonl


class ReadError(UserError):
    """A malformed record or file; the message starts with `file:line:`."""


def _base_suffix(path: Path) -> str:
    suffixes = path.suffixes
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return suffixes[-1].lower() if suffixes else ""


def is_supported(path: Path) -> bool:
    return _base_suffix(path) in SUFFIXES


def list_input_files(path: Path) -> list[tuple[Path, str]]:
    """(file, display name) for `path`, or for every supported file under the folder `path`, sorted."""
    if not path.exists():
        raise UserError(f"{path}: no such file or folder")
    if path.is_file():
        if not is_supported(path):
            raise UserError(f"{path}: unsupported file type; expected one of {', '.join(SUFFIXES)} (optionally .gz)")
        return [(path, path.name)]
    found = sorted(p for p in path.rglob("*") if p.is_file() and is_supported(p))
    if not found:
        raise UserError(f"{path}: no {', '.join(SUFFIXES)} files in this folder")
    return [(file, str(file.relative_to(path))) for file in found]


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def _jsonl(path: Path, name: str) -> Iterator[RawRecord]:
    with _open_text(path) as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{name}:{number}"
            size = len(line)
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                yield RawRecord(where, None, size, f"invalid JSON: {exc.msg} (column {exc.colno})", line[:2000])
                continue
            if not isinstance(row, dict):
                yield RawRecord(where, None, size, f"expected a JSON object, got {type(row).__name__}", line[:2000])
                continue
            yield RawRecord(where, row, size)


def _json(path: Path, name: str) -> Iterator[RawRecord]:
    """A JSON array of objects (or a single object), decoded one element at a time for line numbers."""
    with _open_text(path) as handle:
        text = handle.read()
    decoder = json.JSONDecoder()
    pos = _skip_space(text, 0)
    if pos < len(text) and text[pos] != "[":
        try:
            row, _ = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            yield RawRecord(f"{name}:{exc.lineno}", None, len(text), f"invalid JSON: {exc.msg}")
            return
        yield (RawRecord(f"{name}:1", row, len(text)) if isinstance(row, dict)
               else RawRecord(f"{name}:1", None, len(text), "expected a JSON array of objects"))
        return
    pos = _skip_space(text, pos + 1)
    line, counted_to = 1, 0
    while pos < len(text) and text[pos] != "]":
        line += text.count("\n", counted_to, pos)
        counted_to = pos
        where = f"{name}:{line}"
        try:
            row, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            # The rest of the array cannot be located reliably: report this spot and stop the file.
            yield RawRecord(where, None, len(text) - pos, f"invalid JSON: {exc.msg}")
            return
        yield (RawRecord(where, row, end - pos) if isinstance(row, dict)
               else RawRecord(where, None, end - pos, f"expected a JSON object, got {type(row).__name__}"))
        pos = _skip_space(text, end)
        if pos < len(text) and text[pos] == ",":
            pos = _skip_space(text, pos + 1)


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _csv(path: Path, name: str) -> Iterator[RawRecord]:
    with _open_text(path) as handle:
        reader = csv.DictReader(handle)
        for row in reader:
            where = f"{name}:{reader.line_num}"
            if None in row:  # more cells than header columns
                yield RawRecord(where, None, 0, f"{len(reader.fieldnames or [])} columns in the header, more in this row")
                continue
            cells = {key: value for key, value in row.items() if value not in (None, "")}
            if cells:
                yield RawRecord(where, cells, sum(len(v) for v in cells.values()))


def _parquet(path: Path, name: str, batch_rows: int = 1024) -> Iterator[RawRecord]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several unrelated types for a damaged file
        raise ReadError(f"{name}: not a readable parquet file: {exc}") from None
    number = 0
    for batch in parquet.iter_batches(batch_size=batch_rows):
        for row in batch.to_pylist():
            number += 1
            cells = {key: value for key, value in row.items() if value is not None}
            yield RawRecord(f"{name}:row {number}", cells, len(json.dumps(cells, ensure_ascii=False, default=str)))


def _text_file(path: Path, name: str, unit: TextUnit) -> Iterator[RawRecord]:
    """A txt/md file: one record per blank-line-separated block (`block`) or for the whole file."""
    with _open_text(path) as handle:
        if unit == "file":
            text = handle.read().strip()
            if text:
                yield RawRecord(f"{name}:1", {"text": text}, len(text))
            return
        block: list[str] = []
        first = 0
        for number, line in enumerate(handle, start=1):
            if line.strip():
                first = first if block else number
                block.append(line.rstrip("\r\n"))
            elif block:
                text = "\n".join(block).strip()
                yield RawRecord(f"{name}:{first}", {"text": text}, len(text))
                block = []
        if block:
            text = "\n".join(block).strip()
            yield RawRecord(f"{name}:{first}", {"text": text}, len(text))


def iter_file(path: Path, name: str, text_unit: TextUnit = "block") -> Iterator[RawRecord]:
    """The records of one file, in order; parse failures come back as records with `error` set."""
    suffix = _base_suffix(path)
    try:
        if suffix == ".jsonl":
            yield from _jsonl(path, name)
        elif suffix == ".json":
            yield from _json(path, name)
        elif suffix == ".csv":
            yield from _csv(path, name)
        elif suffix == ".parquet":
            yield from _parquet(path, name)
        elif suffix in (".txt", ".md"):
            yield from _text_file(path, name, text_unit)
        else:
            raise ReadError(f"{name}: unsupported file type {suffix!r}")
    except UnicodeDecodeError as exc:
        raise ReadError(f"{name}: not UTF-8 text (byte {exc.start}); convert it or fix the encoding") from None
    except (OSError, EOFError, csv.Error) as exc:
        raise ReadError(f"{name}: cannot read: {exc}") from None


def iter_records(path: Path, text_unit: TextUnit = "block") -> Iterator[RawRecord]:
    for file, name in list_input_files(path):
        yield from iter_file(file, name, text_unit)


# ------------------------------------------------------------------------------------------- formats

_SHAREGPT_SPEAKERS = {"human", "user", "gpt", "assistant", "model", "bot", "chatgpt", "system"}
_ROLES = {"system", "user", "assistant"}


def detect_format(row: dict[str, Any]) -> Optional[str]:
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row:
        return "alpaca"
    if "text" in row:
        return "text"
    return None


def _check_turns(row: dict[str, Any], key: str, speaker_keys: tuple[str, ...], text_keys: tuple[str, ...],
                 speakers: set[str]) -> Optional[str]:
    turns = row.get(key)
    if not isinstance(turns, list) or not turns:
        return f"'{key}' must be a non-empty list of turns"
    for index, turn in enumerate(turns):
        if not isinstance(turn, dict):
            return f"turn {index} must be an object"
        speaker = next((turn[k] for k in speaker_keys if k in turn), None)
        if not isinstance(speaker, str) or speaker.lower() not in speakers:
            return f"turn {index}: unknown speaker {speaker!r} (expected one of {', '.join(sorted(speakers))})"
        if not any(isinstance(turn.get(k), str) for k in text_keys):
            return f"turn {index}: no string '{text_keys[0]}'"
    return None


def check_record(row: dict[str, Any], fmt: RecordFormat) -> tuple[Optional[str], str]:
    """(problem or None, resolved format) for a parsed row read as `fmt`."""
    resolved = detect_format(row) if fmt == "auto" else fmt
    if resolved is None:
        return ("not a known record: expected a 'text' field, alpaca {instruction, output}, "
                "sharegpt {conversations} or {messages}"), "auto"
    if resolved == "text":
        return (None if isinstance(row.get("text"), str) else "a text record needs a string field 'text'"), resolved
    if resolved == "alpaca":
        for key in ("instruction", "output"):
            if not isinstance(row.get(key), str):
                return f"alpaca record needs a string '{key}'", resolved
        for key in ("input", "system"):
            if key in row and not isinstance(row[key], str):
                return f"alpaca field '{key}' must be a string", resolved
        return None, resolved
    if resolved == "sharegpt":
        return _check_turns(row, "conversations", ("from", "role"), ("value", "content"), _SHAREGPT_SPEAKERS), resolved
    return _check_turns(row, "messages", ("role",), ("content",), _ROLES), resolved


def text_fields(row: dict[str, Any], fmt: str) -> list[str]:
    """The texts of a checked row, in reading order."""
    if fmt == "text":
        return [row["text"]]
    if fmt == "alpaca":
        return [row[k] for k in ("system", "instruction", "input", "output") if isinstance(row.get(k), str)]
    key, text_keys = ("conversations", ("value", "content")) if fmt == "sharegpt" else ("messages", ("content",))
    return [next(turn[k] for k in text_keys if isinstance(turn.get(k), str)) for turn in row[key]]


def rewrite_fields(row: dict[str, Any], fmt: str, fn: Callable[[str], str]) -> bool:
    """Apply `fn` to every text field of a checked row in place; True when something changed."""
    changed = False

    def apply(holder: dict[str, Any], key: str) -> None:
        nonlocal changed
        new = fn(holder[key])
        changed |= new != holder[key]
        holder[key] = new

    if fmt == "text":
        apply(row, "text")
    elif fmt == "alpaca":
        for key in ("system", "instruction", "input", "output"):
            if isinstance(row.get(key), str):
                apply(row, key)
    else:
        key, text_keys = ("conversations", ("value", "content")) if fmt == "sharegpt" else ("messages", ("content",))
        for turn in row[key]:
            apply(turn, next(k for k in text_keys if isinstance(turn.get(k), str)))
    return changed


def is_empty(row: dict[str, Any], fmt: str) -> bool:
    """A text with nothing in it, or a conversation with a blank instruction, output or turn."""
    if fmt == "alpaca":
        return not row["instruction"].strip() or not row["output"].strip()
    return any(not text.strip() for text in text_fields(row, fmt))


def full_where(root: Path, where: str) -> str:
    """`name:line` (name relative to the input folder) → `path/to/name:line`."""
    return str(root / where) if root.is_dir() else str(root.parent / where)
