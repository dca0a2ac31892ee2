"""`lmsmith data clean/split/ops`: readers for every format, malformed records, accounting on every
input, sharding, near duplicates, splits with leak removal, and the CLI wiring."""

from __future__ import annotations

import argparse
import csv
import gzip
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmsmith.data.cli import add_data_parser, describe_operators, load_pipeline
from lmsmith.data.config import PipelineConfig
from lmsmith.data.clean import run_clean
from lmsmith.data.io import iter_records
from lmsmith.data.minhash import MinHasher, estimated_jaccard, near_duplicates
from lmsmith.errors import UserError

LONG_A = "星辰科技2023年营业收入为12.5亿元，同比增长15.2%，毛利率为42.3%，经营活动现金流量净额为2.8亿元。"
LONG_B = "华信银行2022年总资产为520亿元，资产负债率为61.2%，全年实现归母净利润3.1亿元，同比增长8.0%。"
LONG_C = "Xingchen Tech reported revenue of RMB 1.25 billion in FY2023, up 15.2% year over year, margins widened."


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def clean(input_path: Path, out: Path, **kwargs) -> dict:
    """Run the cleaner and check the accounting, as every test input must reconcile."""
    manifest = run_clean(input_path, out, **kwargs)
    kept, dropped = read_jsonl(out / "kept.jsonl"), read_jsonl(out / "dropped.jsonl")
    counts = manifest["counts"]
    assert counts["read"] == counts["kept"] + counts["dropped"]
    assert counts["kept"] == len(kept) and counts["dropped"] == len(dropped)
    assert all(row["reason"] and "detail" in row for row in dropped)
    reasons = {}
    for row in dropped:
        reasons[row["reason"]] = reasons.get(row["reason"], 0) + 1
    assert reasons == manifest["dropped_by"]
    steps = manifest["steps"]
    assert steps[0]["in"] == counts["read"] and steps[-1]["out"] == counts["kept"]
    for before, after in zip(steps, steps[1:]):
        assert before["out"] == after["in"]
    for step in steps:
        assert step["in"] == step["out"] + step["dropped"]
        assert step["dropped"] == reasons.get(step["step"], 0)
    assert json.loads((out / "manifest.json").read_text()) == manifest
    return manifest


def write_jsonl(path: Path, rows: list) -> Path:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8") as handle:
        for row in rows:
            handle.write((row if isinstance(row, str) else json.dumps(row, ensure_ascii=False)) + "\n")
    return path


