"""Documents into chunks: token windows that end at sentence ends (Chinese punctuation included), never
across a markdown/html section when splitting by headings. Each chunk keeps its document, its character
offsets in the document's text and its heading path. Token counts come from the embedding model's own
tokenizer (HF `tokenizers`), so a chunk fits what the model reads.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from lmsmith.rag.ingest import KBDocument

# A sentence ends after 。！？；!?; (and any closing quotes or brackets), after an English period followed by
# white space (not the point of 12.5), or at a line break.
_SENTENCE = re.compile(r".*?(?:[。！？；!?;]+[\"'”’」』）)]*|\.(?=\s)|\n+|$)", re.S)
_HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t#]*$", re.M)


@dataclass
class Chunk:
    doc_id: str
    source: str
    start: int  # character offsets into the document's text
    end: int
    text: str
    title: str = ""
    title_path: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        return {"doc_id": self.doc_id, "source": self.source, "start": self.start, "end": self.end,
                "title": self.title, "title_path": self.title_path, "metadata": self.metadata, "text": self.text}


def sections(text: str) -> list[tuple[list[str], int, int]]:
    """(heading path, start, end) of each markdown section; text before the first heading has no path."""
    found: list[tuple[list[str], int, int]] = []
    path: list[tuple[int, str]] = []
    start = 0
    for match in _HEADING.finditer(text):
        if match.start() > start:
            found.append(([title for _, title in path], start, match.start()))
        level = len(match.group(1))
        path = [(lvl, title) for lvl, title in path if lvl < level] + [(level, match.group(2).strip())]
        start = match.start()
    found.append(([title for _, title in path], start, len(text)))
    # A heading with nothing under it before the next heading is not a section of its own: its title is
    # in the next section's path already.
    return [(titles, a, b) for titles, a, b in found if _HEADING.sub("", text[a:b]).strip()]


def sentence_spans(text: str, start: int, end: int) -> list[tuple[int, int]]:
    spans = []
    for match in _SENTENCE.finditer(text, start, end):
        if match.end() > match.start() and text[match.start():match.end()].strip():
            spans.append((match.start(), match.end()))
        if match.end() >= end:
            break
    return spans


class Chunker:
    """`chunk(document)`: its chunks, each at most `chunk_tokens` of the tokenizer's tokens, the next one
    starting with whole sentences of the previous totalling at most `overlap` tokens."""

    def __init__(self, tokenizer: Any, chunk_tokens: int, overlap: int, by_headings: bool):
        if overlap >= chunk_tokens:
            raise ValueError(f"overlap_tokens ({overlap}) must be smaller than chunk_tokens ({chunk_tokens})")
        self.tokenizer = tokenizer
        self.chunk_tokens = chunk_tokens
        self.overlap = overlap
        self.by_headings = by_headings

    def chunk(self, document: KBDocument) -> list[Chunk]:
        text = document.text
        parts = sections(text) if self.by_headings and document.has_headings else [([], 0, len(text))]
        chunks = []
        for titles, start, end in parts:
            for a, b in self._windows(text, sentence_spans(text, start, end)):
                while a < b and text[a].isspace():
                    a += 1
                while b > a and text[b - 1].isspace():
                    b -= 1
                if a < b:
                    chunks.append(Chunk(document.id, document.source, a, b, text[a:b], document.title, titles,
                                        document.metadata))
        return chunks

    def _windows(self, text: str, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
        if not spans:
            return []
        counts = [len(ids) for ids in self.tokenizer([text[a:b] for a, b in spans], add_special_tokens=False)[
            "input_ids"]]
        windows: list[tuple[int, int]] = []
        current: list[int] = []  # indices of the sentences in the window being filled
        size = 0
        for index, count in enumerate(counts):
            if count > self.chunk_tokens:  # one sentence longer than a chunk: cut it by tokens
                if current:
                    windows.append((spans[current[0]][0], spans[current[-1]][1]))
                    current, size = [], 0
                windows += self._split_long(text, *spans[index])
                continue
            if current and size + count > self.chunk_tokens:
                windows.append((spans[current[0]][0], spans[current[-1]][1]))
                kept: list[int] = []
                kept_size = 0
                for previous in reversed(current):  # whole sentences of the overlap, newest first
                    if kept_size + counts[previous] > self.overlap or kept_size + counts[previous] + count > self.chunk_tokens:
                        break
                    kept.insert(0, previous)
                    kept_size += counts[previous]
                current, size = kept, kept_size
            current.append(index)
            size += count
        if current:
            windows.append((spans[current[0]][0], spans[current[-1]][1]))
        return windows

    def _split_long(self, text: str, start: int, end: int) -> list[tuple[int, int]]:
        offsets = self.tokenizer(text[start:end], add_special_tokens=False, return_offsets_mapping=True)[
            "offset_mapping"]
        step = self.chunk_tokens - self.overlap
        windows = []
        for first in range(0, len(offsets), step):
            last = min(first + self.chunk_tokens, len(offsets)) - 1
            windows.append((start + offsets[first][0], start + offsets[last][1]))
            if last == len(offsets) - 1:
                break
        return windows
