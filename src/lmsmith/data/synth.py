"""Instruction synthesis from structured tables: company × year × metric → report paragraphs, YoY growth
questions and ratio questions (net margin = net profit / revenue, ...), each with its computed answer.

Tables are csv (the `csv` module), json (a list of objects) or jsonl, in either shape:
- wide: one row per company-year, `company, year, revenue, net_profit, ...`;
- long: one row per figure, `company, year, metric, value`.

Metric names come from `lmsmith/data/resources/metrics.yaml` (a column not listed there is named by
its column), ratios from `ratios.yaml`. Arithmetic is done in `decimal` and rounded half-up to two
decimals, and every amount is printed exactly (亿元 when it is a whole number of 0.01亿, else 万元 or
元), so each answer can be recomputed from the question's own text.

Rows come out in the data stage's sft format: `{"id", "task", "group", "messages", "answer"}`; the
group is `company:year`, so a company-year's samples stay in one split.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

from pydantic import Field

from lmsmith.console import track
from lmsmith.data.resources import YamlFile, read_yaml, resource_path
from lmsmith.errors import UserError
from lmsmith.schema import StrictModel

SynthTask = Literal["report", "yoy", "ratio"]
UNITS = {"yuan": Decimal(1), "wan": Decimal(10_000), "yi": Decimal(100_000_000)}
CENT = Decimal("0.01")


class SynthConfig(StrictModel):
    """How to read the table and what to synthesize."""

    company_field: str = Field("company", description="Column naming the company.")
    year_field: str = Field("year", description="Column holding the fiscal year (an integer).")
    unit: Literal["yuan", "wan", "yi"] = Field("yuan", description="Unit of the table's amount columns.")
    tasks: list[SynthTask] = Field(default_factory=lambda: ["report", "yoy", "ratio"], min_length=1)
    metrics: Optional[str] = Field(None, description="Metric dictionary YAML; default: the shipped metrics.yaml.")
    ratios: Optional[str] = Field(None, description="Ratio definitions YAML; default: the shipped ratios.yaml.")
    seed: int = Field(0, description="Chooses among question phrasings.")


@dataclass(frozen=True)
class MetricInfo:
    key: str
    zh: str
    kind: str  # amount / percent / per_share


@dataclass(frozen=True)
class RatioInfo:
    key: str
    zh: str
    numerator: str
    denominator: str
    percent: bool


def _mapping(source: YamlFile, what: str) -> dict[str, Any]:
    if not isinstance(source.data, dict) or not source.data:
        raise UserError(f"{source.where()}: expected a mapping of {what}")
    return source.data


def load_metrics(path: Optional[str | Path] = None) -> dict[str, MetricInfo]:
    source = read_yaml(path or resource_path("metrics.yaml"))
    metrics = {}
    for key, entry in _mapping(source, "metric keys to {zh, en, kind}").items():
        if not isinstance(entry, dict) or not isinstance(entry.get("zh"), str):
            raise UserError(f"{source.where(key)}: metric '{key}' needs a string 'zh'")
        kind = entry.get("kind", "amount")
        if kind not in ("amount", "percent", "per_share"):
            raise UserError(f"{source.where(key, 'kind')}: kind must be amount, percent or per_share, got {kind!r}")
        metrics[str(key)] = MetricInfo(str(key), entry["zh"], kind)
    return metrics


def load_ratios(path: Optional[str | Path] = None) -> dict[str, RatioInfo]:
    source = read_yaml(path or resource_path("ratios.yaml"))
    ratios = {}
    for key, entry in _mapping(source, "ratio keys to {zh, numerator, denominator, percent}").items():
        if not isinstance(entry, dict):
            raise UserError(f"{source.where(key)}: ratio '{key}' must be a mapping")
        for field in ("zh", "numerator", "denominator"):
            if not isinstance(entry.get(field), str):
                raise UserError(f"{source.where(key, field)}: ratio '{key}' needs a string '{field}'")
        ratios[str(key)] = RatioInfo(str(key), entry["zh"], entry["numerator"], entry["denominator"],
                                     bool(entry.get("percent", True)))
    return ratios


# ---------------------------------------------------------------------------------------------- tables


@dataclass
class CompanyYear:
    company: str
    year: int
    values: dict[str, Decimal]  # metric key → value (amounts in yuan)
    where: str

    @property
    def group(self) -> str:
        return f"{self.company}:{self.year}"


def _read_records(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(`file:line`, row) for a csv, json or jsonl table."""
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    if path.suffix == ".csv":
        with open(path, encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle)
            return [(f"{path}:{reader.line_num}", dict(row)) for row in reader]
    if path.suffix == ".jsonl":
        from lmsmith.jsonl import iter_jsonl

        return [(f"{path}:{number}", row) for number, row in iter_jsonl(path)]
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}") from None
        if not isinstance(data, list) or not all(isinstance(row, dict) for row in data):
            raise UserError(f"{path}:1: expected a JSON list of objects")
        return [(f"{path}[{index}]", row) for index, row in enumerate(data)]
    raise UserError(f"{path}: a table must be .csv, .json or .jsonl")


