"""The one record type every data step reads and writes, and what can be asked of a record's row.

A `Record` is a parsed row as read (`where` names `file:line`), in one of four formats, with the kind
the pipeline treats it as (`corpus` raw text or `instructions`) and, once split, its split. Operators
rewrite the row's text fields in place, so whatever else the row carries (id, category, ...) survives.

Row formats (auto-detected per row unless one is named):

- text:     {"text": ...}; a txt/md block or file becomes {"text": ...}
- alpaca:   {"instruction", "input"?, "output", "system"?}
- sharegpt: {"conversations": [{"from", "value"}, ...]} (multi-turn)
- messages: {"messages": [{"role", "content"}, ...]} (multi-turn)

Any row may carry `id`, `group` (rows sharing one land in the same split), `source`, and (corpus)
`noise` labels or (instructions) `task` and `answer` (an object holding the ground truth, rewritten
with the messages so that they keep agreeing).

The standard library only: `hashlib` and `unicodedata` for the dedup key.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional

Kind = Literal["corpus", "instructions"]
RecordFormat = Literal["auto", "text", "alpaca", "sharegpt", "messages"]

_SHAREGPT_ROLES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "model": "assistant", "bot": "assistant", "chatgpt": "assistant",
    "system": "system",
}
_ROLES = {"system", "user", "assistant"}
# Everything that is not a letter or a digit in any script: punctuation, symbols, whitespace.
_NOT_ALNUM = re.compile(r"[\W_]+")


@dataclass
class Record:
    """One record on its way through the steps.

    `error` is set (and `row` may be None) for a row that could not be parsed or checked; such a record
    travels with the others so that drops come out in reading order whatever the executor."""

    where: str
    row: Optional[dict[str, Any]]
    size: int = 0
    error: Optional[str] = None
    raw: Optional[str] = None  # the unparseable text (cut to 2,000 characters), for dropped.jsonl
    kind: Kind = "corpus"
    fmt: str = ""
    source: str = ""  # the input it came from, as named in ids (`file.jsonl`, `synth:table.csv`)
    split: str = ""

    def value_of(self, name: str) -> Optional[str]:
        """The row's field `name` as text when it is a string or a number (what ids, groups and strata
        are), else None."""
        value = self.row.get(name) if isinstance(self.row, dict) else None
        return str(value) if isinstance(value, (str, int, float)) and not isinstance(value, bool) else None

    @property
    def id(self) -> str:
        value = self.value_of("id")
        return self.where if value is None else value

    @property
    def group(self) -> str:
        return self.group_by(("group", "id"))

    def group_by(self, fields: tuple[str, ...]) -> str:
        """What this record shares a split with: the first of `fields` it holds (records with the same
        value stay together), else where it was read (it stands alone)."""
        for name in fields:
            value = self.value_of(name)
            if value is not None:
                return value
        return self.where

    def content(self) -> str:
        """What filters judge and the dedup key hashes: the text fields joined by newlines."""
        return "\n".join(text_fields(self.row, self.fmt))


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


def kind_of_format(fmt: str) -> Kind:
    return "corpus" if fmt == "text" else "instructions"


def _check_turns(row: dict[str, Any], key: str, speaker_keys: tuple[str, ...], text_keys: tuple[str, ...],
                 speakers: set[str], require_reply: bool) -> Optional[str]:
    turns = row.get(key)
    if not isinstance(turns, list) or not turns:
        return f"'{key}' must be a non-empty list of turns"
    roles = []
    for index, turn in enumerate(turns):
        if not isinstance(turn, dict):
            return f"turn {index} must be an object"
        speaker = next((turn[k] for k in speaker_keys if k in turn), None)
        if not isinstance(speaker, str) or speaker.lower() not in speakers:
            return f"turn {index}: unknown speaker {speaker!r} (expected one of {', '.join(sorted(speakers))})"
        if not any(isinstance(turn.get(k), str) for k in text_keys):
            return f"turn {index}: no string '{text_keys[0]}'"
        roles.append(_SHAREGPT_ROLES.get(speaker.lower(), speaker.lower()))
    if require_reply:
        if "user" not in roles:
            return "the conversation has no user turn"
        if roles[-1] != "assistant":
            return "the last turn must be the assistant's answer"
    return None


def _check_metadata(row: dict[str, Any]) -> Optional[str]:
    for key in ("id", "group", "source", "task"):
        value = row.get(key)
        if value is not None and (not isinstance(value, (str, int, float)) or isinstance(value, bool)):
            return f"field '{key}' must be a string"
    noise = row.get("noise")
    if noise is not None and (not isinstance(noise, list) or not all(isinstance(label, str) for label in noise)):
        return "field 'noise' must be a list of strings"
    if "answer" in row and not isinstance(row["answer"], dict):
        return "field 'answer' must be an object"
    return None


def check_row(row: dict[str, Any], fmt: RecordFormat, kind: Optional[Kind] = None) -> tuple[Optional[str], str]:
    """(problem or None, resolved format) for a parsed row read as `fmt`.

    With `kind` the row must be of that kind: a corpus row is text whatever its other fields, and an
    instruction row a conversation that ends with the assistant's answer (what training needs)."""
    if kind == "corpus":
        if not isinstance(row.get("text"), str):
            return "a corpus line needs a string field 'text'", "text"
        return _check_metadata(row), "text"
    resolved = detect_format(row) if fmt == "auto" else fmt
    if kind == "instructions" and resolved == "text":
        resolved = None
    if resolved is None:
        what = ("an instruction record; expected alpaca {instruction, input, output}, sharegpt "
                "{conversations: [{from, value}]} or {messages: [{role, content}]}" if kind == "instructions" else
                "a known record: expected a 'text' field, alpaca {instruction, output}, sharegpt {conversations} "
                "or {messages}")
        return f"not {what}", "auto"
    problem: Optional[str] = None
    if resolved == "text":
        problem = None if isinstance(row.get("text"), str) else "a text record needs a string field 'text'"
    elif resolved == "alpaca":
        for key in ("instruction", "output"):
            if problem is None and not isinstance(row.get(key), str):
                problem = f"alpaca record needs a string '{key}'"
        for key in ("input", "system"):
            if problem is None and key in row and row[key] is not None and not isinstance(row[key], str):
                problem = f"alpaca field '{key}' must be a string"
    elif resolved == "sharegpt":
        problem = _check_turns(row, "conversations", ("from", "role"), ("value", "content"), set(_SHAREGPT_ROLES),
                               kind == "instructions")
    else:
        problem = _check_turns(row, "messages", ("role",), ("content",), _ROLES, kind == "instructions")
    return problem or _check_metadata(row), resolved


