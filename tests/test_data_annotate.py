"""Entity annotation: tokens, gazetteer and regex spans, BIO tags, CoNLL round trip, seqeval scores
against the embedded ground truth, and `lmsmith data annotate`."""

from __future__ import annotations

import argparse
import json

import pytest

from lmsmith.data.annotate import (
    AnnotateConfig,
    Annotator,
    bio_tags,
    embedded_company_names,
    gold_spans,
    metric_names,
    read_conll,
    score,
    tokenize,
    write_conll,
)
from lmsmith.data.quality import embedded_rows
from lmsmith.data.cli.quality import add_quality_commands
from lmsmith.jsonl import read_jsonl, write_jsonl
from lmsmith.errors import UserError


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    add_quality_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    return args.func(args)


@pytest.fixture(scope="module")
def entity_rows():
    """The embedded entity samples before and after the default cleaning chain (amounts normalised)."""
    before, after, _ = embedded_rows(companies=20)
    return [r for r in before if r.get("task") == "entities"], [r for r in after if r.get("task") == "entities"]


@pytest.fixture(scope="module")
def annotator():
    return Annotator(company_names=embedded_company_names(companies=20))


def test_tokenize_keeps_ascii_words_whole_and_splits_cjk():
    assert [t for t, _, _ in tokenize("星辰科技FY2023营收RMB 1.235 billion，R&D增长15.20%")] == [
        "星", "辰", "科", "技", "FY2023", "营", "收", "RMB", "1.235", "billion", "，", "R&D", "增", "长", "15.20", "%",
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2024年3月15日，华澄科技公告称", [("date", "2024年3月15日"), ("company", "华澄科技")]),
        ("归母净利润为12.35亿元", [("metric", "归母净利润"), ("amount", "12.35亿元")]),
        ("净利润为1235000000元", [("metric", "净利润"), ("amount", "1235000000元")]),
        ("revenue reached RMB 1.235 billion", [("metric", "revenue"), ("amount", "RMB 1.235 billion")]),
        ("total assets was RMB 850 million.", [("metric", "total assets"), ("amount", "RMB 850 million")]),
        ("On March 5, 2024, FY2023 sales", [("date", "March 5, 2024"), ("date", "FY2023"), ("metric", "sales")]),
        ("2023年营业收入3.5万元", [("date", "2023年"), ("metric", "营业收入"), ("amount", "3.5万元")]),
        ("revenues and Huachengx", [("metric", "revenue")]),
    ],
)
def test_spans(text, expected):
    annotator = Annotator(company_names=["华澄科技", "Huacheng"])
    found = [(s.type, s.text) for s in annotator.spans(text)]
    if text.startswith("revenues"):
        assert found == []  # "revenue" inside "revenues", "Huacheng" inside "Huachengx": not whole words
    else:
        assert found == expected


def test_bio_tags_mark_begin_and_inside():
    annotator = Annotator(company_names=["Shengshi Chemicals"])
    tokens, tags = annotator.tag("Shengshi Chemicals said its revenue was RMB 3 billion.")
    assert list(zip(tokens, tags)) == [
        ("Shengshi", "B-COMPANY"), ("Chemicals", "I-COMPANY"), ("said", "O"), ("its", "O"), ("revenue", "B-METRIC"),
        ("was", "O"), ("RMB", "B-AMOUNT"), ("3", "I-AMOUNT"), ("billion", "I-AMOUNT"), (".", "O"),
    ]


def test_scores_against_embedded_ground_truth(entity_rows, annotator):
    raw, cleaned = entity_rows
    for rows in (raw, cleaned):
        result = score(rows, annotator)
        assert result["records"] == len(rows) == 100
        assert result["gold_entities_not_found_in_text"] == 0
        assert result["f1"] >= 0.99 and result["precision"] >= 0.99 and result["recall"] >= 0.99
        assert set(result["per_type"]) == {"COMPANY", "METRIC", "AMOUNT", "DATE"}
        assert result["per_type"]["AMOUNT"]["support"] == 2 * len(rows)


def test_scores_drop_without_the_company_gazetteer(entity_rows):
    raw, _ = entity_rows
    result = score(raw, Annotator())
    assert result["per_type"]["COMPANY"]["recall"] == 0.0
    assert result["recall"] < 0.9 and result["per_type"]["DATE"]["f1"] >= 0.99


def test_gold_spans_locate_entities_in_order_and_reject_bad_types():
    text = "2023年营收为2023年的两倍"
    spans, missing = gold_spans(text, [{"type": "date", "text": "2023年"}, {"type": "date", "text": "2023年"},
                                      {"type": "amount", "text": "9亿元"}], "r1")
    assert [s.start for s in spans] == [0, 8] and missing == 1
    with pytest.raises(UserError, match=r"r1: answer.entities\[0\]"):
        gold_spans(text, [{"type": "person", "text": "x"}], "r1")
    assert bio_tags("甲乙", [])[1] == ["O", "O"]


def test_conll_round_trip(entity_rows, annotator, tmp_path):
    from lmsmith.data.annotate import annotate_rows

    raw, _ = entity_rows
    annotated = annotate_rows(raw[:5], annotator)
    path = tmp_path / "x.conll"
    assert write_conll(path, annotated) == 5
    back = read_conll(path)
    assert [(r["id"], r["tokens"], r["tags"]) for r in back] == [(r["id"], r["tokens"], r["tags"]) for r in annotated]
    assert path.read_text(encoding="utf-8").startswith(f"# id = {raw[0]['id']}\n")
    bad = tmp_path / "bad.conll"
    bad.write_text("# id = a\ntoken B-DATE extra\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"bad\.conll:2"):
        read_conll(bad)


def test_metric_dictionary_errors_name_the_line(tmp_path):
    assert "归母净利润" in metric_names() and "net profit" in metric_names()
    bad = tmp_path / "metrics.yaml"
    bad.write_text("revenue:\n  zh: 营业收入\n  aliases: 营收\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"metrics\.yaml:3: aliases must be a list"):
        Annotator(AnnotateConfig(metrics=str(bad)))


def test_cli_annotate_embedded(tmp_path):
    out = tmp_path / "ann"
    assert run_cli("annotate", "embedded:finance", "--out", str(out), "--companies", "10") == 0
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    scores = json.loads((out / "scores.json").read_text(encoding="utf-8"))
    assert manifest["counts"]["records"] == scores["records"] == 50
    assert scores["f1"] >= 0.99
    assert sum(manifest["counts"]["entities_by_type"].values()) == manifest["counts"]["entities"]
    assert len(read_conll(out / "entities.conll")) == 50


def test_cli_annotate_plain_text_with_a_gazetteer_file(tmp_path):
    source = tmp_path / "docs.jsonl"
    write_jsonl(source, [{"id": "d1", "text": "2023年，华澄科技实现营业收入12.35亿元。"}])
    companies = tmp_path / "companies.txt"
    companies.write_text("华澄科技\n", encoding="utf-8")
    out = tmp_path / "ann"
    assert run_cli("annotate", str(source), "--out", str(out), "--companies-file", str(companies)) == 0
    (row,) = read_jsonl(out / "annotations.jsonl")
    assert [(e["type"], e["text"]) for e in row["entities"]] == [
        ("date", "2023年"), ("company", "华澄科技"), ("metric", "营业收入"), ("amount", "12.35亿元"),
    ]
    assert not (out / "scores.json").exists()  # no ground truth, no score