def _number(value: Any, where: str, column: str) -> Optional[Decimal]:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool):
        raise UserError(f"{where}: column '{column}' must be a number, got {value!r}")
    try:
        return Decimal(str(value).replace(",", "").strip())
    except InvalidOperation:
        raise UserError(f"{where}: column '{column}' must be a number, got {value!r}") from None


def read_table(path: str | Path, config: SynthConfig, metrics: dict[str, MetricInfo]) -> list[CompanyYear]:
    """Company-years of a wide or long table, amounts converted to yuan, sorted by company and year."""
    records = _read_records(Path(path))
    if not records:
        raise UserError(f"{path}: the table is empty")
    long_format = all("metric" in row and "value" in row for _, row in records)
    table: dict[tuple[str, int], CompanyYear] = {}
    with track("reading table", total=len(records)) as bar:
        for where, row in records:
            for field in (config.company_field, config.year_field):
                if row.get(field) in (None, ""):
                    raise UserError(f"{where}: missing '{field}' (set company_field / year_field to your columns)")
            try:
                year = int(str(row[config.year_field]).strip())
            except ValueError:
                raise UserError(f"{where}: '{config.year_field}' must be an integer year, got {row[config.year_field]!r}") from None
            key = (str(row[config.company_field]).strip(), year)
            entry = table.setdefault(key, CompanyYear(key[0], year, {}, where))
            if long_format:
                figures = {str(row["metric"]): row["value"]}
            else:
                figures = {k: v for k, v in row.items() if k not in (config.company_field, config.year_field)}
                if entry.values:
                    raise UserError(f"{where}: {key[0]} {year} appears twice (first at {entry.where})")
            for column, raw in figures.items():
                if not long_format and isinstance(raw, str) and raw.strip() and not _looks_numeric(raw):
                    continue  # a text column (ticker, industry) in a wide table
                value = _number(raw, where, column)
                if value is None:
                    continue
                if long_format and column in entry.values:
                    raise UserError(f"{where}: {key[0]} {year} {column} appears twice")
                kind = metrics[column].kind if column in metrics else "amount"
                entry.values[column] = value * UNITS[config.unit] if kind == "amount" else value
            bar.advance()
    return sorted(table.values(), key=lambda cy: (cy.company, cy.year))


def _looks_numeric(text: str) -> bool:
    try:
        Decimal(text.replace(",", "").strip())
        return True
    except InvalidOperation:
        return False


# ------------------------------------------------------------------------------------------- rendering


def format_amount(yuan: Decimal) -> str:
    """An exact Chinese rendering: `12.35亿元` for whole 0.01亿, else `8350万元` or `123456.78元`."""
    if yuan % 1_000_000 == 0:
        return f"{yuan / UNITS['yi']:.2f}亿元"
    if yuan % 10_000 == 0:
        return f"{yuan / UNITS['wan']:.0f}万元"
    return f"{_plain(yuan.quantize(CENT) if yuan != yuan.to_integral_value() else yuan)}元"


def _plain(value: Decimal) -> str:
    return str(int(value)) if value == value.to_integral_value() else format(value.normalize(), "f")


def format_value(value: Decimal, metric: MetricInfo) -> str:
    if metric.kind == "percent":
        return f"{value:.2f}%"
    if metric.kind == "per_share":
        return f"{value:.2f}元"
    return format_amount(value)


def growth(current: Decimal, previous: Decimal) -> Decimal:
    """Year-over-year growth in percent, half-up to two decimals."""
    result = ((current - previous) / previous * 100).quantize(CENT, rounding=ROUND_HALF_UP)
    return abs(result) if result == 0 else result


def _change_zh(value: Decimal) -> str:
    return f"同比增长{value:.2f}%" if value >= 0 else f"同比下降{-value:.2f}%"


