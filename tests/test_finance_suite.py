"""The embedded finance eval suite: held out of training, big enough for a 3-point standard error,
correct gold answers, and rewritten the way the training text is cleaned."""

from __future__ import annotations

import json
import math
from fractions import Fraction

import pytest

from lmsmith.data.steps import DEFAULT_OPS, rewriter
from lmsmith.datasets.finance import generate
from lmsmith.datasets.finance_suite import write_suite
from lmsmith.eval.tasks import ChoiceQuestion, load_task, read_items


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    folder = tmp_path_factory.mktemp("suite")
    rewrite = rewriter([dict(spec) for spec in DEFAULT_OPS], "instructions")
    return folder, {load_task(path).name: load_task(path) for path in write_suite(folder, rewrite=rewrite)}


def test_tasks_and_their_sizes_bound_the_standard_error(suite):
    _, tasks = suite
    assert list(tasks) == ["finance-mc", "finance-yoy", "finance-entities", "finance-report", "finance-news",
                           "finance-kbqa", "finance-kbqa-closed", "finance-retrieval"]
    sizes = {name: len(read_items(task)) for name, task in tasks.items()}
    # 0/1 scores: the worst case (p = 0.5) standard error sqrt(p(1-p)/n) stays under 3 points.
    for name in ("finance-mc", "finance-yoy", "finance-news", "finance-kbqa", "finance-retrieval"):
        assert 100 * math.sqrt(0.25 / sizes[name]) < 3.0, (name, sizes[name])
    assert sizes["finance-entities"] >= 140 and sizes["finance-report"] == 60


def test_no_company_of_the_training_data_appears(suite):
    folder, _ = suite
    trained = generate(0, 60, 5).companies
    text = "".join(path.read_text(encoding="utf-8") for path in folder.iterdir() if path.suffix in (".jsonl", ".conll"))
    compact = text.replace("\n", "").replace(" O", "").replace(" B-company", "").replace(" I-company", "")
    for company in trained:
        assert company.name not in text and company.ticker not in text
        assert company.name not in compact  # nor spelled one character per CoNLL line


def test_multiple_choice_gold_is_the_right_ratio(suite):
    _, tasks = suite
    items: list[ChoiceQuestion] = read_items(tasks["finance-mc"])
    assert all(len(set(item.options)) == 4 for item in items)
    golds = [item.gold for item in items]
    assert min(golds.count(g) for g in range(4)) > len(items) * 0.15  # the right letter is spread
    margins = [item for item in items if "净利率" in item.question and "归母净利润为" in item.question]
    assert margins
    for item in margins[:20]:
        revenue = int(item.question.split("营业收入为")[1].split("元")[0])
        profit = int(item.question.split("归母净利润为")[1].split("元")[0])
        assert abs(float(item.options[item.gold][:-1]) - float(100 * Fraction(profit, revenue))) <= 0.005


def test_entity_tags_spell_the_gold_entities(suite):
    folder, tasks = suite
    sentences = read_items(tasks["finance-entities"])
    for sentence in sentences[:50]:
        spans, current = [], None
        for char, tag in zip(sentence.tokens, sentence.tags):
            if tag.startswith("B-"):
                current = [tag[2:], char]
                spans.append(current)
            elif tag.startswith("I-"):
                assert current is not None and current[0] == tag[2:]
                current[1] += char
            else:
                current = None
        kinds = [kind for kind, _ in spans]
        assert kinds.count("company") == 1 and kinds.count("amount") == 2 and kinds.count("date") == 2
        assert all(text.endswith("元") for kind, text in spans if kind == "amount")


def test_items_are_cleaned_like_the_training_text(suite):
    folder, tasks = suite
    records = [json.loads(line) for line in (folder / "finance-yoy.jsonl").read_text(encoding="utf-8").splitlines()]
    question = records[0]["messages"][0]["content"]
    assert "亿元" not in question and "，" not in question and "元" in question  # amounts in yuan, NFKC punctuation
    assert all(isinstance(record["answer"]["value"], float) for record in records)
    assert "：" not in tasks["finance-mc"].template and "，" not in tasks["finance-entities"].template
