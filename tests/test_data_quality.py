"""The 3C quality report: detectors, metrics, cleaning precision/recall against the embedded labels,
the three renderings and `lmsmith data report`."""

from __future__ import annotations

import argparse
import json
import re

import pytest

from lmsmith.data.quality import QualityConfig, build_quality_report, cleaning_vs_labels, embedded_rows
from lmsmith.data.cli.quality import add_quality_commands
from lmsmith.data.quality.detectors import (
    find_duplicates,
    detect_boilerplate,
    detect_fragment,
    detect_html,
    detect_mixed_numbers,
    detect_pii,
    luhn_valid,
    resident_id_valid,
    run_detectors,
)
from lmsmith.data.quality.metrics import category_distribution, growth_check, term_coverage
from lmsmith.data.resources import read_yaml
from lmsmith.jsonl import write_jsonl
from lmsmith.datasets.finance import TASKS
from lmsmith.errors import UserError


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    add_quality_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    return args.func(args)


# ------------------------------------------------------------------------------------------- detectors


@pytest.mark.parametrize(
    ("text", "noisy"),
    [
        ("<p>营业收入12.35亿元</p>", True),
        ("营业收入12.35亿元，&nbsp;同比增长", True),
        ("<!-- ad --> text", True),
        ("当 3 < 5 且 x > 2 时", False),
        ("收入<10亿元的公司", False),
        ("R&D spending rose", False),
    ],
)
def test_html_detector(text, noisy):
    assert (detect_html(text) is not None) == noisy


def test_resident_id_and_luhn_checks():
    assert resident_id_valid("11010519491231002X")
    assert not resident_id_valid("110105194912310021")
    assert luhn_valid("4111111111111111")
    assert not luhn_valid("4111111111111112")


@pytest.mark.parametrize(
    ("text", "noisy"),
    [
        ("联系电话13812345678。", True),
        ("电话138-1234-5678", True),
        ("tel. +86 13812345678.", True),
        ("邮箱 wang.12@huacheng-ir.com", True),
        ("身份证11010519491231002X", True),
        ("身份证110105194912310021", False),  # checksum wrong: not an ID
        ("卡号 4111 1111 1111 1111", True),
        ("卡号 4111 1111 1111 1112", False),  # Luhn fails
        ("营业收入13812000000元", False),  # an amount, not a phone
        ("revenue of RMB 13812000000", False),
        ("股票代码600123.SH", False),
    ],
)
def test_pii_detector(text, noisy):
    assert (detect_pii(text) is not None) == noisy


@pytest.mark.parametrize(
    ("text", "noisy"),
    [
        ("营业收入12.35亿元，净利润1.20亿元。", False),
        ("营业收入1235000000元，净利润120000000元。", False),
        ("营业收入12.35亿元，净利润12000万元。", True),
        ("营业收入1,235,000,000元，净利润120000000元。", True),
        ("营业收入１２.３５亿元。", True),
        ("revenue RMB 1.235 billion, profit RMB 850 million", False),
        ("revenue RMB 1,235,000,000 and profit RMB 8.50亿", True),
        ("基本每股收益0.85元，2023年营业收入12.35亿元", False),
    ],
)
def test_mixed_numbers_detector(text, noisy):
    assert (detect_mixed_numbers(text) is not None) == noisy


def test_boilerplate_and_fragment_detectors():
    assert detect_boilerplate("免责声明：本文仅供参考。") is not None
    assert detect_boilerplate("This does not constitute investment advice.") is not None
    assert detect_boilerplate("公司实现营业收入12.35亿元。") is None
    assert detect_fragment("实现营业收入12.35亿元，同比增", 10) is not None  # no sentence end
    assert detect_fragment("短句。", 10) is not None  # too short
    assert detect_fragment("这是一个完整的句子，长度足够。" * 3, 10) is None
    assert detect_fragment("<p>这是一个完整的句子，长度足够。</p>", 10) is None  # trailing markup ignored