class Synthesizer:
    """Turns company-years into instruction rows (see the module docstring)."""

    def __init__(self, config: Optional[SynthConfig] = None):
        self.config = config or SynthConfig()
        self.metrics = load_metrics(self.config.metrics)
        self.ratios = load_ratios(self.config.ratios)

    def metric(self, key: str) -> MetricInfo:
        return self.metrics.get(key, MetricInfo(key, key, "amount"))

    def report(self, cy: CompanyYear, previous: Optional[CompanyYear]) -> dict[str, Any]:
        lines, sentences = [], []
        for key, value in cy.values.items():
            metric = self.metric(key)
            last = previous.values.get(key) if previous else None
            lines.append(f"{metric.zh}：{format_value(value, metric)}"
                         + (f"（上年：{format_value(last, metric)}）" if last is not None else ""))
            change = f"，{_change_zh(growth(value, last))}" if last and metric.kind == "amount" else ""
            sentences.append(f"{metric.zh}{format_value(value, metric)}{change}")
        prompt = f"请根据以下财务数据，撰写{cy.company}{cy.year}年的业绩摘要。\n" + "\n".join(lines)
        text = f"{cy.company}{cy.year}年" + "；".join(sentences) + "。"
        return self._row("report", cy, "", prompt, text, {"text": text})

    def yoy(self, cy: CompanyYear, previous: CompanyYear, key: str, rng: random.Random) -> Optional[dict[str, Any]]:
        metric = self.metric(key)
        current, last = cy.values[key], previous.values.get(key)
        if metric.kind != "amount" or last is None or last == 0:
            return None
        value = growth(current, last)
        a, b = format_amount(current), format_amount(last)
        prompt = rng.choice((
            f"{cy.company}{previous.year}年{metric.zh}为{b}，{cy.year}年为{a}。请计算{cy.year}年{metric.zh}的同比增长率。",
            f"已知{cy.company}{cy.year}年{metric.zh}{a}，上年同期{b}，求同比增长率。",
        ))
        text = f"（本期−上期）/上期 = ({a}−{b})/{b} = {value:.2f}%，{_change_zh(value)}。"
        answer = {"value": float(value), "metric": key, "current": float(current), "previous": float(last)}
        return self._row("yoy", cy, f"-{key}", prompt, text, answer)

    def ratio(self, cy: CompanyYear, ratio: RatioInfo, rng: random.Random) -> Optional[dict[str, Any]]:
        numerator, denominator = cy.values.get(ratio.numerator), cy.values.get(ratio.denominator)
        if numerator is None or denominator is None or denominator == 0:
            return None
        value = (numerator / denominator * (100 if ratio.percent else 1)).quantize(CENT, rounding=ROUND_HALF_UP)
        top, bottom = self.metric(ratio.numerator), self.metric(ratio.denominator)
        a, b = format_value(numerator, top), format_value(denominator, bottom)
        shown = f"{value:.2f}%" if ratio.percent else f"{value:.2f}"
        prompt = rng.choice((
            f"{cy.company}{cy.year}年{top.zh}为{a}，{bottom.zh}为{b}。请计算{ratio.zh}（{top.zh}/{bottom.zh}）。",
            f"已知{cy.company}{cy.year}年{bottom.zh}{b}、{top.zh}{a}，{ratio.zh}是多少？",
        ))
        times = "×100%" if ratio.percent else ""
        text = f"{ratio.zh} = {top.zh}/{bottom.zh}{times} = {a}/{b}{times} = {shown}。"
        answer = {"value": float(value), "ratio": ratio.key, "numerator": float(numerator),
                  "denominator": float(denominator), "percent": ratio.percent}
        return self._row("ratio", cy, f"-{ratio.key}", prompt, text, answer)

    def _row(self, task: str, cy: CompanyYear, suffix: str, prompt: str, text: str, answer: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": f"synth-{task}-{cy.company}-{cy.year}{suffix}",
            "task": task,
            "group": cy.group,
            "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": text}],
            "answer": answer,
        }

    def synthesize(self, table: Sequence[CompanyYear]) -> list[dict[str, Any]]:
        """All samples of the configured tasks, in table order."""
        by_key = {(cy.company, cy.year): cy for cy in table}
        rows: list[dict[str, Any]] = []
        with track("synthesizing", total=len(table)) as bar:
            for cy in table:
                rng = random.Random(f"{self.config.seed}:{cy.group}")
                previous = by_key.get((cy.company, cy.year - 1))
                if "report" in self.config.tasks:
                    rows.append(self.report(cy, previous))
                if "yoy" in self.config.tasks and previous is not None:
                    rows.extend(row for key in cy.values if (row := self.yoy(cy, previous, key, rng)))
                if "ratio" in self.config.tasks:
                    rows.extend(row for ratio in self.ratios.values() if (row := self.ratio(cy, ratio, rng)))
                bar.advance()
        return rows


def synthesize_table(path: str | Path, config: Optional[SynthConfig] = None) -> list[dict[str, Any]]:
    """Read a table and return its instruction rows."""
    synthesizer = Synthesizer(config)
    return synthesizer.synthesize(read_table(path, synthesizer.config, synthesizer.metrics))


def write_embedded_table(path: str | Path, seed: int = 0, companies: int = 60, years: int = 5) -> Path:
    """The embedded dataset's statements as a wide csv (`company, year, revenue, ...`, amounts in yuan)."""
    from lmsmith.datasets.finance import generate

    dataset = generate(seed, companies, years)
    names = {c.ticker: c.name for c in dataset.companies}
    columns = ["revenue", "net_profit", "operating_cash_flow", "total_assets", "rd_expense", "gross_margin", "debt_ratio", "eps"]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["company", "year", *columns])
        for s in dataset.statements:
            writer.writerow([names[s.ticker], s.year, *(getattr(s, column) for column in columns)])
    return path
