"""The two kinds of record the data stage moves around: raw-text documents and chat conversations.

Both expose the same small surface to the cleaning loop: `content()` (the text filters and the dedup
hash look at), `rewrite(fn)` (apply a mapper everywhere text lives) and `is_empty()`.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Callable

# Everything that is not a letter or a digit in any script: punctuation, symbols, whitespace.
_NOT_ALNUM = re.compile(r"[\W_]+")


def dedup_key(text: str) -> str:
    """Hash of the text with case, width, punctuation and whitespace ignored."""
    if not unicodedata.is_normalized("NFKC", text):  # usually already done by `unicode_normalize`
        text = unicodedata.normalize("NFKC", text)
    folded = _NOT_ALNUM.sub("", text.casefold())
    return hashlib.sha1(folded.encode("utf-8")).hexdigest()


@dataclass
class Document:
    """A corpus document. `noise` carries the embedded labels; `repaired` the ones an operator fixed."""

    id: str
    text: str
    source: str
    group: str
    noise: list[str] = field(default_factory=list)
    repaired: set[str] = field(default_factory=set)

    def content(self) -> str:
        return self.text

    def rewrite(self, fn: Callable[[str], str]) -> bool:
        new = fn(self.text)
        changed = new != self.text
        self.text = new
        return changed

    def is_empty(self) -> bool:
        return not self.text.strip()

    @property
    def unrepaired_noise(self) -> list[str]:
        return [label for label in self.noise if label not in self.repaired]

    def to_row(self) -> dict[str, Any]:
        return {"id": self.id, "text": self.text, "source": self.source, "noise": list(self.noise)}


@dataclass
class Conversation:
    """A chat sample; the last message is the assistant's reference answer, `answer` the ground truth."""

    id: str
    task: str
    group: str
    messages: list[dict[str, str]]
    answer: dict[str, Any]

    def content(self) -> str:
        return "\n".join(message["content"] for message in self.messages)

    def rewrite(self, fn: Callable[[str], str]) -> bool:
        """Apply `fn` to every message and to every string inside `answer`, so that the ground truth
        keeps matching the reference answer (e.g. amounts normalised in both)."""
        changed = False
        for message in self.messages:
            new = fn(message["content"])
            changed |= new != message["content"]
            message["content"] = new
        new_answer = _rewrite_strings(self.answer, fn)
        changed |= new_answer != self.answer
        self.answer = new_answer
        return changed

    def is_empty(self) -> bool:
        return any(not message["content"].strip() for message in self.messages)

    def to_row(self) -> dict[str, Any]:
        return {"id": self.id, "task": self.task, "messages": self.messages, "answer": self.answer}


def _rewrite_strings(value: Any, fn: Callable[[str], str]) -> Any:
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, dict):
        return {key: _rewrite_strings(item, fn) for key, item in value.items()}
    if isinstance(value, list):
        return [_rewrite_strings(item, fn) for item in value]
    return value
