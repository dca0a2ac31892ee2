"""Documents for a knowledge base, from the user's files: txt, md, html, jsonl, csv, pdf and docx.

Each file becomes one or more `KBDocument`s (a jsonl or csv file: one per line or row). pypdf reads PDF
text page by page, python-docx reads Word paragraphs (headings as markdown headings), lxml reads HTML
(headings as markdown headings, scripts and styles dropped). A file that cannot be read is skipped with
its reason, never silently: the caller counts read = indexed + skipped.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from lmsmith.errors import UserError
from lmsmith.jsonl import iter_jsonl

SUFFIXES = (".txt", ".md", ".markdown", ".html", ".htm", ".jsonl", ".csv", ".pdf", ".docx")
TEXT_FIELDS = ("text", "content", "body")


@dataclass
class KBDocument:
    """A document to index: `text` (markdown headings, where the format has headings, mark sections),
    its `source` file, and metadata to filter on."""

    id: str
    text: str
    source: str
    title: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    has_headings: bool = False


@dataclass
class Skipped:
    path: str
    reason: str


def collect_files(paths: list[Path]) -> list[tuple[Path, str]]:
    """(file, name) for each path: a file as given, or every readable file under a folder (name relative to it)."""
    found: list[tuple[Path, str]] = []
    for path in paths:
        if path.is_dir():
            found += [(file, str(file.relative_to(path))) for file in sorted(path.rglob("*"))
                      if file.is_file() and file.suffix.lower() in SUFFIXES]
        else:
            found.append((path, path.name))
    return found


def read_documents(paths: list[Path], on_file: Callable[[], None] = lambda: None
                   ) -> tuple[list[KBDocument], list[Skipped], int]:
    """(documents, skipped files with reasons, files read)."""
    documents: list[KBDocument] = []
    skipped: list[Skipped] = []
    files = collect_files(paths)
    for path, name in files:
        try:
            read = _READERS.get(path.suffix.lower())
            if read is None:
                raise ValueError(f"unsupported format {path.suffix or '(no suffix)'}; "
                                 f"supported: {', '.join(SUFFIXES)}")
            found = [doc for doc in read(path, name) if doc.text.strip()]
            if not found:
                raise ValueError("no text in it")
            documents += found
        except (OSError, ValueError, UnicodeDecodeError, KeyError, UserError) as exc:
            skipped.append(Skipped(str(path), str(exc) or type(exc).__name__))
        except Exception as exc:  # a broken pdf/docx raises its library's own errors
            skipped.append(Skipped(str(path), f"{type(exc).__name__}: {exc}"))
        on_file()
    return documents, skipped, len(files)


def _text(path: Path, name: str) -> list[KBDocument]:
    return [KBDocument(name, path.read_text(encoding="utf-8"), name, title=path.stem)]


def _markdown(path: Path, name: str) -> list[KBDocument]:
    return [KBDocument(name, path.read_text(encoding="utf-8"), name, title=path.stem, has_headings=True)]


def _html(path: Path, name: str) -> list[KBDocument]:
    import lxml.html

    raw = path.read_bytes()
    try:  # UTF-8 unless it is not: then lxml follows the page's own <meta charset>
        root = lxml.html.fromstring(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):  # ValueError: an <?xml encoding=...?> declaration
        root = lxml.html.fromstring(raw)
    for bad in root.xpath("//script|//style|//noscript"):
        bad.drop_tree()
    title = (root.findtext(".//title") or path.stem).strip()
    blocks: list[str] = []
    for element in root.iter("h1", "h2", "h3", "h4", "h5", "h6", "p", "li", "td", "pre", "blockquote", "div"):
        if element.tag == "div" and any(child.tag in ("p", "div", "li", "table", "h1", "h2", "h3") for child in element):
            continue  # a container: its blocks come on their own
        text = " ".join(element.text_content().split())
        if not text:
            continue
        blocks.append("#" * int(element.tag[1]) + " " + text if element.tag[0] == "h" and element.tag[1:].isdigit()
                      else text)
    return [KBDocument(name, "\n\n".join(blocks), name, title=title, has_headings=True)]


def _pdf(path: Path, name: str) -> list[KBDocument]:
    from pypdf import PdfReader

    reader = PdfReader(str(path))
    pages = [(page.extract_text() or "").strip() for page in reader.pages]
    title = str((reader.metadata or {}).get("/Title") or path.stem)
    return [KBDocument(name, "\n\n".join(page for page in pages if page), name, title=title)]


def _docx(path: Path, name: str) -> list[KBDocument]:
    import docx

    document = docx.Document(str(path))
    blocks = []
    for paragraph in document.paragraphs:
        text = paragraph.text.strip()
        if not text:
            continue
        style = (paragraph.style.name or "") if paragraph.style is not None else ""
        level = style.removeprefix("Heading ").strip()
        blocks.append("#" * int(level) + " " + text if style.startswith("Heading ") and level.isdigit() else text)
    title = document.core_properties.title or path.stem
    return [KBDocument(name, "\n\n".join(blocks), name, title=title, has_headings=True)]


def _row_document(row: dict[str, Any], where: str, default_id: str, name: str) -> KBDocument:
    key = next((key for key in TEXT_FIELDS if isinstance(row.get(key), str)), None)
    if key is None:
        raise ValueError(f"{where}: a row needs a text field ({' or '.join(TEXT_FIELDS)})")
    metadata = row.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise ValueError(f"{where}: 'metadata' must be an object")
    extra = {k: str(v) for k, v in row.items() if k not in (key, "id", "title", "metadata") and isinstance(
        v, (str, int, float)) and not isinstance(v, bool)}
    return KBDocument(str(row.get("id") or default_id), row[key], name, title=str(row.get("title") or ""),
                      metadata={**extra, **{k: str(v) for k, v in metadata.items()}})


def _jsonl(path: Path, name: str) -> list[KBDocument]:
    return [_row_document(row, f"{path}:{number}", f"{name}:{number}", name) for number, row in iter_jsonl(path)]


def _csv(path: Path, name: str) -> list[KBDocument]:
    with path.open(encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    return [_row_document(row, f"{path}:{number}", f"{name}:{number}", name) for number, row in enumerate(rows, 2)]


_READERS: dict[str, Callable[[Path, str], list[KBDocument]]] = {
    ".txt": _text, ".md": _markdown, ".markdown": _markdown, ".html": _html, ".htm": _html, ".jsonl": _jsonl,
    ".csv": _csv, ".pdf": _pdf, ".docx": _docx,
}


def document_digest(document: KBDocument) -> str:
    import hashlib

    material = json.dumps([document.text, document.title, document.metadata], ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(material.encode("utf-8")).hexdigest()[:16]