def test_every_file_format_is_read(tmp_path):
    folder = tmp_path / "in"
    (folder / "docs").mkdir(parents=True)
    write_jsonl(folder / "a.jsonl.gz", [{"text": LONG_A, "id": "a1"}])
    (folder / "b.json").write_text(json.dumps([{"text": LONG_B}, {"instruction": "计算", "output": "15%"}],
                                              ensure_ascii=False, indent=2), encoding="utf-8")
    with open(folder / "c.csv", "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["instruction", "input", "output", "category"])
        writer.writerow(["总结", "多行\n输入", "营收1.2亿元", "report"])
    pq.write_table(pa.table({"text": [LONG_C], "year": [2023]}), folder / "d.parquet")
    (folder / "docs" / "e.md").write_text(f"# 标题\n\n{LONG_A}\n第二行\n\n\n短\n", encoding="utf-8")
    with gzip.open(folder / "docs" / "f.txt.gz", "wt", encoding="utf-8") as handle:
        handle.write(LONG_B + "\n")
    records = list(iter_records(folder))
    assert [r.where for r in records] == [
        "a.jsonl.gz:1", "b.json:2", "b.json:5", "c.csv:3", "d.parquet:row 1",
        "docs/e.md:1", "docs/e.md:3", "docs/e.md:7", "docs/f.txt.gz:1",
    ]
    assert records[3].row == {"instruction": "总结", "input": "多行\n输入", "output": "营收1.2亿元", "category": "report"}
    assert records[4].row == {"text": LONG_C, "year": 2023}
    assert records[6].row == {"text": f"{LONG_A}\n第二行"}
    whole = list(iter_records(folder / "docs", text_unit="file"))
    assert [r.where for r in whole] == ["e.md:1", "f.txt.gz:1"]

    manifest = clean(folder, tmp_path / "out", plan=PipelineConfig(near_dedup={"enabled": False}))
    assert manifest["counts"] == {"read": 9, "kept": 6, "dropped": 3}
    assert manifest["dropped_by"] == {"min_length": 2, "exact_dedup": 1}
    kept = read_jsonl(tmp_path / "out" / "kept.jsonl")
    assert kept[0] == {"text": LONG_A.replace("12.5亿元", "1250000000元").replace("2.8亿元", "280000000元")
                       .replace("，", ",").replace("。", "。"), "id": "a1"}
    assert {"instruction": "总结", "input": "多行\n输入", "output": "营收120000000元", "category": "report"} in kept
    assert {"text": LONG_C.replace("RMB 1.25 billion", "RMB 1250000000"), "year": 2023} in kept


def test_formats_are_detected_or_named(tmp_path):
    rows = [
        {"instruction": "计算同比", "input": "本期13.8亿元", "output": "同比增长15.00%。", "system": "你是助手"},
        {"conversations": [
            {"from": "human", "value": "营收多少？"}, {"from": "gpt", "value": "1.2亿元"},
            {"from": "human", "value": "净利润呢？"}, {"from": "gpt", "value": "3,000万元"},
        ], "id": "multi"},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "<b>hello</b>"}]},
        {"text": LONG_A},
    ]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    manifest = clean(path, tmp_path / "auto")
    assert manifest["counts"]["kept"] == 4
    kept = read_jsonl(tmp_path / "auto" / "kept.jsonl")
    assert kept[0]["input"] == "本期1380000000元" and kept[0]["system"] == "你是助手"
    assert [turn["value"] for turn in kept[1]["conversations"]] == ["营收多少?", "120000000元", "净利润呢?", "30000000元"]
    assert kept[2]["messages"][1]["content"] == "hello"
    # Named: records of another format are malformed.
    manifest = clean(path, tmp_path / "named", plan=PipelineConfig(format="alpaca"), on_error="skip")
    assert manifest["dropped_by"] == {"read": 3}
    details = [row["detail"] for row in read_jsonl(tmp_path / "named" / "dropped.jsonl")]
    assert details[0] == f"{path}:2: alpaca record needs a string 'instruction'"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"text": "abc",', "invalid JSON"),
        ('["a list"]', "expected a JSON object, got list"),
        ('{"body": "no text"}', "not a known record"),
        ('{"conversations": [{"from": "alien", "value": "x"}]}', "unknown speaker 'alien'"),
        ('{"instruction": 3, "output": "x"}', "alpaca record needs a string 'instruction'"),
    ],
)
def test_malformed_records_fail_with_file_and_line_or_are_skipped(tmp_path, line, message):
    path = write_jsonl(tmp_path / "bad.jsonl.gz", [{"text": LONG_A}, "", line, {"text": LONG_B}])
    with pytest.raises(UserError) as error:
        run_clean(path, tmp_path / "fail")
    assert str(error.value).startswith(f"{path}:3: ") and message in str(error.value)
    manifest = clean(path, tmp_path / "skip", on_error="skip")
    assert manifest["counts"] == {"read": 3, "kept": 2, "dropped": 1}
    dropped = read_jsonl(tmp_path / "skip" / "dropped.jsonl")
    assert dropped[0]["reason"] == "read" and dropped[0]["where"] == "bad.jsonl.gz:3"
    assert message in dropped[0]["detail"]


def test_empty_records_and_whole_record_drops(tmp_path):
    rows = [{"text": "   "}, {"instruction": "", "output": "x"}, {"text": "免责声明：本文仅供参考。"}, {"text": LONG_A}]
    manifest = clean(write_jsonl(tmp_path / "e.jsonl", rows), tmp_path / "out")
    assert manifest["dropped_by"] == {"empty": 2, "remove_boilerplate": 1}


def test_near_duplicates_within_the_input(tmp_path):
    rows = [{"text": LONG_A, "id": "orig"}, {"text": LONG_B},
            {"text": LONG_A.replace("毛利率", "综合毛利率"), "id": "edited"},
            {"text": LONG_A + "（来源：证券时报）", "id": "sourced"}]
    path = write_jsonl(tmp_path / "near.jsonl", rows)
    manifest = clean(path, tmp_path / "out")
    assert manifest["dropped_by"] == {"near_dedup": 2}
    dropped = read_jsonl(tmp_path / "out" / "dropped.jsonl")
    assert {row["id"] for row in dropped} == {"edited", "sourced"}
    assert all("near duplicate of orig" in row["detail"] for row in dropped)
    strict = clean(path, tmp_path / "strict", plan=PipelineConfig(near_dedup={"threshold": 0.99}))
    assert strict["counts"]["kept"] == 4


def test_sharding_and_workers_do_not_change_the_output(tmp_path):
    rows = [{"text": f"{LONG_A}第{i % 40}号。", "id": i} for i in range(120)] + ["{broken"]
    path = write_jsonl(tmp_path / "many.jsonl", rows)
    single = clean(path, tmp_path / "one", on_error="skip")
    sharded = clean(path, tmp_path / "sharded", plan=PipelineConfig(batch_size=7, shard_bytes=2000),
                    workers=2, on_error="skip")
    assert len(sharded["shards"]) > 5 and len(single["shards"]) == 1
    assert sum(shard["records"] for shard in sharded["shards"]) == 121
    for name in ("kept.jsonl", "dropped.jsonl"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "sharded" / name).read_bytes()
    # 40 distinct numbers, each three times; the 40 differ by a digit or two, so all but one are near duplicates.
    assert single["dropped_by"] == {"read": 1, "exact_dedup": 80, "near_dedup": 39}


