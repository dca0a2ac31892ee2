"""Entity annotation: BIO tags for companies, financial metrics, amounts and dates; CoNLL export; and
scoring against ground truth with `seqeval`.

- Companies and metrics come from gazetteers: a company list (one name a line; for the embedded
  dataset, its issuers) and the metric dictionary (`lmsmith/data/resources/metrics.yaml`: names and
  aliases, Chinese and English).
- Amounts (`12.35亿元`, `1235000000元`, `RMB 1.235 billion`) and dates (`2024年3月15日`, `2023年`,
  `FY2023`, `March 15, 2024`, `2024-03-15`) come from regular expressions.
- Overlapping matches are resolved longest first (`归母净利润` beats `净利润`).
- Tokens: every CJK character is a token, ASCII words and numbers stay whole (`FY2023`, `1.235`, `R&D`).

Python's `re` finds the spans; `seqeval` computes entity-level precision, recall and F1 (CoNLL rules:
an entity counts only when its type and both boundaries are right).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from pydantic import Field

from lmsmith.console import track
from lmsmith.data.resources import read_term_list, read_yaml, resource_path
from lmsmith.errors import UserError
from lmsmith.schema import StrictModel

TYPES = {"company": "COMPANY", "metric": "METRIC", "amount": "AMOUNT", "date": "DATE"}

_TOKEN = re.compile(r"[A-Za-z0-9]+(?:[.,'&-][A-Za-z0-9]+)*|\S")
_NUMBER = r"\d+(?:,\d{3})*(?:\.\d+)?"
_AMOUNT = re.compile(
    rf"{_NUMBER}\s?(?:万亿|亿|千万|百万|万)?元"
    rf"|RMB\s?{_NUMBER}(?:\s?(?:trillion|billion|million|thousand|bn|mn)\b)?"
    rf"|{_NUMBER}\s?(?:trillion|billion|million)\s(?:yuan|RMB)\b"
)
_MONTHS = "January|February|March|April|May|June|July|August|September|October|November|December"
_DATE = re.compile(
    rf"\d{{4}}年(?:\d{{1,2}}月(?:\d{{1,2}}日)?)?|FY\d{{4}}\b|(?:{_MONTHS})\s\d{{1,2}},\s\d{{4}}|\d{{4}}-\d{{2}}-\d{{2}}"
)


class AnnotateConfig(StrictModel):
    """Gazetteers for the annotator."""

    companies: Optional[str] = Field(None, description="Company gazetteer: one name a line (# comments).")
    metrics: Optional[str] = Field(None, description="Metric dictionary YAML; default: the shipped metrics.yaml.")
    text: str = Field("auto", description="What to tag: 'auto' (a corpus row's text, a conversation's last "
                      "user turn), or a field name.")


@dataclass(frozen=True)
class Span:
    start: int
    end: int
    type: str  # company / metric / amount / date
    text: str


def tokenize(text: str) -> list[tuple[str, int, int]]:
    """(token, start, end): CJK characters one by one, ASCII words and numbers whole."""
    return [(m.group(0), m.start(), m.end()) for m in _TOKEN.finditer(text)]


def metric_names(path: Optional[str | Path] = None) -> list[str]:
    """Every name and alias in a metric dictionary (see `resources/metrics.yaml`)."""
    source = read_yaml(path or resource_path("metrics.yaml"))
    if not isinstance(source.data, dict) or not source.data:
        raise UserError(f"{source.where()}: expected a mapping of metric keys to {{zh, en, aliases}}")
    names: list[str] = []
    for key, entry in source.data.items():
        if not isinstance(entry, dict):
            raise UserError(f"{source.where(key)}: metric '{key}' must be a mapping with zh / en / aliases")
        aliases = entry.get("aliases", [])
        if not isinstance(aliases, list):
            raise UserError(f"{source.where(key, 'aliases')}: aliases must be a list")
        for name in [entry.get("zh"), entry.get("en"), *aliases]:
            if name is not None and not isinstance(name, str):
                raise UserError(f"{source.where(key)}: metric names must be strings, got {name!r}")
            if name:
                names.append(name)
    return names


def _gazetteer_pattern(names: Iterable[str]) -> Optional[re.Pattern]:
    unique = sorted({n for n in names if n}, key=len, reverse=True)
    if not unique:
        return None
    # ASCII names must stand as whole words ("Energy" inside "Energyx" is not a match).
    parts = [rf"(?<![A-Za-z]){re.escape(n)}(?![A-Za-z])" if n.isascii() else re.escape(n) for n in unique]
    return re.compile("|".join(parts), re.IGNORECASE)


class Annotator:
    """Find entity spans and turn them into BIO tags."""

    def __init__(self, config: Optional[AnnotateConfig] = None, company_names: Sequence[str] = ()):
        self.config = config or AnnotateConfig()
        companies = list(company_names)
        if self.config.companies:
            companies += read_term_list(self.config.companies)
        self._patterns = [
            ("company", _gazetteer_pattern(companies)),
            ("metric", _gazetteer_pattern(metric_names(self.config.metrics))),
            ("amount", _AMOUNT),
            ("date", _DATE),
        ]

    def spans(self, text: str) -> list[Span]:
        """Non-overlapping entity spans, longest match first, in text order."""
        found = [
            Span(m.start(), m.end(), kind, m.group(0))
            for kind, pattern in self._patterns if pattern is not None
            for m in pattern.finditer(text)
        ]
        chosen: list[Span] = []
        taken = [False] * (len(text) + 1)
        for span in sorted(found, key=lambda s: (-(s.end - s.start), s.start)):
            if not any(taken[span.start:span.end]):
                chosen.append(span)
                for i in range(span.start, span.end):
                    taken[i] = True
        return sorted(chosen, key=lambda s: s.start)

    def tag(self, text: str) -> tuple[list[str], list[str]]:
        """(tokens, BIO tags) of `text`."""
        return bio_tags(text, self.spans(text))


def bio_tags(text: str, spans: Sequence[Span]) -> tuple[list[str], list[str]]:
    """Tokens of `text` and their BIO tags for `spans` (a token overlapping a span belongs to it)."""
    tokens = tokenize(text)
    tags = ["O"] * len(tokens)
    for span in spans:
        inside = [i for i, (_, start, end) in enumerate(tokens) if start < span.end and end > span.start]
        for position, index in enumerate(inside):
            tags[index] = ("B-" if position == 0 else "I-") + TYPES[span.type]
    return [token for token, _, _ in tokens], tags


def text_to_tag(row: dict[str, Any], field: str = "auto") -> str:
    """The text of a row the annotator tags (see `AnnotateConfig.text`)."""
    if field != "auto":
        value = row.get(field)
        if not isinstance(value, str):
            raise UserError(f"annotate.text: record {row.get('id')} has no string field '{field}'")
        return value
    if isinstance(row.get("text"), str):
        return row["text"]
    users = [m.get("content", "") for m in row.get("messages", []) if isinstance(m, dict) and m.get("role") == "user"]
    if not users:
        raise UserError(f"annotate: record {row.get('id')} has neither 'text' nor a user message")
    return str(users[-1])


def gold_spans(text: str, entities: Sequence[dict[str, Any]], where: str) -> tuple[list[Span], int]:
    """Locate ground-truth entities (`[{type, text}]`, in text order) in `text`; returns (spans, how
    many could not be found)."""
    spans, cursor, missing = [], 0, 0
    for index, entity in enumerate(entities):
        if not isinstance(entity, dict) or entity.get("type") not in TYPES or not isinstance(entity.get("text"), str):
            raise UserError(f"{where}: answer.entities[{index}] must be {{type: company|metric|amount|date, text}}")
        start = text.find(entity["text"], cursor)
        if start < 0:
            start = text.find(entity["text"])
        if start < 0:
            missing += 1
            continue
        spans.append(Span(start, start + len(entity["text"]), entity["type"], entity["text"]))
        cursor = start + len(entity["text"])
    return spans, missing


def annotate_rows(rows: Sequence[dict[str, Any]], annotator: Annotator) -> list[dict[str, Any]]:
    """`{"id", "tokens", "tags", "entities"}` for every row."""
    annotated = []
    with track("annotating", total=len(rows)) as bar:
        for row in rows:
            text = text_to_tag(row, annotator.config.text)
            spans = annotator.spans(text)
            tokens, tags = bio_tags(text, spans)
            annotated.append({
                "id": row.get("id"),
                "tokens": tokens,
                "tags": tags,
                "entities": [{"type": s.type, "text": s.text, "start": s.start, "end": s.end} for s in spans],
            })
            bar.advance()
    return annotated


def write_conll(path: Path, annotated: Sequence[dict[str, Any]]) -> int:
    """CoNLL: `token<TAB>tag` a line, a blank line between records, `# id = ...` before each; returns the
    number of records written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as handle:
        for record in annotated:
            handle.write(f"# id = {record['id']}\n")
            for token, tag in zip(record["tokens"], record["tags"]):
                handle.write(f"{token}\t{tag}\n")
            handle.write("\n")
    return len(annotated)


