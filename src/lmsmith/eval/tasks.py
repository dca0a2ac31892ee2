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
  `messages`: lmsmith's own `{"messages": [{"role", "content"}...]}` (the last turn is the reference);
  for `numeric` tasks the truth is the record's `answer.value` (lmsmith's sft records), else a number
  read from the reference text (`12.5亿元` is 1.25e9);
- `text_label`: a CSV with columns text and label, or JSONL `{"text", "label"}` (classification);
- `documents`: JSONL `{"text"}` or a .txt file, one document per blank-line-separated block (perplexity);
- `conll`: one `token tag` pair a line (BIO tags last), a blank line between sentences (extraction);
- `qrels`: JSONL `{"query", "relevant": [document ids]}` (retrieval against the task's `kb`).
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
CLASSIFY_PROMPT = "{text}\n类别（{labels}）："
EXTRACT_PROMPT = "从下面的文本中抽取实体，类型为{types}。每行写一个，格式为“类型：实体”；没有实体就写“无”。\n{text}"
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}


class TaskConfig(StrictModel):
    """One eval task: where its items come from, how they are asked, and how answers are scored."""

    name: str = Field(..., description="Task name in results and tables.")
    type: Literal["multiple_choice", "generate", "numeric", "classification", "extraction", "perplexity",
                  "retrieval"] = Field(
        ..., description="multiple_choice: options scored by log-likelihood and/or by generation; generate: free "
        "answers against references; numeric: the answer's number against the truth within rel_tol; "
        "classification: a label per text (by log-likelihood or generation); extraction: entities listed by "
        "the model against BIO-tagged text; perplexity: on documents; retrieval: the kb's ranking of each "
        "query against its relevant documents (recall@k, MRR, nDCG@k; the model is not asked).")
    dataset: InputPath = Field(..., description="The items' file (relative paths: from the task file's folder).")
    format: Literal["auto", "mc_csv", "mc_jsonl", "alpaca", "sharegpt", "messages", "text_label", "documents",
                    "conll", "qrels"] = Field(
        "auto", description="auto: from the suffix (.csv: mc_csv) and the first record's keys.")
    prompt: Optional[str] = Field(None, description="multiple_choice: the question's template with {question} and "
                                  "{options} (one 'A. text' line each), default '{question}\\n{options}\\n答案：'; "
                                  "classification: with {text} and {labels}, default '{text}\\n类别（{labels}）：'; "
                                  "extraction: with {text} and {types} (the answer lists 'TYPE：entity' lines, or JSON {\"entities\": "
                                  "[{\"type\", \"text\"}]}); {labels} and {types} may be left out.")
    scoring: list[Literal["loglikelihood", "generate"]] = Field(
        ["loglikelihood"], description="multiple_choice, classification: how the answer is chosen (both may be "
        "listed).")
    labels: Optional[list[str]] = Field(None, description="classification: the label set (default: those in the data).")
    rel_tol: float = Field(0.01, ge=0, description="numeric: relative tolerance of a right answer.")
    target_delimiter: str = Field(
        " ", description="multiple_choice by log-likelihood: what joins the prompt and the option letter (lm-eval's "
        "default ' '). A tokenizer that has ' B' as one token but ' A' as two favours B; '\\n' gives every letter "
        "the same shape in byte-level BPE (the scores flag uneven letters as ll_uneven_letters).")
    circular: bool = Field(False, description="multiple_choice: ask every rotation of the options; an item counts "
                           "only when it is right under all of them.")
    few_shot: int = Field(0, ge=0, description="Solved examples before each question, taken from few_shot_file "
                          "(or the first items of the dataset, which are then not scored).")
    few_shot_file: Optional[InputPath] = Field(None, description="Where the few-shot examples come from.")
    limit: Optional[int] = Field(None, ge=1, description="Score only the first N items.")
    max_new_tokens: int = Field(64, ge=1, description="Answer length cap when generating.")
    kb: Optional[InputPath] = Field(
        None, description="A knowledge base (`lmsmith rag build`): generate and numeric tasks answer with its "
        "chunks in the prompt, as `lmsmith serve --kb` does; retrieval tasks rank it.")
    kb_top_k: int = Field(4, ge=1, le=50, description="generate/numeric with a kb: chunks in the prompt.")
    retrieval_k: int = Field(10, ge=1, le=1000, description="retrieval: the cut-off k of recall@k and nDCG@k.")

    @model_validator(mode="after")
    def _fits_type(self) -> "TaskConfig":
        if self.type != "multiple_choice" and (self.circular or self.few_shot or self.target_delimiter != " "):
            raise ValueError("circular, few_shot and target_delimiter apply to multiple_choice tasks only")
        if self.type not in ("multiple_choice", "classification") and self.scoring != ["loglikelihood"]:
            raise ValueError("scoring applies to multiple_choice and classification tasks only")
        if self.prompt is not None and self.type not in ("multiple_choice", "classification", "extraction"):
            raise ValueError("prompt applies to multiple_choice and classification tasks (others use the records' "
                             "own turns)")
        if self.labels is not None and self.type != "classification":
            raise ValueError("labels apply to classification tasks only")
        if not self.scoring:
            raise ValueError("scoring: name at least one of loglikelihood, generate")
        if self.kb is not None and self.type not in ("generate", "numeric", "retrieval"):
            raise ValueError("kb applies to generate, numeric and retrieval tasks only")
        if self.type == "retrieval" and self.kb is None:
            raise ValueError("kb: a retrieval task ranks a knowledge base; name its folder")
        if self.prompt is not None:
            import string

            # A template may name the labels or entity types in its own words instead of {labels}/{types}.
            needed, optional = {"multiple_choice": ({"question", "options"}, set()),
                                "classification": ({"text"}, {"labels"}),
                                "extraction": ({"text"}, {"types"})}[self.type]
            try:
                fields = {name for _, name, _, _ in string.Formatter().parse(self.prompt) if name is not None}
            except ValueError as exc:
                raise ValueError(f"prompt: {exc} (write literal braces as {{{{ and }}}})") from None
            if not needed <= fields <= needed | optional:
                wanted = " and ".join("{" + name + "}" for name in sorted(needed))
                if optional:
                    wanted += ", and may hold " + " and ".join("{" + name + "}" for name in sorted(optional))
                raise ValueError(f"prompt: a {self.type} template takes {wanted}; it has "
                                 f"{', '.join('{' + name + '}' for name in sorted(fields)) or 'none'}")
        return self

    @property
    def template(self) -> str:
        return self.prompt or {"classification": CLASSIFY_PROMPT, "extraction": EXTRACT_PROMPT}.get(self.type, MC_PROMPT)


