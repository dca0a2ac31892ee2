"""The data pipeline's readers: jsonl, json, csv, parquet and folders of txt/markdown,
each optionally gzip-compressed, holding alpaca, sharegpt, messages or raw-text records.

The standard library parses json/csv/gzip; pyarrow reads parquet one row group batch at a time. Every
record comes with `where` (`file:line`, or `file:row N` for parquet) so that a malformed one can be named.
Nothing holds more than one file's current batch: a 10 GB jsonl streams in constant memory. A `.json`
file is the exception, being one JSON value: it is decoded element by element but read whole.

What a row may hold, and the checks on it, are `lmsmith.data.record`'s.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from pathlib import Path
from typing import Iterator, Literal

from lmsmith.data.record import Record
from lmsmith.errors import UserError

TextUnit = Literal["block", "file"]
SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt", ".md")


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


def _jsonl(path: Path, name: str) -> Iterator[Record]:
    with _open_text(path) as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{name}:{number}"
            size = len(line)
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                yield Record(where, None, size, f"invalid JSON: {exc.msg} (column {exc.colno})", line[:2000])
                continue
            if not isinstance(row, dict):
                yield Record(where, None, size, f"expected a JSON object, got {type(row).__name__}", line[:2000])
                continue
            yield Record(where, row, size)


def _json(path: Path, name: str) -> Iterator[Record]:
    """A JSON array of objects (or a single object), decoded one element at a time for line numbers."""
    with _open_text(path) as handle:
        text = handle.read()
    decoder = json.JSONDecoder()
    pos = _skip_space(text, 0)
    if pos < len(text) and text[pos] != "[":
        try:
            row, _ = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            yield Record(f"{name}:{exc.lineno}", None, len(text), f"invalid JSON: {exc.msg}")
            return
        yield (Record(f"{name}:1", row, len(text)) if isinstance(row, dict)
               else Record(f"{name}:1", None, len(text), "expected a JSON array of objects"))
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
            yield Record(where, None, len(text) - pos, f"invalid JSON: {exc.msg}")
            return
        yield (Record(where, row, end - pos) if isinstance(row, dict)
               else Record(where, None, end - pos, f"expected a JSON object, got {type(row).__name__}"))
        pos = _skip_space(text, end)
        if pos < len(text) and text[pos] == ",":
            pos = _skip_space(text, pos + 1)


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _csv(path: Path, name: str) -> Iterator[Record]:
    with _open_text(path) as handle:
        reader = csv.DictReader(handle)
        for row in reader:
            where = f"{name}:{reader.line_num}"
            if None in row:  # more cells than header columns
                yield Record(where, None, 0, f"{len(reader.fieldnames or [])} columns in the header, more in this row")
                continue
            cells = {key: value for key, value in row.items() if value not in (None, "")}
            if cells:
                yield Record(where, cells, sum(len(v) for v in cells.values()))


def _parquet(path: Path, name: str, batch_rows: int = 1024) -> Iterator[Record]:
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
            yield Record(f"{name}:row {number}", cells, len(json.dumps(cells, ensure_ascii=False, default=str)))


def _text_file(path: Path, name: str, unit: TextUnit) -> Iterator[Record]:
    """A txt/md file: one record per blank-line-separated block (`block`) or for the whole file."""
    with _open_text(path) as handle:
        if unit == "file":
            text = handle.read().strip()
            if text:
                yield Record(f"{name}:1", {"text": text}, len(text))
            return
        block: list[str] = []
        first = 0
        for number, line in enumerate(handle, start=1):
            if line.strip():
                first = first if block else number
                block.append(line.rstrip("\r\n"))
            elif block:
                text = "\n".join(block).strip()
                yield Record(f"{name}:{first}", {"text": text}, len(text))
                block = []
        if block:
            text = "\n".join(block).strip()
            yield Record(f"{name}:{first}", {"text": text}, len(text))


def iter_file(path: Path, name: str, text_unit: TextUnit = "block") -> Iterator[Record]:
    """The records of one file, in order; parse failures come back as records with `error` set."""
    suffix = _base_suffix(path)
    try:
        if suffix == ".jsonl":
            records = _jsonl(path, name)
        elif suffix == ".json":
            records = _json(path, name)
        elif suffix == ".csv":
            records = _csv(path, name)
        elif suffix == ".parquet":
            records = _parquet(path, name)
        elif suffix in (".txt", ".md"):
            records = _text_file(path, name, text_unit)
        else:
            raise ReadError(f"{name}: unsupported file type {suffix!r}")
        for record in records:
            record.source = name
            yield record
    except UnicodeDecodeError as exc:
        raise ReadError(f"{name}: not UTF-8 text (byte {exc.start}); convert it or fix the encoding") from None
    except (OSError, EOFError, csv.Error) as exc:
        raise ReadError(f"{name}: cannot read: {exc}") from None


def iter_records(path: Path, text_unit: TextUnit = "block") -> Iterator[Record]:
    for file, name in list_input_files(path):
        yield from iter_file(file, name, text_unit)


def full_where(root: Path, where: str) -> str:
    """`name:line` (name relative to the input folder) → `path/to/name:line`."""
    return str(root / where) if root.is_dir() else str(root.parent / where)
