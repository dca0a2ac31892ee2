"""The embedded finance eval suite: five `lmsmith eval` tasks about companies held out of training.

The companies come from `lmsmith.datasets.finance.generate` under a seed of their own, minus any whose
ticker or name (Chinese or English) the training dataset also uses, so no answer can be remembered from
training. Tasks (the file each is written to):

- `finance-mc`: multiple choice on ratios and terms (net margin, revenue growth, R&D intensity from a
  company's figures; what a ratio measures), each option a plausible mistake (the wrong denominator, the
  sign flipped, the complement);
- `finance-yoy`: year-over-year growth, in the training data's own question forms, scored on the number;
- `finance-entities`: company, metric, amount and date entities in Chinese disclosures, gold BIO tags
  per character (CoNLL), asked as the training data asks (a JSON answer);
- `finance-report`: the report paragraph for a company-year, against the reference paragraph;
- `finance-news`: news items classified by the direction of revenue (增长 / 下降);
- `finance-kbqa` / `finance-kbqa-closed`: a figure of a held-out company-year (营业收入, 总资产, ...),
  asked with the knowledge base `finance-kb` (the held-out companies' report paragraphs, built with
  `lmsmith.rag`) grounding the answer, and the same questions without it: facts only the KB holds;
- `finance-retrieval`: the same questions against the KB, each relevant to its company-year's report.

The training data teaches the yoy, entities, report and grounded-answer (kbqa, on the training
companies' reports) forms; multiple choice and news classification
are not trained, so they show what tuning does to what it did not teach. Item counts are chosen so a
score's standard error stays under 3 points on 0–100. Every text goes through `rewrite` first: the run's
own cleaning operators (`lmsmith.data.steps.rewriter`), so the items read the way the training text did
(amounts in one form, half-width punctuation).
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

from lmsmith.datasets.finance import FinanceDataset, Statement, generate, growth_percent, yi

SUITE_NAME = "finance-suite"
HELD_OUT_SEED_OFFSET = 7919  # the held-out companies' generator seed, from the training seed
ENTITY_PROMPT = "从下面这段文字中抽取公司、指标、金额和日期实体，以JSON格式输出。\n{text}"
NEWS_LABELS = ("增长", "下降")


@dataclass(frozen=True)
class SuiteSizes:
    """Items per task (each capped by what the held-out companies yield)."""

    companies: int = 120
    mc: int = 320
    yoy: int = 280
    entities: int = 150
    report: int = 60
    news: int = 300
    kbqa: int = 280


# (concept, what it measures, the other three answers) for the terms questions
_TERMS = (
    ("资产负债率", "偿债能力", ("盈利能力", "营运能力", "成长能力")),
    ("毛利率", "盈利能力", ("偿债能力", "营运能力", "现金流状况")),
    ("净利率", "盈利能力", ("偿债能力", "营运能力", "估值水平")),
    ("总资产周转率", "营运能力", ("盈利能力", "偿债能力", "成长能力")),
    ("营业收入同比增长率", "成长能力", ("偿债能力", "营运能力", "估值水平")),
    ("流动比率", "短期偿债能力", ("盈利能力", "成长能力", "估值水平")),
    ("市盈率", "估值水平", ("偿债能力", "营运能力", "盈利能力")),
    ("经营活动现金流量净额", "现金流状况", ("估值水平", "营运能力", "成长能力")),
    ("研发投入占营业收入比例", "研发强度", ("偿债能力", "估值水平", "营运能力")),
    ("基本每股收益", "每股盈利水平", ("偿债能力", "营运能力", "研发强度")),
)


def _percent(value: float) -> str:
    return f"{value:.2f}%"


def _distinct_options(right: str, wrong: list[str]) -> Optional[list[str]]:
    options = [right] + [option for option in dict.fromkeys(wrong) if option != right]
    return options[:4] if len(options) >= 4 else None


def _ratio_questions(statement: Statement, previous: Optional[Statement], name: str) -> list[tuple[str, list[str]]]:
    """(question, [right, wrong, wrong, wrong]) about one company-year's figures."""
    s = statement
    questions = []
    margin = 100 * s.net_profit / s.revenue
    options = _distinct_options(_percent(margin), [
        _percent(100 * s.net_profit / s.total_assets),  # return on assets, not margin
        _percent(100 - margin),  # the complement
        _percent(100 * s.revenue / s.total_assets),  # asset turnover
    ])
    if options:
        questions.append((f"{name}{s.year}年营业收入为{yi(s.revenue)}，归母净利润为{yi(s.net_profit)}，"
                          f"总资产为{yi(s.total_assets)}。该公司{s.year}年的净利率约为多少？", options))
    intensity = 100 * s.rd_expense / s.revenue
    options = _distinct_options(_percent(intensity), [
        _percent(100 * s.rd_expense / s.net_profit) if s.net_profit else "0.00%",  # over profit
        _percent(100 * s.rd_expense / s.total_assets),  # over assets
        _percent(intensity * 10),  # a slipped decimal point
    ])
    if options:
        questions.append((f"{name}{s.year}年研发投入为{yi(s.rd_expense)}，营业收入为{yi(s.revenue)}，"
                          f"归母净利润为{yi(s.net_profit)}。研发投入占营业收入的比例约为多少？", options))
    if previous is not None:
        growth = float(growth_percent(s.revenue, previous.revenue))
        options = _distinct_options(_percent(growth), [
            _percent(100 * (s.revenue - previous.revenue) / s.revenue),  # over this year, not last
            _percent(-growth),  # the sign flipped
            _percent(100 * s.revenue / previous.revenue),  # the ratio, not the change
        ])
        if options:
            questions.append((f"{name}{previous.year}年营业收入为{yi(previous.revenue)}，{s.year}年为{yi(s.revenue)}。"
                              f"{s.year}年营业收入同比增长率约为多少？", options))
    return questions


