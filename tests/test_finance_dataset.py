"""The embedded finance dataset: deterministic, the advertised size and noise, and correct ground truth."""

from __future__ import annotations

import json
import re
from collections import Counter
from decimal import ROUND_HALF_UP, Decimal
from fractions import Fraction

import pytest

from lmsmith.datasets.finance import METRICS, NOISE_LABELS, TASKS, generate, main, write_jsonl


@pytest.fixture(scope="module")
def dataset():
    return generate(seed=0)


def test_same_seed_gives_byte_identical_files(tmp_path):
    first = write_jsonl(generate(seed=7, companies=12, years=4), tmp_path / "a")
    second = write_jsonl(generate(seed=7, companies=12, years=4), tmp_path / "b")
    assert set(first) == {"companies", "statements", "documents", "instructions"}
    for name in first:
        assert first[name].read_bytes() == second[name].read_bytes(), name


def test_another_seed_gives_other_data():
    one, two = generate(seed=0, companies=12), generate(seed=1, companies=12)
    assert [c.name for c in one.companies] != [c.name for c in two.companies]
    assert [d.text for d in one.documents] != [d.text for d in two.documents]


def test_default_size_and_noise_rate(dataset):
    assert len(dataset.companies) == 60
    assert len(dataset.statements) == 300
    assert 800 <= len(dataset.documents) <= 1500
    assert 1000 <= len(dataset.instructions) <= 1400
    assert 0.15 <= dataset.noise_rate <= 0.20
    assert len({c.ticker for c in dataset.companies}) == 60
    assert len({c.name for c in dataset.companies}) == 60
    assert len({d.id for d in dataset.documents}) == len(dataset.documents)
    assert len({i.id for i in dataset.instructions}) == len(dataset.instructions)


def test_every_noise_label_is_present_and_honest(dataset):
    counts = Counter(label for doc in dataset.documents for label in doc.noise)
    assert set(counts) == set(NOISE_LABELS)
    assert all(counts[label] >= 5 for label in NOISE_LABELS), counts
    texts = Counter(doc.text for doc in dataset.documents)
    for doc in dataset.documents:
        if "html" in doc.noise:
            assert re.search(r"<[a-z/]", doc.text)
        if "pii" in doc.noise:
            assert "@" in doc.text and re.search(r"1[3-9]\d", doc.text)
        if "mixed_numbers" in doc.noise:
            assert re.search(r"\d,\d{3}|万元|[０-９]|million|RMB [\d.]+亿", doc.text), doc.text
        if "exact_duplicate" in doc.noise:
            assert texts[doc.text] >= 2
        if "fragment" in doc.noise:
            assert len(doc.text) <= 70
    assert sum(1 for doc in dataset.documents if not doc.noise) > 0.8 * len(dataset.documents)


def test_documents_are_mostly_chinese_with_some_english(dataset):
    languages = Counter(doc.lang for doc in dataset.documents)
    english_share = languages["en"] / len(dataset.documents)
    assert 0.05 <= english_share <= 0.3
    english = next(doc for doc in dataset.documents if doc.lang == "en" and not doc.noise)
    assert re.search(r"RMB [\d.]+ (billion|million)", english.text)


def test_all_tasks_present_and_grouped_by_company_year(dataset):
    assert set(Counter(i.task for i in dataset.instructions)) == set(TASKS)
    groups = {s.group for s in dataset.statements}
    assert {i.group for i in dataset.instructions} <= groups
    for instruction in dataset.instructions:
        # a grounded question (kbqa) carries its numbered sources in a system turn, as `lmsmith serve --kb` does
        roles = ["system", "user", "assistant"] if instruction.task == "kbqa" else ["user", "assistant"]
        assert [m["role"] for m in instruction.messages] == roles


def _round_half_up(value: Fraction) -> Decimal:
    return (Decimal(value.numerator) / Decimal(value.denominator)).quantize(Decimal("0.01"), ROUND_HALF_UP)


