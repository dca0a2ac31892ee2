"""Eval tasks declared in YAML, and the readers of the public layouts their items come in.

A task file is one `TaskConfig`: name, type, dataset, format, prompt, few-shot and scoring settings.
This module holds the schema (pydantic, strict: an unknown key is an error) and turns a dataset file into
items; `lmsmith.eval.suite` runs them against models. Plain `csv` and `json` read the files, and every
bad row is reported as `file:line`.

Layouts read:
- `mc_csv`: C-Eval / CMMLU CSV with columns question, A, B, C, D (more letters allowed) and answer, in
  any letter case (`id` and `explanation` are ignored);
- `mc_jsonl`: `{"question", "choices": [...] or "A".."D": ..., "answer": letter or index}`;
- `alpaca`: `{"instruction", "input", "output"}`; `sharegpt`: `{"conversations": [{"from", "value"}]}`;
  `messages`: lmsmith's own `{"messages": [{"role", "content"}...]}` (the last turn is the reference).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from pydantic import Field, ValidationError, model_validator

from lmsmith.errors import UserError
from lmsmith.jsonl import iter_jsonl
from lmsmith.paths import InputPath
from lmsmith.schema import StrictModel, read_yaml_mapping

MC_PROMPT = "{question}\n{options}\n答案："
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}


class TaskConfig(StrictModel):
    """One eval task: where its items come from, how they are asked, and how answers are scored."""

    name: str = Field(..., description="Task name in results and tables.")
    type: Literal["multiple_choice", "generate"] = Field(..., description="multiple_choice: options scored by "
                                                          "log-likelihood and/or by generation; generate: free answers "
                                                          "against references.")
    dataset: InputPath = Field(..., description="The items' file (relative paths: from the task file's folder).")
    format: Literal["auto", "mc_csv", "mc_jsonl", "alpaca", "sharegpt", "messages"] = Field(
        "auto", description="auto: from the suffix (.csv: mc_csv) and the first record's keys.")
    prompt: str = Field(MC_PROMPT, description="multiple_choice: the question's template; {question} and "
                        "{options} (one 'A. text' line each) are filled in.")
    scoring: list[Literal["loglikelihood", "generate"]] = Field(
        ["loglikelihood"], description="multiple_choice: how options are chosen (both may be listed).")
    circular: bool = Field(False, description="multiple_choice: ask every rotation of the options; an item counts "
                           "only when it is right under all of them.")
    few_shot: int = Field(0, ge=0, description="Solved examples before each question, taken from few_shot_file "
                          "(or the first items of the dataset, which are then not scored).")
    few_shot_file: Optional[InputPath] = Field(None, description="Where the few-shot examples come from.")
    limit: Optional[int] = Field(None, ge=1, description="Score only the first N items.")
    max_new_tokens: int = Field(64, ge=1, description="Answer length cap when generating.")

    @model_validator(mode="after")
    def _fits_type(self) -> "TaskConfig":
        if self.type == "generate" and (self.circular or self.scoring != ["loglikelihood"]):
            raise ValueError("circular and scoring apply to multiple_choice tasks only")
        if not self.scoring:
            raise ValueError("scoring: name at least one of loglikelihood, generate")
        return self


@dataclass(frozen=True)
class ChoiceQuestion:
    """A multiple-choice item: the question, its options in order, the right option's index."""

    id: str
    question: str
    options: tuple[str, ...]
    gold: int


@dataclass(frozen=True)
class Reference:
    """A generation item: the conversation to answer and the reference answer."""

    id: str
    messages: tuple[dict, ...]
    reference: str


def load_task(path: str | Path) -> TaskConfig:
    """Read and validate a task YAML; relative dataset paths are taken from its folder."""
    from lmsmith.recipe import format_validation_error

    path = Path(path)
    raw = read_yaml_mapping(path, "task")
    try:
        return TaskConfig.model_validate(raw, context={"base_dir": path.parent})
    except ValidationError as exc:
        raise UserError(format_validation_error(str(path), exc)) from None


def _answer_index(value, letters: str, options: int, where: str) -> int:
    if isinstance(value, bool):
        raise UserError(f"{where}: answer {value!r} is neither a letter nor an index")
    if isinstance(value, int):
        index = value
    elif isinstance(value, str) and len(value.strip()) == 1 and value.strip().upper() in letters:
        index = letters.index(value.strip().upper())
    else:
        raise UserError(f"{where}: answer {value!r} is neither a letter nor an index")
    if not 0 <= index < options:
        raise UserError(f"{where}: answer {value!r} points past the {options} options")
    return index