Rewrite = Callable[[str], str]


def _unchanged(text: str) -> str:
    return text


def _mc_items(held_out: FinanceDataset, rng: random.Random, count: int, rewrite: Rewrite) -> list[dict]:
    names = {company.ticker: company.name for company in held_out.companies}
    by_company: dict[str, list[Statement]] = {}
    for statement in held_out.statements:
        by_company.setdefault(statement.ticker, []).append(statement)
    questions: list[tuple[str, list[str]]] = []
    for concept, right, wrong in _TERMS:
        questions.append((f"在财务分析中，{concept}主要用来衡量企业的哪方面？", [right, *wrong]))
    computed = []
    for ticker, statements in by_company.items():
        previous = None
        for statement in sorted(statements, key=lambda s: s.year):
            computed.extend(_ratio_questions(statement, previous, names[ticker]))
            previous = statement
    rng.shuffle(computed)
    questions += computed[: max(0, count - len(questions))]
    items = []
    for index, (question, options) in enumerate(questions):
        options = [rewrite(option) for option in options]
        if len(set(options)) < len(options):
            continue  # two options read the same once rewritten
        order = list(range(len(options)))
        rng.shuffle(order)
        items.append({"id": f"finance-mc-{index}", "question": rewrite(question),
                      "choices": [options[i] for i in order], "answer": order.index(0)})
    return items


def _bio_sentence(passage: str, entities: list[dict]) -> Optional[list[tuple[str, str]]]:
    """(character, BIO tag) pairs: each entity marks its next occurrence in order; None when one is missing."""
    tags = ["O"] * len(passage)
    at = 0
    for entity in entities:
        start = passage.find(entity["text"], at)
        if start < 0:
            return None
        end = start + len(entity["text"])
        tags[start:end] = [f"B-{entity['type']}"] + [f"I-{entity['type']}"] * (end - start - 1)
        at = end
    return [(char, tag) for char, tag in zip(passage, tags) if not char.isspace()]


def _entity_sentences(held_out: FinanceDataset, count: int, rewrite: Rewrite) -> list[list[tuple[str, str]]]:
    sentences = []
    for row in held_out.instructions:
        if row.task != "entities":
            continue
        passage = row.messages[0]["content"].split("\n", 1)[1]
        if any(char.isascii() and char.isalpha() for char in passage):
            continue  # Chinese disclosures only: one character per CoNLL token
        entities = [{"type": entity["type"], "text": rewrite(entity["text"])} for entity in row.answer["entities"]]
        sentence = _bio_sentence(rewrite(passage), entities)
        if sentence:
            sentences.append(sentence)
    return sentences[:count]


def _news_items(held_out: FinanceDataset, count: int, rewrite: Rewrite) -> list[dict]:
    revenue: dict[tuple[str, int], int] = {(s.ticker, s.year): s.revenue for s in held_out.statements}
    items = []
    for document in held_out.documents:
        if document.source != "finance/news" or document.lang != "zh" or document.noise:
            continue
        ticker, year = document.group.split(":")
        previous = revenue.get((ticker, int(year) - 1))
        if previous is None or previous == revenue[(ticker, int(year))]:
            continue
        label = NEWS_LABELS[0] if revenue[(ticker, int(year))] > previous else NEWS_LABELS[1]
        items.append({"text": rewrite(document.text), "label": label})
    return items[:count]


def held_out_dataset(seed: int, train_companies: Optional[int], years: int, companies: int) -> FinanceDataset:
    """Companies (and their statements, documents, instructions) that the training dataset
    `generate(seed, train_companies, years)` does not have; without `train_companies`, none is excluded."""
    held_out = generate(seed + HELD_OUT_SEED_OFFSET, companies, years)
    if train_companies is None:
        return held_out
    trained = generate(seed, train_companies, years).companies
    taken = {c.ticker for c in trained} | {c.name for c in trained} | {c.name_en for c in trained if c.name_en}
    keep = {c.ticker for c in held_out.companies
            if not ({c.ticker, c.name} | ({c.name_en} if c.name_en else set())) & taken}
    return FinanceDataset(
        [c for c in held_out.companies if c.ticker in keep],
        [s for s in held_out.statements if s.ticker in keep],
        [d for d in held_out.documents if d.group.split(":")[0] in keep],
        [i for i in held_out.instructions if i.group.split(":")[0] in keep],
    )


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def _write_task(folder: Path, spec: dict) -> Path:
    import yaml

    path = folder / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path