def _turns(row: dict[str, Any], fmt: str) -> tuple[str, tuple[str, ...]]:
    return ("conversations", ("value", "content")) if fmt == "sharegpt" else ("messages", ("content",))


def text_fields(row: dict[str, Any], fmt: str) -> list[str]:
    """The texts of a checked row, in reading order."""
    if fmt == "text":
        return [row["text"]]
    if fmt == "alpaca":
        return [row[k] for k in ("system", "instruction", "input", "output") if isinstance(row.get(k), str)]
    key, text_keys = _turns(row, fmt)
    return [next(turn[k] for k in text_keys if isinstance(turn.get(k), str)) for turn in row[key]]


def rewrite_fields(row: dict[str, Any], fmt: str, fn: Callable[[str], str]) -> bool:
    """Apply `fn` to every text field of a checked row in place, and to every string inside an
    instruction's `answer` (so the ground truth keeps matching the reply); True when something changed."""
    changed = False

    def apply(holder: dict[str, Any], key: str) -> None:
        nonlocal changed
        new = fn(holder[key])
        changed |= new != holder[key]
        holder[key] = new

    if fmt == "text":
        apply(row, "text")
        return changed
    if fmt == "alpaca":
        for key in ("system", "instruction", "input", "output"):
            if isinstance(row.get(key), str):
                apply(row, key)
    else:
        key, text_keys = _turns(row, fmt)
        for turn in row[key]:
            apply(turn, next(k for k in text_keys if isinstance(turn.get(k), str)))
    if isinstance(row.get("answer"), dict):
        answer = _rewrite_strings(row["answer"], fn)
        changed |= answer != row["answer"]
        row["answer"] = answer
    return changed