def _mc_csv(path: Path) -> list[ChoiceQuestion]:
    with open(path, encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle)
        columns = {name.strip().lower(): name for name in reader.fieldnames or []}
        letters = "".join(letter for letter in "ABCDEFGH" if letter.lower() in columns)
        missing = [name for name in ("question", "answer") if name not in columns]
        if missing or len(letters) < 2:
            raise UserError(f"{path}:1: expected columns question, A, B, ... and answer; got {reader.fieldnames}")
        items = []
        for number, row in enumerate(reader, start=2):
            where = f"{path}:{number}"
            options = tuple((row[columns[letter.lower()]] or "").strip() for letter in letters)
            gold = _answer_index(row[columns["answer"]], letters, len(options), where)
            identifier = row.get(columns.get("id", ""), "") or str(number - 1)
            items.append(ChoiceQuestion(str(identifier), row[columns["question"]].strip(), options, gold))
    return items


def _mc_jsonl(path: Path) -> list[ChoiceQuestion]:
    items = []
    for number, row in iter_jsonl(path):
        where = f"{path}:{number}"
        if not isinstance(row.get("question"), str):
            raise UserError(f"{where}: 'question' must be a string")
        if isinstance(row.get("choices"), list):
            options = tuple(str(option) for option in row["choices"])
        else:
            options = tuple(str(row[letter]) for letter in "ABCDEFGH" if letter in row)
        if len(options) < 2:
            raise UserError(f"{where}: give the options as 'choices': [...] or as keys 'A', 'B', ...")
        gold = _answer_index(row.get("answer"), "ABCDEFGH"[: len(options)], len(options), where)
        items.append(ChoiceQuestion(str(row.get("id", number)), row["question"], options, gold))
    return items


def _references(path: Path, layout: str) -> list[Reference]:
    items = []
    for number, row in iter_jsonl(path):
        where = f"{path}:{number}"
        if layout == "alpaca":
            if not isinstance(row.get("instruction"), str) or not isinstance(row.get("output"), str):
                raise UserError(f"{where}: alpaca records need string 'instruction' and 'output'")
            question = row["instruction"] + (f"\n{row['input']}" if row.get("input") else "")
            messages, reference = ({"role": "user", "content": question},), row["output"]
        else:
            turns = row.get("messages") if layout == "messages" else row.get("conversations")
            if not isinstance(turns, list) or len(turns) < 2:
                raise UserError(f"{where}: expected a list of at least two turns in "
                                f"'{'messages' if layout == 'messages' else 'conversations'}'")
            if layout == "sharegpt":
                try:
                    turns = [{"role": SHAREGPT_ROLES[turn["from"]], "content": turn["value"]} for turn in turns]
                except (KeyError, TypeError):
                    raise UserError(f"{where}: sharegpt turns need 'from' (human/gpt/system) and 'value'") from None
            if turns[-1].get("role") != "assistant":
                raise UserError(f"{where}: the last turn must be the reference answer (role assistant / gpt)")
            messages, reference = tuple(turns[:-1]), turns[-1]["content"]
        items.append(Reference(str(row.get("id", number)), messages, reference))
    return items


def _detect(path: Path) -> str:
    if path.suffix.lower() == ".csv":
        return "mc_csv"
    for _, row in iter_jsonl(path):
        for keys, layout in ((("question",), "mc_jsonl"), (("instruction", "output"), "alpaca"),
                             (("conversations",), "sharegpt"), (("messages",), "messages")):
            if all(key in row for key in keys):
                return layout
        raise UserError(f"{path}:1: cannot tell the layout from keys {sorted(row)}; set format")
    raise UserError(f"{path}: no records")


def read_items(task: TaskConfig, path: Path | None = None) -> list:
    """The task's items (`ChoiceQuestion` or `Reference`), from `path` or the task's dataset."""
    path = Path(path or task.dataset)
    layout = task.format if task.format != "auto" else _detect(path)
    multiple_choice = layout in ("mc_csv", "mc_jsonl")
    if multiple_choice != (task.type == "multiple_choice"):
        raise UserError(f"{path}: a {layout} file does not fit a {task.type} task")
    if layout == "mc_csv":
        items = _mc_csv(path)
    elif layout == "mc_jsonl":
        items = _mc_jsonl(path)
    else:
        items = _references(path, layout)
    if not items:
        raise UserError(f"{path}: no items")
    return items