@dataclass(frozen=True)
class ChoiceQuestion:
    """A multiple-choice item: the question, its options in order, the right option's index."""

    id: str
    question: str
    options: tuple[str, ...]
    gold: int


@dataclass(frozen=True)
class Reference:
    """A generation item: the conversation to answer, the reference answer and, when the record carries
    one (`answer.value`), its numeric truth."""

    id: str
    messages: tuple[dict, ...]
    reference: str
    value: float | None = None


@dataclass(frozen=True)
class TaggedSentence:
    """An extraction item: tokens and their gold BIO tags."""

    id: str
    tokens: tuple[str, ...]
    tags: tuple[str, ...]


@dataclass(frozen=True)
class RelevanceJudgement:
    """A retrieval item: the query and the ids of the documents that answer it."""

    id: str
    query: str
    relevant: tuple[str, ...]


@dataclass(frozen=True)
class LabeledText:
    """A classification item."""

    id: str
    text: str
    label: str


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
        value = (row.get("answer") or {}).get("value") if isinstance(row.get("answer"), dict) else None
        value = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
        items.append(Reference(str(row.get("id", number)), messages, reference, value))
    return items


def _text_labels(path: Path) -> list[LabeledText]:
    if path.suffix.lower() == ".csv":
        with open(path, encoding="utf-8-sig", newline="") as handle:
            reader = csv.DictReader(handle)
            columns = {name.strip().lower(): name for name in reader.fieldnames or []}
            if "text" not in columns or "label" not in columns:
                raise UserError(f"{path}:1: expected columns text and label; got {reader.fieldnames}")
            rows = [(number, row[columns["text"]], row[columns["label"]]) for number, row in enumerate(reader, start=2)]
    else:
        rows = [(number, row.get("text"), row.get("label")) for number, row in iter_jsonl(path)]
    items = []
    for number, text, label in rows:
        if not isinstance(text, str) or not text.strip() or not isinstance(label, str) or not label.strip():
            raise UserError(f"{path}:{number}: a record needs a non-empty text and label")
        items.append(LabeledText(str(number), text.strip(), label.strip()))
    return items


