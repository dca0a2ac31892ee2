"""Synthesis from company × year × metric tables: arithmetic of every answer, table shapes and units,
errors that name the line, the sft row format, and `lmsmith data synth`."""

from __future__ import annotations

import argparse
import csv
import json
import re
from decimal import ROUND_HALF_UP, Decimal

import pytest

from lmsmith.data.steps.numbers import normalize_amounts
from lmsmith.data.cli.quality import add_quality_commands
from lmsmith.data.quality.metrics import growth_check
from lmsmith.jsonl import read_jsonl
from lmsmith.data.record import Record, check_row
from lmsmith.data.synth import SynthConfig, format_amount, synthesize_table, write_embedded_table
from lmsmith.errors import UserError


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    add_quality_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    return args.func(args)


def half_up(value: Decimal) -> float:
    return float(value.quantize(Decimal("0.01"), rounding=ROUND_HALF_UP))


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    path = write_embedded_table(tmp_path_factory.mktemp("table") / "table.csv", companies=6, years=4)
    with open(path, encoding="utf-8") as handle:
        table = {(row["company"], int(row["year"])): row for row in csv.DictReader(handle)}
    return table, synthesize_table(path)


def test_yoy_answers_are_arithmetically_right(embedded):
    table, rows = embedded
    yoy = [row for row in rows if row["task"] == "yoy"]
    assert len(yoy) == 6 * 3 * 5  # 6 companies × 3 years with a previous one × 5 amount metrics
    for row in yoy:
        company, year = row["group"].rsplit(":", 1)
        metric = row["answer"]["metric"]
        current = Decimal(table[(company, int(year))][metric])
        previous = Decimal(table[(company, int(year) - 1)][metric])
        assert row["answer"]["value"] == half_up((current - previous) / previous * 100)
        assert f"{row['answer']['value']:.2f}%" in row["messages"][-1]["content"]
        assert growth_check(row) is True  # the shown formula recomputes to the answer
        # The question states both figures exactly.
        numbers = {Decimal(n) for n in re.findall(r"\d+(?:\.\d+)?", normalize_amounts(row["messages"][0]["content"]))}
        assert current in numbers and previous in numbers


def test_ratio_answers_are_arithmetically_right(embedded):
    table, rows = embedded
    ratios = [row for row in rows if row["task"] == "ratio"]
    assert {row["answer"]["ratio"] for row in ratios} == {"net_margin", "rd_intensity", "cash_conversion", "asset_turnover"}
    for row in ratios:
        company, year = row["group"].rsplit(":", 1)
        figures = table[(company, int(year))]
        pairs = {"net_margin": ("net_profit", "revenue"), "rd_intensity": ("rd_expense", "revenue"),
                 "cash_conversion": ("operating_cash_flow", "net_profit"), "asset_turnover": ("revenue", "total_assets")}
        top, bottom = pairs[row["answer"]["ratio"]]
        value = Decimal(figures[top]) / Decimal(figures[bottom]) * (100 if row["answer"]["percent"] else 1)
        assert row["answer"]["value"] == half_up(value)
        shown = re.findall(r"= (-?\d+\.\d{2})%?。$", row["messages"][-1]["content"])
        assert shown and float(shown[0]) == row["answer"]["value"]


def test_reports_mention_every_figure_and_growth(embedded):
    table, rows = embedded
    reports = [row for row in rows if row["task"] == "report"]
    assert len(reports) == len(table)
    row = next(r for r in reports if r["group"].endswith(":2022"))
    company = row["group"].rsplit(":", 1)[0]
    figures = table[(company, 2022)]
    text = row["answer"]["text"]
    assert text == row["messages"][-1]["content"]
    assert format_amount(Decimal(figures["revenue"])) in text and f"{Decimal(figures['gross_margin']):.2f}%" in text
    assert "同比增长" in text or "同比下降" in text


def test_rows_are_in_the_data_stage_sft_format(embedded):
    _, rows = embedded
    for index, row in enumerate(rows):
        assert set(row) == {"id", "task", "group", "messages", "answer"}
        problem, fmt = check_row(row, "auto", "instructions")  # the data stage's own check
        record = Record(f"synth:{index}", row, fmt=fmt, kind="instructions")
        assert problem is None and record.id == row["id"] and record.group == row["group"]
    assert len({row["id"] for row in rows}) == len(rows)