def test_duplicate_finder_exact_and_near():
    base = "星辰科技2023年实现营业收入12.35亿元，同比增长15.20%；归母净利润1.20亿元，同比增长8.00%。" * 2
    found = find_duplicates([
        ("a", base),
        ("b", base.replace("，", ", ")),  # punctuation only: exact after normalising
        ("c", base + "（来源：财经快讯）"),
        ("d", "完全不同的一段文字，讲的是另一家公司的现金流量和资产负债情况。"),
    ], threshold=0.7, shingle_size=5, num_perm=128)
    assert found[0] == (None, None)
    assert found[1][0] and "a" in found[1][0] and found[1][1] is None
    assert found[2][0] is None and found[2][1] and "with a" in found[2][1]
    assert found[3] == (None, None)


def test_detectors_against_embedded_labels():
    before, _, _ = embedded_rows(companies=20)
    corpus = [row for row in before if "text" in row]
    verdicts = run_detectors(corpus, 60, 0.8, 5, 128, "test")
    for detector, label in (("html", "html"), ("pii", "pii"), ("boilerplate", "boilerplate")):
        flagged = [row for row, v in zip(corpus, verdicts) if detector in v]
        labelled = [row for row in corpus if label in row["noise"]]
        assert labelled, label
        assert all(label in row["noise"] for row in flagged), detector  # precision 1
        assert len(flagged) == len(labelled), detector  # recall 1
    clean = [v for row, v in zip(corpus, verdicts) if not row["noise"]]
    assert sum(1 for v in clean if v) / len(clean) < 0.01  # clean documents are (almost) never flagged


# --------------------------------------------------------------------------------------------- metrics


def test_category_distribution_head_and_tail():
    rows = [{"task": "a"}] * 80 + [{"task": "b"}] * 10 + [{"task": "c"}] * 6 + [{"task": "d"}] * 4 + [{"x": 1}]
    dist = category_distribution(rows, "task", head_share=0.8)
    assert dist["counts"] == {"a": 80, "b": 10, "c": 6, "d": 4}
    assert dist["head"] == ["a"] and dist["tail"] == ["b", "c", "d"]
    assert dist["tail_share"] == 0.2 and dist["imbalance_ratio"] == 20.0
    assert category_distribution(rows, "industry", 0.8) is None


def test_term_coverage_counts_records_and_missing_terms():
    rows = [{"text": "营业收入增长，Revenue up"}, {"text": "毛利率下降"}, {"text": "无关内容"}]
    coverage = term_coverage(rows, ["营业收入", "revenue", "毛利率", "商誉"])
    assert coverage["covered"] == 3 and coverage["coverage"] == 0.75
    assert coverage["missing_terms"] == ["商誉"]
    assert coverage["records_with_a_term_rate"] == round(2 / 3, 4)


def test_growth_check_recomputes_the_shown_formula():
    def row(text: str, value: float) -> dict:
        return {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": text}],
                "answer": {"value": value}}

    good = "（本期−上期）/上期 = (12.35亿元−10.00亿元)/10.00亿元 = 23.50%，同比增长23.50%。"
    assert growth_check(row(good, 23.5)) is True
    assert growth_check(row(good, 22.0)) is False  # the ground truth disagrees with the text
    assert growth_check(row(good.replace("23.50%，", "25.00%，"), 25.0)) is False  # wrong arithmetic
    normalised = "(1235000000元−1000000000元)/1000000000元 = 23.50%"
    assert growth_check(row(normalised, 23.5)) is True
    assert growth_check(row("no formula here", 1.0)) is None


# ------------------------------------------------------------------------------- precision and recall