def _conll(path: Path) -> list[TaggedSentence]:
    sentences, tokens, tags, start = [], [], [], 1
    lines = path.read_text(encoding="utf-8").splitlines() + [""]
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            if tokens:
                sentences.append(TaggedSentence(str(start), tuple(tokens), tuple(tags)))
            tokens, tags, start = [], [], number + 1
            continue
        parts = line.split()
        tag = parts[-1]
        if len(parts) < 2 or not (tag == "O" or tag[:2] in ("B-", "I-")):
            raise UserError(f"{path}:{number}: expected 'token tag' with a BIO tag (O, B-TYPE, I-TYPE), got {line!r}")
        tokens.append(parts[0])
        tags.append(tag)
    return sentences


def _documents(path: Path) -> list[str]:
    if path.suffix.lower() == ".txt":
        blocks = path.read_text(encoding="utf-8").split("\n\n")
        return [block.strip() for block in blocks if block.strip()]
    documents = []
    for number, row in iter_jsonl(path):
        if not isinstance(row.get("text"), str):
            raise UserError(f"{path}:{number}: a document record needs a string 'text'")
        if row["text"].strip():
            documents.append(row["text"])
    return documents


def _detect(path: Path) -> str:
    if path.suffix.lower() == ".txt":
        return "documents"
    if path.suffix.lower() in (".conll", ".bio", ".tsv"):
        return "conll"
    if path.suffix.lower() == ".csv":
        with open(path, encoding="utf-8-sig", newline="") as handle:
            header = {name.strip().lower() for name in next(csv.reader(handle), [])}
        return "text_label" if {"text", "label"} <= header else "mc_csv"
    for _, row in iter_jsonl(path):
        for keys, layout in ((("question",), "mc_jsonl"), (("instruction", "output"), "alpaca"),
                             (("conversations",), "sharegpt"), (("messages",), "messages"),
                             (("text", "label"), "text_label"), (("text",), "documents"),
                             (("query", "relevant"), "qrels")):
            if all(key in row for key in keys):
                return layout
        raise UserError(f"{path}:1: cannot tell the layout from keys {sorted(row)}; set format")
    raise UserError(f"{path}: no records")


LAYOUTS = {
    "multiple_choice": ("mc_csv", "mc_jsonl"),
    "generate": ("alpaca", "sharegpt", "messages"),
    "numeric": ("alpaca", "sharegpt", "messages"),
    "classification": ("text_label",),
    "extraction": ("conll",),
    "perplexity": ("documents",),
    "retrieval": ("qrels",),
}


def _qrels(path: Path) -> list[RelevanceJudgement]:
    items = []
    for number, row in iter_jsonl(path):
        relevant = row.get("relevant")
        if not isinstance(row.get("query"), str) or not row["query"].strip():
            raise UserError(f"{path}:{number}: 'query' must be a non-empty string")
        if not isinstance(relevant, list) or not relevant or not all(isinstance(doc, str) for doc in relevant):
            raise UserError(f"{path}:{number}: 'relevant' must be a non-empty list of document ids")
        items.append(RelevanceJudgement(str(row.get("id", number)), row["query"], tuple(relevant)))
    return items


def read_items(task: TaskConfig, path: Path | None = None) -> list:
    """The task's items (`ChoiceQuestion`, `Reference`, `LabeledText` or document strings), from `path` or
    the task's dataset."""
    path = Path(path or task.dataset)
    layout = task.format if task.format != "auto" else _detect(path)
    if layout not in LAYOUTS[task.type]:
        raise UserError(f"{path}: a {layout} file does not fit a {task.type} task (it reads "
                        f"{', '.join(LAYOUTS[task.type])})")
    if layout == "mc_csv":
        items = _mc_csv(path)
    elif layout == "mc_jsonl":
        items = _mc_jsonl(path)
    elif layout == "text_label":
        items = _text_labels(path)
    elif layout == "documents":
        items = _documents(path)
    elif layout == "conll":
        items = _conll(path)
    elif layout == "qrels":
        items = _qrels(path)
    else:
        items = _references(path, layout)
    if not items:
        raise UserError(f"{path}: no items")
    return items