def read_conll(path: Path) -> list[dict[str, Any]]:
    """The records of a CoNLL file written by `write_conll` (a malformed line names `file:line`)."""
    records: list[dict[str, Any]] = []
    current: Optional[dict[str, Any]] = None
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.startswith("# id = "):
            current = {"id": line[len("# id = "):], "tokens": [], "tags": []}
            records.append(current)
        elif line.strip():
            parts = line.split("\t")
            if current is None or len(parts) != 2:
                raise UserError(f"{path}:{number}: expected 'token<TAB>tag' after a '# id = ' line")
            current["tokens"].append(parts[0])
            current["tags"].append(parts[1])
    return records


def score(rows: Sequence[dict[str, Any]], annotator: Annotator) -> dict[str, Any]:
    """Entity precision / recall / F1 (`lmsmith.eval.labels.entity_scores`: seqeval, CoNLL rules) on the
    rows whose `answer.entities` hold the ground truth; per type and overall (micro)."""
    from lmsmith.eval.labels import entity_scores

    gold_tags, predicted_tags = [], []
    missing = scored = 0
    for row in rows:
        entities = (row.get("answer") or {}).get("entities")
        if not isinstance(entities, list):
            continue
        text = text_to_tag(row, annotator.config.text)
        spans, lost = gold_spans(text, entities, f"record {row.get('id')}")
        missing += lost
        _, gold = bio_tags(text, spans)
        _, predicted = annotator.tag(text)
        gold_tags.append(gold)
        predicted_tags.append(predicted)
        scored += 1
    if not scored:
        raise UserError("annotate: no record carries ground truth in answer.entities to score against")
    scores = entity_scores(gold_tags, predicted_tags)
    return {
        "records": scored,
        "gold_entities_not_found_in_text": missing,
        "precision": scores["precision"],
        "recall": scores["recall"],
        "f1": scores["f1"],
        "per_type": {name: value for name, value in scores["per_type"].items() if name in TYPES.values()},
    }


def embedded_company_names(seed: int = 0, companies: int = 60, years: int = 5) -> list[str]:
    """The issuers of the embedded finance dataset (Chinese and English names): its company gazetteer."""
    from lmsmith.datasets.finance import generate

    dataset = generate(seed, companies, years)
    return [name for c in dataset.companies for name in (c.name, c.name_en) if name]