def test_cleaning_vs_labels_on_hand_made_rows():
    before = [
        {"id": "html", "text": "<p>营业收入12.35亿元。</p>", "noise": ["html"]},  # repaired: TP
        {"id": "wide", "text": "营业收入１２.３５亿元。", "noise": []},  # only canonicalised: strict FP, repair TN
        {"id": "near", "text": "营业收入12.35亿元（完）。", "noise": ["near_duplicate"]},  # unchanged: FN
        {"id": "good", "text": "Clean text.", "noise": []},  # wrongly dropped: FP
        {"id": "frag", "text": "营业收", "noise": ["fragment"]},  # dropped: TP
    ]
    canonical = ["unicode_normalize", "normalize_numbers"]  # what the stream counted for each kept row
    after = [
        {"id": "html", "text": "营业收入1235000000元。", "noise": ["html"], "modified_by": ["strip_html", *canonical]},
        {"id": "wide", "text": "营业收入1235000000元。", "noise": [], "modified_by": canonical},
        {"id": "near", "text": "营业收入1235000000元(完)。", "noise": ["near_duplicate"], "modified_by": canonical},
    ]
    dropped = [{"id": "good", "reason": "min_length", "text": "Clean text."},
               {"id": "frag", "reason": "min_length", "text": "营业收"}]
    result = cleaning_vs_labels(before, after, dropped, [{}, {}, {}], QualityConfig())
    assert (result["repair"]["tp"], result["repair"]["fp"], result["repair"]["fn"], result["repair"]["tn"]) == (2, 1, 1, 1)
    assert (result["strict"]["tp"], result["strict"]["fp"], result["strict"]["fn"], result["strict"]["tn"]) == (3, 2, 0, 0)
    # recall: of the 3 labelled noisy records, min_length caught the fragment and strip_html the html one
    assert result["by_op"]["drop:min_length"] == {"flagged": 2, "clean_flagged": 1, "precision": 0.5,
                                                  "recall": round(1 / 3, 4)}
    assert result["by_op"]["strip_html"]["clean_flagged"] == 0
    assert result["by_op"]["strip_html"]["recall"] == round(1 / 3, 4)
    assert result["by_label"]["near_duplicate"]["missed"] == 1
    assert result["residual_rate_after"] == round(1 / 3, 4)  # the near duplicate is still there


def test_no_labels_means_no_precision_section():
    rows = [{"id": "1", "text": "Clean text one."}]
    assert cleaning_vs_labels(rows, rows, [], [{}], QualityConfig()) is None


# --------------------------------------------------------------------------------------------- report


@pytest.fixture(scope="module")
def embedded_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("quality")
    before, after, dropped = embedded_rows()
    return out, build_quality_report(before, after, dropped, out), (before, after, dropped)


def test_report_measures_the_targets_on_the_embedded_corpus(embedded_report):
    _, report, (before, after, dropped) = embedded_report
    summary = report["summary"]
    assert summary["reconciles"] and summary["records_before"] == len(before) == len(after) + len(dropped)
    # The embedded corpus is ~18% noisy; the default chain leaves ≤ 3.7% and flags no clean document.
    assert 0.15 < summary["labelled_noise_rate_before"] < 0.21
    assert summary["labelled_residual_noise_rate_after"] <= 0.037
    assert summary["noise_rate_after"] < summary["noise_rate_before"] / 3
    assert summary["precision"] >= 0.95 and summary["targets"]["precision"]["met"]
    # Strict reading: number/width normalisation rewrites clean records too, which the report says.
    assert summary["strict_precision"] < 0.5 and not summary["targets"]["strict_precision"]["met"]
    assert any("unicode_normalize" in line for line in summary["explanation"])
    labels = report["cleanliness"]["cleaning_vs_labels"]
    assert labels["unaccounted"] == 0
    assert labels["by_label"]["html"]["recall"] == 1.0
    assert labels["by_label"]["near_duplicate"]["missed"] > 0  # no near-dup operator in the default chain


def test_report_sections_and_drop_examples(embedded_report):
    _, report, (_, _, dropped) = embedded_report
    reasons = report["cleanliness"]["drop_reasons"]
    assert {reason: entry["count"] for reason, entry in reasons.items()} == {
        reason: sum(1 for row in dropped if row["reason"] == reason) for reason in {row["reason"] for row in dropped}
    }
    assert all(1 <= len(entry["examples"]) <= 3 for entry in reasons.values())
    assert report["coverage"]["categories"]["task"]["before"]["counts"].keys() == set(TASKS)
    assert len(report["coverage"]["categories"]["industry"]["before"]["counts"]) == 12
    assert report["coverage"]["terms"]["after"]["covered"] > 10
    assert report["consistency"]["after"]["instructions"]["growth_answers_consistent_rate"] == 1.0
    assert report["consistency"]["before"]["corpus"]["one_number_format_rate"] < 1.0
    assert report["consistency"]["after"]["corpus"]["one_number_format_rate"] == 1.0
    corpus_after = report["cleanliness"]["detectors"]["after"]["corpus"]["detectors"]
    assert corpus_after["html"]["count"] == corpus_after["pii"]["count"] == corpus_after["exact_dup"]["count"] == 0