def test_minhash_estimates_jaccard_and_is_deterministic():
    rng = np.random.default_rng(0)
    alphabet = [chr(c) for c in range(0x4E00, 0x4E00 + 2000)]
    hasher = MinHasher(num_perm=256, unit="char", char_ngram=5)
    errors = []
    for _ in range(40):
        base = "".join(rng.choice(alphabet, 200))
        cut = int(rng.integers(0, 100))
        other = base[: 200 - cut] + "".join(rng.choice(alphabet, cut))
        first = {base[i:i + 5] for i in range(196)}
        second = {other[i:i + 5] for i in range(196)}
        truth = len(first & second) / len(first | second)
        errors.append(estimated_jaccard(hasher.signature(base), hasher.signature(other)) - truth)
    assert abs(np.mean(errors)) < 0.03 and np.max(np.abs(errors)) < 0.15
    assert (MinHasher().signature(LONG_A) == MinHasher().signature(LONG_A)).all()
    keeper = near_duplicates([LONG_A, LONG_C, LONG_A + "。", LONG_C.replace("widened", "widened a lot")])
    assert keeper.tolist() == [0, 1, 0, 1]


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lmsmith")
    add_data_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_clean_with_a_pipeline_file(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": LONG_A}, {"text": "營業收入為1.2億元，歸母淨利潤同比增減5%。"},
                                               {"text": "buy now " * 20}])
    pipeline = tmp_path / "pipe.yaml"
    pipeline.write_text(
        "ops:\n  - {op: to_simplified}\n  - {op: terminology}\n  - {op: normalize_numbers, output: yi}\n"
        "  - {op: word_repetition}\nexact_dedup: true\nnear_dedup: {enabled: false}\n", encoding="utf-8")
    assert _cli(["data", "clean", str(path), "--out", str(tmp_path / "out"), "--pipeline", str(pipeline),
                 "--workers", "2"]) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["counts"] == {"read": 3, "kept": 2, "dropped": 1}
    assert manifest["dropped_by"] == {"word_repetition": 1}
    kept = read_jsonl(tmp_path / "out" / "kept.jsonl")
    assert kept[1]["text"].startswith("营业收入为1.2亿元，净利润同比增长率5%。")
    bad = tmp_path / "bad.yaml"
    bad.write_text("ops:\n  - {op: length, min: -1}\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"bad.yaml: ops.0: length.min:"):
        load_pipeline(bad)
    bad.write_text("opz: []\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"bad.yaml: opz: unknown field"):
        load_pipeline(bad)


def test_cli_ops_lists_every_operator_with_params(capsys):
    assert _cli(["data", "ops", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    by_name = {op["name"]: op for op in listing}
    assert {"normalize_numbers", "mask_pii", "terminology", "language", "perplexity", "fix_mojibake"} <= set(by_name)
    params = {p["name"]: p for p in by_name["normalize_numbers"]["params"]}
    assert params["output"]["default"] == "plain" and params["output"]["description"]
    assert by_name["perplexity"]["kind"] == "filter"
    assert listing == describe_operators()


def test_cli_split_is_stratified_deterministic_and_removes_leaks(tmp_path):
    rows = []
    for i in range(200):
        category = "rare" if i % 10 == 0 else "common"
        rows.append({"id": f"r{i}", "category": category,
                     "text": f"第{i}份报告：公司{i}的营业收入为{i * 7 + 3}亿元，净利润为{i * 3 + 1}亿元，编号{i * 7919 % 10007}。"})
    # Copies of train-bound documents with a small edit: wherever they land outside train they leak.
    copied = [i for i in range(1, 60, 3) if i % 10]
    rows += [{"id": f"copy{i}", "category": "common", "text": rows[i]["text"] + "完"} for i in copied]
    path = write_jsonl(tmp_path / "kept.jsonl", rows)
    out = tmp_path / "split"
    assert _cli(["data", "split", str(path), "--out", str(out), "--stratify", "category", "--ratios", "8:1:1"]) == 0
    report = json.loads((out / "split_report.json").read_text())
    written = {split: read_jsonl(out / f"{split}.jsonl") for split in ("train", "val", "test")}
    assert report["read"] == 200 + len(copied)
    assert sum(report["written"].values()) == report["read"] - report["leaks_removed"]
    assert [report["strata"][split]["rare"] for split in ("train", "val", "test")] == [16, 2, 2]
    assert report["leaks_removed"] > 0
    texts = {split: {row["text"][:-1] if row["id"].startswith("copy") else row["text"] for row in rows_}
             for split, rows_ in written.items()}
    assert not (texts["train"] & texts["val"]) and not (texts["train"] & texts["test"])
    assert sum(report["near_duplicates_within_split"].values()) + report["leaks_removed"] == len(copied)
    again = tmp_path / "again"
    _cli(["data", "split", str(path), "--out", str(again), "--stratify", "category"])
    assert (again / "train.jsonl").read_bytes() == (out / "train.jsonl").read_bytes()