def test_yoy_answers_are_arithmetically_correct(dataset):
    statements = {(s.ticker, s.year): s for s in dataset.statements}
    metrics = {m.key: m for m in METRICS}
    yoy = [i for i in dataset.instructions if i.task == "yoy"]
    assert len(yoy) > 200
    formula = re.compile(
        r"^（本期−上期）/上期 = \((\d+\.\d\d)亿元−(\d+\.\d\d)亿元\)/(\d+\.\d\d)亿元 = (-?\d+\.\d\d)%，"
        r"同比(增长|下降)(\d+\.\d\d)%。$"
    )
    for sample in yoy:
        _, _, ticker, year, metric = sample.id.split("-", 4)
        current = statements[(ticker, int(year))].amount(metrics[metric])
        previous = statements[(ticker, int(year) - 1)].amount(metrics[metric])
        expected = _round_half_up(Fraction(current - previous, previous) * 100)
        assert sample.answer == {"value": float(expected)}

        match = formula.match(sample.messages[-1]["content"])
        assert match, sample.messages[-1]["content"]
        shown_current, shown_previous, divisor, shown_growth, direction, magnitude = match.groups()
        assert shown_previous == divisor
        assert Decimal(shown_current) * 10**8 == current and Decimal(shown_previous) * 10**8 == previous
        assert Decimal(shown_growth) == expected
        assert (direction == "下降") == (expected < 0) and Decimal(magnitude) == abs(expected)
        assert f"{shown_current}亿元" in sample.messages[0]["content"]
        assert f"{shown_previous}亿元" in sample.messages[0]["content"]


def test_entities_are_spans_of_the_prompt_in_order(dataset):
    samples = [i for i in dataset.instructions if i.task == "entities"]
    assert any("On " in s.messages[0]["content"] for s in samples)  # some English passages
    for sample in samples:
        assert json.loads(sample.messages[-1]["content"]) == sample.answer
        entities = sample.answer["entities"]
        assert {e["type"] for e in entities} == {"company", "metric", "amount", "date"}
        passage = sample.messages[0]["content"].split("\n", 1)[1]
        position = 0
        for entity in entities:
            found = passage.find(entity["text"], position)
            assert found >= 0, (entity, passage)
            position = found + len(entity["text"])


def test_report_answers_restate_the_prompt_figures(dataset):
    for sample in (i for i in dataset.instructions if i.task == "report"):
        prompt, report = sample.messages[0]["content"], sample.answer["text"]
        assert report == sample.messages[-1]["content"]
        for line in prompt.split("\n")[1:]:
            value = line.split("：", 1)[1].split("（")[0]
            assert value in report, (value, report)


def test_growth_in_documents_matches_the_statements(dataset):
    statements = {s.group: s for s in dataset.statements}
    checked = 0
    for doc in dataset.documents:
        if doc.noise or doc.source != "finance/analyst_note" or doc.lang != "zh":
            continue
        current = statements[doc.group]
        previous = statements[f"{current.ticker}:{current.year - 1}"]
        expected = _round_half_up(Fraction(current.revenue - previous.revenue, previous.revenue) * 100)
        word = "增长" if expected >= 0 else "下降"
        assert f"同比{word}{abs(expected):.2f}%" in doc.text
        checked += 1
    assert checked > 100


def test_small_dataset_and_command_line(tmp_path, capsys):
    small = generate(seed=3, companies=2, years=2)
    assert len(small.statements) == 4
    assert {i.task for i in small.instructions} == set(TASKS)
    main([str(tmp_path), "--seed", "3", "--companies", "2", "--years", "2"])
    rows = [json.loads(line) for line in (tmp_path / "statements.jsonl").read_text().splitlines()]
    assert [(r["ticker"], r["year"]) for r in rows] == [(s.ticker, s.year) for s in small.statements]
    assert "documents" in capsys.readouterr().out
    with pytest.raises(ValueError, match="at least"):
        generate(companies=0)
