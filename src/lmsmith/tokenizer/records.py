"""Read the data stage's jsonl artifacts: corpus documents and chat conversations.

`lmsmith.jsonl` does the parsing; this module checks the shape the tokenizer and training stages rely on
and turns a malformed row into a `UserError` naming `file:line`.
"""

from __future__ import annotations

from pathlib import Path

from lmsmith.errors import UserError
from lmsmith.jsonl import iter_jsonl

Message = dict[str, str]


def read_corpus_texts(path: Path) -> list[str]:
    """The `text` of every corpus document."""
    texts = []
    for number, row in iter_jsonl(path):
        text = row.get("text")
        if not isinstance(text, str):
            raise UserError(f"{path}:{number}: corpus rows need a string field 'text'")
        texts.append(text)
    return texts


def read_conversations(path: Path) -> list[list[Message]]:
    """The `messages` of every instruction row; the last message must be the assistant's answer."""
    conversations = []
    for number, row in iter_jsonl(path):
        messages = row.get("messages")
        if not isinstance(messages, list) or not messages:
            raise UserError(f"{path}:{number}: instruction rows need a non-empty list 'messages'")
        for message in messages:
            if not (
                isinstance(message, dict)
                and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)
            ):
                raise UserError(f"{path}:{number}: every message needs string 'role' and 'content'")
        if messages[-1]["role"] != "assistant":
            raise UserError(f"{path}:{number}: the last message must have role 'assistant'")
        conversations.append([{"role": m["role"], "content": m["content"]} for m in messages])
    return conversations