@pytest.mark.parametrize(
    ("yuan", "text"),
    [
        (Decimal(1235000000), "12.35亿元"),
        (Decimal(83500000000), "835.00亿元"),
        (Decimal(835000), "835000元"),  # not a whole number of 万: plain yuan
        (Decimal(8350000), "835万元"),
        (Decimal("123456.78"), "123456.78元"),
        (Decimal(-120000000), "-1.20亿元"),
    ],
)
def test_amounts_are_printed_exactly(yuan, text):
    assert format_amount(yuan) == text
    assert Decimal(re.findall(r"-?\d+(?:\.\d+)?", normalize_amounts(format_amount(yuan)))[0]) == yuan


def test_long_json_table_in_yi(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps([
        {"company": "甲公司", "year": 2022, "metric": "revenue", "value": 100},
        {"company": "甲公司", "year": 2023, "metric": "revenue", "value": 120},
        {"company": "甲公司", "year": 2023, "metric": "net_profit", "value": "10"},
        {"company": "甲公司", "year": 2023, "metric": "gross_margin", "value": 31.5},
    ], ensure_ascii=False), encoding="utf-8")
    rows = synthesize_table(path, SynthConfig(unit="yi"))
    by_id = {row["id"]: row for row in rows}
    assert by_id["synth-yoy-甲公司-2023-revenue"]["answer"]["value"] == 20.0
    assert by_id["synth-ratio-甲公司-2023-net_margin"]["answer"]["value"] == 8.33
    assert "120.00亿元" in by_id["synth-yoy-甲公司-2023-revenue"]["messages"][0]["content"]
    assert "毛利率：31.50%" in by_id["synth-report-甲公司-2023"]["messages"][0]["content"]
    assert "synth-yoy-甲公司-2023-gross_margin" not in by_id  # percent metrics get no growth question


def test_wide_jsonl_table_with_own_columns_and_tasks(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(
        '{"name": "乙", "fy": 2022, "ticker": "600001.SH", "revenue": 5000, "net_profit": -100}\n'
        '{"name": "乙", "fy": 2023, "ticker": "600001.SH", "revenue": 4000, "net_profit": 200}\n',
        encoding="utf-8",
    )
    rows = synthesize_table(path, SynthConfig(company_field="name", year_field="fy", unit="wan", tasks=["yoy"]))
    assert {row["task"] for row in rows} == {"yoy"}
    by_metric = {row["answer"]["metric"]: row["answer"]["value"] for row in rows}
    assert by_metric == {"revenue": -20.0, "net_profit": -300.0}  # (200 − (−100)) / (−100), as the formula shows


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("company,year,revenue\n甲,2023,100\n甲,abc,1\n", r"t\.csv:3: 'year' must be an integer"),
        ("company,year,revenue\n甲,2023,100\n,2022,1\n", r"t\.csv:3: missing 'company'"),
        ("company,year,revenue\n甲,2023,100\n甲,2023,200\n", r"t\.csv:3: 甲 2023 appears twice"),
        ("company,year,metric,value\n甲,2023,revenue,1x\n", r"t\.csv:2: column 'revenue' must be a number"),
        ("company,year\n", r"t\.csv: the table is empty"),
    ],
)
def test_bad_tables_name_the_line(tmp_path, content, message):
    path = tmp_path / "t.csv"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(UserError, match=message):
        synthesize_table(path)


def test_bad_ratio_file_names_the_line(tmp_path):
    ratios = tmp_path / "ratios.yaml"
    ratios.write_text("margin:\n  zh: 利润率\n  numerator: net_profit\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"ratios\.yaml:1: ratio 'margin' needs a string 'denominator'"):
        synthesize_table(tmp_path / "unused.csv", SynthConfig(ratios=str(ratios)))


def test_cli_synth(tmp_path):
    out = tmp_path / "syn"
    assert run_cli("synth", "embedded:finance", "--out", str(out), "--companies", "3", "--years", "3",
                   "--tasks", "yoy,ratio") == 0
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    rows = read_jsonl(out / "synth.jsonl")
    assert manifest["counts"]["samples"] == len(rows) == sum(manifest["counts"]["by_task"].values())
    assert set(manifest["counts"]["by_task"]) == {"yoy", "ratio"}
    assert manifest["counts"]["company_years"] == 9 and (out / "table.csv").is_file()
    with pytest.raises(UserError, match="--unit"):
        run_cli("synth", str(out / "table.csv"), "--out", str(out), "--unit", "dollars")
