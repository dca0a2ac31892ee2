"""Reading the corpus and the instructions into `Document`s and `Conversation`s.

Plain `json` parses the files. Instruction lines are recognised one by one:

- alpaca:   {"instruction": ..., "input": ... (optional), "output": ..., "system": ... (optional)}
- sharegpt: {"conversations": [{"from": "human"|"gpt"|"system", "value": ...}, ...]}
- messages: {"messages": [{"role": "user"|"assistant"|"system", "content": ...}, ...]}

Any of them may also carry `id`, `task`, `group` (records sharing a group land in the same split) and
`answer` (an object holding the ground truth). A line that fits none of them is a `UserError` naming
`file:line`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmsmith.data.records import Conversation, Document
from lmsmith.datasets.finance import FinanceDataset
from lmsmith.errors import UserError
from lmsmith.jsonl import iter_jsonl

_SHAREGPT_ROLES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "model": "assistant", "bot": "assistant", "chatgpt": "assistant",
    "system": "system",
}
_ROLES = ("system", "user", "assistant")


def list_files(path: Path, suffixes: tuple[str, ...]) -> list[tuple[Path, str]]:
    """(file, display name) for `path` itself, or for every file under the folder `path` with one of
    `suffixes`, in sorted order. The display name is what record ids and `source` fields use."""
    if path.is_file():
        return [(path, path.name)]
    found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in suffixes)
    if not found:
        raise UserError(f"{path}: no {' or '.join(suffixes)} files in this folder")
    return [(file, str(file.relative_to(path))) for file in found]


# ---------------------------------------------------------------------------------------------- corpus


def _optional_str(row: dict[str, Any], key: str, where: str, default: str) -> str:
    value = row.get(key, default)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise UserError(f"{where}: field '{key}' must be a string")
    return value


def _corpus_jsonl(path: Path, name: str) -> list[Document]:
    documents = []
    for number, row in iter_jsonl(path):
        where = f"{path}:{number}"
        text = row.get("text")
        if not isinstance(text, str):
            raise UserError(f"{where}: a corpus line needs a string field 'text'")
        noise = row.get("noise", [])
        if not isinstance(noise, list) or not all(isinstance(label, str) for label in noise):
            raise UserError(f"{where}: field 'noise' must be a list of strings")
        doc_id = _optional_str(row, "id", where, f"{name}:{number}")
        documents.append(
            Document(
                id=doc_id,
                text=text,
                source=_optional_str(row, "source", where, name),
                group=_optional_str(row, "group", where, doc_id),
                noise=list(noise),
            )
        )
    return documents


def _corpus_txt(path: Path, name: str) -> list[Document]:
    """One document per blank-line-separated block; its id is `file:first line of the block`."""
    documents = []
    block: list[str] = []
    first_line = 0
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate([*lines, ""], start=1):
        if line.strip():
            first_line = first_line if block else number
            block.append(line)
        elif block:
            doc_id = f"{name}:{first_line}"
            documents.append(Document(id=doc_id, text="\n".join(block).strip(), source=name, group=doc_id))
            block = []
    return documents


def read_corpus_file(path: Path, name: str) -> list[Document]:
    return _corpus_jsonl(path, name) if path.suffix == ".jsonl" else _corpus_txt(path, name)


def embedded_documents(dataset: FinanceDataset) -> list[Document]:
    return [Document(d.id, d.text, d.source, d.group, list(d.noise)) for d in dataset.documents]


# ---------------------------------------------------------------------------------------- instructions


def _message(role: Any, content: Any, where: str, index: int) -> dict[str, str]:
    if role not in _ROLES:
        raise UserError(f"{where}: message {index}: role must be one of {', '.join(_ROLES)}, got {role!r}")
    if not isinstance(content, str):
        raise UserError(f"{where}: message {index}: content must be a string")
    return {"role": role, "content": content}


def _alpaca(row: dict[str, Any], where: str) -> list[dict[str, str]]:
    for key in ("instruction", "output"):
        if not isinstance(row.get(key), str):
            raise UserError(f"{where}: alpaca record needs a string '{key}'")
    extra = row.get("input") or ""
    if not isinstance(extra, str):
        raise UserError(f"{where}: alpaca field 'input' must be a string")
    messages = []
    if row.get("system"):
        messages.append(_message("system", row["system"], where, 0))
    prompt = row["instruction"] + (f"\n\n{extra}" if extra.strip() else "")
    messages.append({"role": "user", "content": prompt})
    messages.append({"role": "assistant", "content": row["output"]})
    return messages


def _sharegpt(row: dict[str, Any], where: str) -> list[dict[str, str]]:
    turns = row["conversations"]
    if not isinstance(turns, list):
        raise UserError(f"{where}: 'conversations' must be a list of {{from, value}} turns")
    messages = []
    for index, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise UserError(f"{where}: turn {index} must be an object with 'from' and 'value'")
        speaker = turn.get("from", turn.get("role"))
        role = _SHAREGPT_ROLES.get(str(speaker).lower()) if speaker is not None else None
        if role is None:
            raise UserError(f"{where}: turn {index}: unknown speaker {speaker!r} (use human, gpt or system)")
        messages.append(_message(role, turn.get("value", turn.get("content")), where, index))
    return messages


def _messages(row: dict[str, Any], where: str) -> list[dict[str, str]]:
    turns = row["messages"]
    if not isinstance(turns, list):
        raise UserError(f"{where}: 'messages' must be a list of {{role, content}} messages")
    messages = []
    for index, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise UserError(f"{where}: message {index} must be an object with 'role' and 'content'")
        messages.append(_message(turn.get("role"), turn.get("content"), where, index))
    return messages


def detect_format(row: dict[str, Any]) -> str | None:
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row:
        return "alpaca"
    return None


_PARSERS = {"alpaca": _alpaca, "sharegpt": _sharegpt, "messages": _messages}


def parse_instruction(row: dict[str, Any], where: str, default_id: str) -> Conversation:
    """One instruction line (any supported format) → a `Conversation`."""
    kind = detect_format(row)
    if kind is None:
        raise UserError(
            f"{where}: not an instruction record; expected alpaca {{instruction, input, output}}, "
            "sharegpt {conversations: [{from, value}]} or {messages: [{role, content}]}"
        )
    messages = _PARSERS[kind](row, where)
    if not any(m["role"] == "user" for m in messages):
        raise UserError(f"{where}: the conversation has no user turn")
    if messages[-1]["role"] != "assistant":
        raise UserError(f"{where}: the last turn must be the assistant's answer")
    answer = row.get("answer", {"text": messages[-1]["content"]})
    if not isinstance(answer, dict):
        raise UserError(f"{where}: field 'answer' must be an object")
    record_id = _optional_str(row, "id", where, default_id)
    return Conversation(
        id=record_id,
        task=_optional_str(row, "task", where, "general"),
        group=_optional_str(row, "group", where, record_id),
        messages=messages,
        answer=answer,
    )


def read_instruction_file(path: Path, name: str) -> list[Conversation]:
    return [parse_instruction(row, f"{path}:{number}", f"{name}:{number}") for number, row in iter_jsonl(path)]


def embedded_conversations(dataset: FinanceDataset) -> list[Conversation]:
    return [
        Conversation(
            id=i.id,
            task=i.task,
            group=i.group,
            messages=[dict(m) for m in i.messages],
            answer=json.loads(json.dumps(i.answer)),  # a deep copy: cleaning rewrites it
        )
        for i in dataset.instructions
    ]