def test_report_files_are_consistent_and_self_contained(embedded_report):
    out, report, _ = embedded_report
    on_disk = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert on_disk["summary"] == json.loads(json.dumps(report["summary"]))
    markdown = (out / "report.md").read_text(encoding="utf-8")
    for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown):
        assert (out / image).is_file() and (out / image).read_bytes()[:4] == b"\x89PNG"
    assert "## Consistency" in markdown and "## Coverage" in markdown and "## Cleanliness" in markdown
    html = (out / "report.html").read_text(encoding="utf-8")
    assert html.count("data:image/png;base64,") >= 5
    assert 'src="figures/' not in html
    assert "precision" in html and "Drop reasons" in html


def test_quality_config_is_strict():
    with pytest.raises(ValueError, match="extra"):
        QualityConfig(colour="red")
    with pytest.raises(ValueError, match="extra"):  # the report reads what the stream counted, no chain to replay
        QualityConfig(ops=[{"op": "strip_html"}])


def test_report_rejects_a_missing_term_list(tmp_path):
    with pytest.raises(UserError, match="file not found"):
        build_quality_report([], [], [], tmp_path, QualityConfig(terms=str(tmp_path / "nope.txt"), plots=False))


def test_yaml_errors_name_the_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\nb: 3\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"bad\.yaml:\d+: invalid YAML"):
        read_yaml(bad)


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_report_from_files(tmp_path):
    before, after, dropped = embedded_rows(companies=8)
    write_jsonl(tmp_path / "before.jsonl", before)
    write_jsonl(tmp_path / "kept.jsonl", after)
    write_jsonl(tmp_path / "dropped.jsonl", dropped)
    terms = tmp_path / "terms.txt"
    terms.write_text("# mine\n营业收入\n商誉\n", encoding="utf-8")
    out = tmp_path / "report"
    assert run_cli("report", "--before", str(tmp_path / "before.jsonl"), "--after", str(tmp_path / "kept.jsonl"),
                   "--dropped", str(tmp_path / "dropped.jsonl"), "--out", str(out), "--terms", str(terms),
                   "--no-plots") == 0
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    counts = manifest["counts"]
    assert counts["read"] == counts["kept"] + counts["dropped"] == len(before)
    assert manifest["outputs"] == {"json": "report.json", "markdown": "report.md", "html": "report.html"}
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["coverage"]["terms"]["after"]["terms"] == 2
    assert report["coverage"]["terms"]["after"]["missing_terms"] == ["商誉"]


def test_cli_report_embedded_default(tmp_path):
    out = tmp_path / "r"
    assert run_cli("report", "--out", str(out), "--companies", "6", "--no-plots") == 0
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["counts"]["read"] == manifest["counts"]["kept"] + manifest["counts"]["dropped"]
    assert "precision" in manifest["summary"]


def test_cli_report_errors(tmp_path):
    before = tmp_path / "before.jsonl"
    before.write_text('{"id": "1", "text": "ok"}\nnot json\n', encoding="utf-8")
    with pytest.raises(UserError, match="--after"):
        run_cli("report", "--before", str(before), "--out", str(tmp_path / "o"))
    with pytest.raises(UserError, match=r"before\.jsonl:2: invalid JSON"):
        run_cli("report", "--before", str(before), "--after", str(before), "--out", str(tmp_path / "o"))
    with pytest.raises(UserError, match="--near-dup-threshold"):
        run_cli("report", "--out", str(tmp_path / "o"), "--near-dup-threshold", "2")
