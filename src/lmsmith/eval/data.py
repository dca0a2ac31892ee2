"""Reading the held-out splits the data stage writes, and choosing which rows to evaluate.

Plain `json`; every bad record is reported as `file:line` so the user can find it.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmsmith.errors import UserError
from lmsmith.jsonl import iter_jsonl


def read_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, record) for every non-blank line; a line that is not a JSON object is an error."""
    return list(iter_jsonl(path))


@dataclass
class Instruction:
    """A held-out chat sample: the prompt turns, the reference answer and the ground truth."""

    id: str
    task: str
    prompt: list[dict[str, str]]
    reference: str
    answer: dict[str, Any]

    @property
    def question(self) -> str:
        """The last user turn (what a person would read as the question)."""
        for message in reversed(self.prompt):
            if message["role"] == "user":
                return message["content"]
        return self.prompt[-1]["content"]

    @property
    def numeric_value(self) -> float | None:
        """The numeric ground truth, for tasks whose answer carries one (e.g. yoy: a percentage)."""
        value = self.answer.get("value")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None
        return float(value)


def _parse_instruction(path: Path, number: int, record: dict[str, Any]) -> Instruction:
    where = f"{path}:{number}"
    messages = record.get("messages")
    if not isinstance(messages, list) or len(messages) < 2:
        raise UserError(f"{where}: 'messages' must be a list of at least two turns")
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("content"), str) or "role" not in message:
            raise UserError(f"{where}: each message needs a 'role' and a string 'content'")
    if messages[-1]["role"] != "assistant":
        raise UserError(f"{where}: the last message must be the assistant's reference answer")
    answer = record.get("answer") or {}
    if not isinstance(answer, dict):
        raise UserError(f"{where}: 'answer' must be an object")
    return Instruction(
        id=str(record.get("id", number)),
        task=str(record.get("task", "default")),
        prompt=[{"role": m["role"], "content": m["content"]} for m in messages[:-1]],
        reference=messages[-1]["content"],
        answer=answer,
    )


def read_instructions(path: Path) -> list[Instruction]:
    return [_parse_instruction(Path(path), number, record) for number, record in read_jsonl(path)]


def read_documents(path: Path, limit: int | None = None) -> list[str]:
    """The `text` of the first `limit` records of a corpus split (empty texts skipped)."""
    texts = []
    for number, record in read_jsonl(path):
        text = record.get("text")
        if not isinstance(text, str):
            raise UserError(f"{path}:{number}: a corpus record needs a string 'text'")
        if text.strip():
            texts.append(text)
        if limit is not None and len(texts) >= limit:
            break
    return texts


def spread_over_tasks(rows: list[Instruction], limit: int | None) -> list[Instruction]:
    """Up to `limit` rows, taken round-robin over tasks (sorted by name), file order within a task.

    Deterministic, and every task is represented even when the split is ordered by task.
    """
    if limit is None or limit >= len(rows):
        return list(rows)
    by_task: dict[str, list[Instruction]] = defaultdict(list)
    for row in rows:
        by_task[row.task].append(row)
    queues = [by_task[task] for task in sorted(by_task)]
    chosen: list[Instruction] = []
    depth = 0
    while len(chosen) < limit:
        for queue in queues:
            if depth < len(queue) and len(chosen) < limit:
                chosen.append(queue[depth])
        depth += 1
    return chosen