def _rewrite_strings(value: Any, fn: Callable[[str], str]) -> Any:
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, dict):
        return {key: _rewrite_strings(item, fn) for key, item in value.items()}
    if isinstance(value, list):
        return [_rewrite_strings(item, fn) for item in value]
    return value


def is_empty(row: dict[str, Any], fmt: str) -> bool:
    """A text with nothing in it, or a conversation with a blank instruction, output or turn."""
    if fmt == "alpaca":
        return not row["instruction"].strip() or not row["output"].strip()
    return any(not text.strip() for text in text_fields(row, fmt))


def dedup_key(text: str) -> str:
    """Hash of the text with case, width, punctuation and whitespace ignored."""
    if not unicodedata.is_normalized("NFKC", text):  # usually already done by `unicode_normalize`
        text = unicodedata.normalize("NFKC", text)
    folded = _NOT_ALNUM.sub("", text.casefold())
    return hashlib.sha1(folded.encode("utf-8")).hexdigest()


# ------------------------------------------------------------------------- the data stage's output rows


def messages_of(row: dict[str, Any], fmt: str) -> list[dict[str, str]]:
    """A checked conversation row as `[{role, content}]` (alpaca's input joins its instruction)."""
    if fmt == "alpaca":
        messages = [{"role": "system", "content": row["system"]}] if row.get("system") else []
        extra = row.get("input") or ""
        prompt = row["instruction"] + (f"\n\n{extra}" if extra.strip() else "")
        return [*messages, {"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}]
    key, text_keys = _turns(row, fmt)
    return [{"role": _SHAREGPT_ROLES.get(str(next(turn[k] for k in ("from", "role") if k in turn)).lower(), "user"),
             "content": next(turn[k] for k in text_keys if isinstance(turn.get(k), str))} for turn in row[key]]


def corpus_row(record: Record) -> dict[str, Any]:
    """`{"id", "text", "source", "noise"}`: a corpus document as the data stage writes it."""
    row = record.row or {}
    source = row.get("source")
    return {"id": record.id, "text": row["text"], "source": str(source) if source is not None else record.source,
            "noise": list(row.get("noise") or [])}


def instruction_row(record: Record) -> dict[str, Any]:
    """`{"id", "task", "messages", "answer"}`: a conversation as the data stage writes it."""
    row = record.row or {}
    messages = messages_of(row, record.fmt)
    task = row.get("task")
    answer = row["answer"] if isinstance(row.get("answer"), dict) else {"text": messages[-1]["content"]}
    return {"id": record.id, "task": str(task) if task is not None else "general", "messages": messages,
            "answer": answer}


def row_text(row: dict[str, Any]) -> str:
    """The text of an output row: a corpus row's `text`, or a conversation's messages joined by newlines."""
    text = row.get("text")
    if isinstance(text, str):
        return text
    messages = row.get("messages")
    if isinstance(messages, list):
        return "\n".join(str(m.get("content", "")) for m in messages if isinstance(m, dict))
    return ""


def row_kind(row: dict[str, Any]) -> str:
    """`corpus` for a raw-text row, `instructions` for a conversation (dropped rows say it themselves)."""
    kind = row.get("kind")
    if kind in ("corpus", "instructions"):
        return kind
    return "instructions" if "messages" in row else "corpus"