def _rewritten_record(row: dict, rewrite: Rewrite) -> dict:
    return row | {"messages": [message | {"content": rewrite(message["content"])} for message in row["messages"]]}


KB_NAME = "finance-kb"


def _write_knowledge_base(folder: Path, held_out: FinanceDataset, by_task: dict[str, list[dict]], count: int,
                          rewrite: Rewrite) -> None:
    """The held-out companies' report paragraphs as a knowledge base, and the kbqa and retrieval items
    about them (questions only: the kb supplies the sources)."""
    from lmsmith.datasets.finance import report_title
    from lmsmith.rag.kb import KnowledgeBase

    names = {company.ticker: company for company in held_out.companies}
    documents = []
    for row in by_task.get("report", []):
        ticker, year = row["id"].removeprefix("fin-report-").rsplit("-", 1)
        documents.append({"id": f"report-{ticker}-{year}", "title": report_title(names[ticker], int(year)),
                          "text": row["messages"][-1]["content"]})
    _write_jsonl(folder / f"{KB_NAME}.jsonl", documents)
    questions = [row | {"messages": row["messages"][1:]} for row in by_task.get("kbqa", [])][:count]
    _write_jsonl(folder / "finance-kbqa.jsonl", questions)
    _write_jsonl(folder / "finance-retrieval.jsonl", [
        {"id": row["id"], "query": row["messages"][0]["content"], "relevant": [row["answer"]["source"]]}
        for row in questions])
    KnowledgeBase.build([folder / f"{KB_NAME}.jsonl"], folder / KB_NAME)


def write_suite(folder: str | Path, seed: int = 0, train_companies: Optional[int] = 60, years: int = 5,
                sizes: SuiteSizes = SuiteSizes(), rewrite: Rewrite = _unchanged) -> list[Path]:
    """Write the suite's data and task YAML files into `folder`; returns the task files in order."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    held_out = held_out_dataset(seed, train_companies, years, sizes.companies)
    if not held_out.companies:
        raise ValueError("no held-out company is left after excluding the training companies")
    rng = random.Random(seed + HELD_OUT_SEED_OFFSET)

    _write_jsonl(folder / "finance-mc.jsonl", _mc_items(held_out, rng, sizes.mc, rewrite))
    by_task: dict[str, list[dict]] = {}
    for row in held_out.instructions:
        by_task.setdefault(row.task, []).append(_rewritten_record(asdict(row), rewrite))
    _write_jsonl(folder / "finance-yoy.jsonl", by_task.get("yoy", [])[: sizes.yoy])
    _write_jsonl(folder / "finance-report.jsonl", by_task.get("report", [])[: sizes.report])
    conll = "\n\n".join("\n".join(f"{char} {tag}" for char, tag in sentence)
                        for sentence in _entity_sentences(held_out, sizes.entities, rewrite))
    (folder / "finance-entities.conll").write_text(conll + "\n", encoding="utf-8")
    _write_jsonl(folder / "finance-news.jsonl", _news_items(held_out, sizes.news, rewrite))
    _write_knowledge_base(folder, held_out, by_task, sizes.kbqa, rewrite)

    from lmsmith.eval.tasks import CLASSIFY_PROMPT, MC_PROMPT

    specs = [
        # "\n" + letter: every letter the same token shape in any byte-level BPE (" B" may be one token, " A" two)
        {"name": "finance-mc", "type": "multiple_choice", "dataset": "finance-mc.jsonl", "format": "mc_jsonl",
         "prompt": rewrite(MC_PROMPT), "target_delimiter": "\n"},
        {"name": "finance-yoy", "type": "numeric", "dataset": "finance-yoy.jsonl", "format": "messages",
         "rel_tol": 0.01, "max_new_tokens": 96},
        {"name": "finance-entities", "type": "extraction", "dataset": "finance-entities.conll", "format": "conll",
         "prompt": rewrite(ENTITY_PROMPT), "max_new_tokens": 160},
        {"name": "finance-report", "type": "generate", "dataset": "finance-report.jsonl", "format": "messages",
         "max_new_tokens": 160},
        {"name": "finance-news", "type": "classification", "dataset": "finance-news.jsonl", "format": "text_label",
         "labels": list(NEWS_LABELS), "prompt": rewrite(CLASSIFY_PROMPT)},
        {"name": "finance-kbqa", "type": "numeric", "dataset": "finance-kbqa.jsonl", "format": "messages",
         "kb": KB_NAME, "kb_top_k": 2, "rel_tol": 0.01, "max_new_tokens": 48},
        {"name": "finance-kbqa-closed", "type": "numeric", "dataset": "finance-kbqa.jsonl", "format": "messages",
         "rel_tol": 0.01, "max_new_tokens": 48},
        {"name": "finance-retrieval", "type": "retrieval", "dataset": "finance-retrieval.jsonl", "kb": KB_NAME,
         "retrieval_k": 3},
    ]
    return [_write_task(folder, spec) for spec in specs]
