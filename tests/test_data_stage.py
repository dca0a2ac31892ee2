"""The data stage end to end through `run_pipeline`: outputs, accounting, splits, input formats, errors."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from lmsmith.datasets.finance import TASKS, generate
from lmsmith.errors import UserError
from lmsmith.pipeline import run_pipeline
from lmsmith.recipe import validate_recipe

SPLITS = ("train", "val", "test")


def run_data(run_dir: Path, data: dict | None = None, base_dir: Path | None = None):
    recipe = validate_recipe({"data": data or {}}, base_dir=base_dir)
    return run_pipeline(recipe, run_dir, only="data")["data"]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def embedded_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("embedded")
    manifest = run_data(run_dir)
    return run_dir / "data", manifest


def test_outputs_follow_the_contract(embedded_run):
    stage_dir, manifest = embedded_run
    expected = {f"corpus_{s}": f"corpus/{s}.jsonl" for s in SPLITS}
    expected |= {f"sft_{s}": f"sft/{s}.jsonl" for s in SPLITS}
    expected |= {"stats": "stats.json", "dropped": "dropped.jsonl"}
    expected |= {f"quality_{kind}": f"quality/report.{kind}" for kind in ("json", "md", "html")}
    assert {name: out["path"] for name, out in manifest.outputs.items()} == expected
    for split in SPLITS:
        for row in read_jsonl(stage_dir / f"corpus/{split}.jsonl"):
            assert set(row) == {"id", "text", "source", "noise"} and row["text"].strip()
        for row in read_jsonl(stage_dir / f"sft/{split}.jsonl"):
            assert set(row) == {"id", "task", "messages", "answer"}
            assert row["messages"][-1]["role"] == "assistant"
    assert manifest.wall_time_s < 15


def test_accounting_reconciles(embedded_run):
    stage_dir, manifest = embedded_run
    stats = json.loads((stage_dir / "stats.json").read_text())
    dropped_rows = read_jsonl(stage_dir / "dropped.jsonl")
    assert all(row["reason"] for row in dropped_rows)
    for kind, prefix in (("corpus", "corpus"), ("instructions", "sft")):
        section = stats[kind]
        assert section["read"] == section["kept"] + section["dropped"]
        assert section["dropped"] == sum(section["dropped_by"].values())
        rows = [row for row in dropped_rows if row["kind"] == kind]
        assert Counter(row["reason"] for row in rows) == Counter(section["dropped_by"])
        for split in SPLITS:
            per_split = section["splits"][split]
            assert per_split["read"] == per_split["kept"] + per_split["dropped"]
            assert per_split["kept"] == len(read_jsonl(stage_dir / f"{prefix}/{split}.jsonl"))
            assert per_split["dropped"] == sum(1 for row in rows if row["split"] == split)
        for reason, count in section["dropped_by"].items():
            assert count == sum(section["splits"][s]["dropped_by"].get(reason, 0) for s in SPLITS)
        assert manifest.metrics[f"{prefix}_read"] == section["read"]
    # The embedded corpus has duplicates, fragments and boilerplate-only pages: all three operators fire.
    assert {"exact_dedup", "min_length", "remove_boilerplate"} <= set(stats["corpus"]["dropped_by"])
    assert stats["corpus"]["read"] == len(generate().documents)


def test_noise_rate_drops(embedded_run):
    stage_dir, manifest = embedded_run
    noise = json.loads((stage_dir / "stats.json").read_text())["corpus"]["noise"]
    assert 0.15 <= noise["rate_before"] <= 0.2
    assert noise["rate_after"] < noise["rate_before"]
    assert noise["residual_rate_after"] < 0.08
    labels = noise["labels"]
    assert labels["exact_duplicate"]["remaining"] == 0
    assert labels["html"]["remaining"] == labels["pii"]["remaining"] == 0
    for counts in labels.values():
        assert counts["read"] == counts["dropped"] + counts["repaired"] + counts["remaining"]
    assert manifest.metrics["noise_rate_before"] == noise["rate_before"]
    kept = [row for split in SPLITS for row in read_jsonl(stage_dir / f"corpus/{split}.jsonl")]
    assert not any("<p>" in row["text"] or "@" in row["text"] or "免责声明" in row["text"] for row in kept)


def test_split_is_grouped_without_leaks(embedded_run):
    stage_dir, _ = embedded_run
    dataset = generate()
    doc_group = {doc.id: doc.group for doc in dataset.documents}
    instruction_group = {i.id: i.group for i in dataset.instructions}
    split_of_group: dict[str, str] = {}
    counts = Counter()
    for split in SPLITS:
        for prefix, groups in (("corpus", doc_group), ("sft", instruction_group)):
            for row in read_jsonl(stage_dir / f"{prefix}/{split}.jsonl"):
                group = groups[row["id"]]
                assert split_of_group.setdefault(group, split) == split, f"{group} leaks across splits"
                counts[(prefix, split)] += 1
    for prefix in ("corpus", "sft"):
        total = sum(counts[(prefix, s)] for s in SPLITS)
        assert abs(counts[(prefix, "train")] / total - 0.8) < 0.05
        assert abs(counts[(prefix, "val")] / total - 0.1) < 0.04
        assert abs(counts[(prefix, "test")] / total - 0.1) < 0.04
    tasks = Counter(row["task"] for row in read_jsonl(stage_dir / "sft/test.jsonl"))
    assert set(tasks) == set(TASKS)


def test_numbers_are_normalised_consistently_in_instructions(embedded_run):
    stage_dir, _ = embedded_run
    rows = read_jsonl(stage_dir / "sft/train.jsonl")
    for row in rows:
        prompt, reply = row["messages"][0]["content"], row["messages"][-1]["content"]
        assert "亿元" not in prompt and "亿元" not in reply
        if row["task"] == "yoy":
            # "(本期−上期)/上期 = (A元−B元)/B元 = g%": both amounts are copied from the prompt.
            current, previous = reply.split("= (", 1)[1].split(")/", 1)[0].split("−")
            assert current in prompt and previous in prompt
            assert f"{row['answer']['value']:.2f}%" in reply
        if row["task"] == "entities":
            assert json.loads(reply) == row["answer"]
        if row["task"] == "report":
            assert reply == row["answer"]["text"]


@pytest.mark.slow
def test_rerun_is_deterministic_and_split_seed_matters(tmp_path, embedded_run):
    _, first = embedded_run
    again = run_data(tmp_path / "again")
    assert {n: o["hash"] for n, o in again.outputs.items()} == {n: o["hash"] for n, o in first.outputs.items()}
    reseeded = run_data(tmp_path / "reseeded", {"split": {"seed": 1}})
    assert reseeded.outputs["corpus_test"]["hash"] != first.outputs["corpus_test"]["hash"]
    assert reseeded.metrics["corpus_kept"] == first.metrics["corpus_kept"]


def test_no_ops_and_no_dedup_keep_everything(tmp_path):
    manifest = run_data(tmp_path, {"ops": [], "exact_dedup": False, "near_dedup": {"enabled": False},
                                   "embedded": {"companies": 5}})
    dataset = generate(companies=5)
    assert manifest.metrics["corpus_kept"] == manifest.metrics["corpus_read"] == len(dataset.documents)
    assert manifest.metrics["sft_kept"] == len(dataset.instructions)
    rows = [row for s in SPLITS for row in read_jsonl(tmp_path / "data" / f"corpus/{s}.jsonl")]
    assert {row["text"] for row in rows} == {doc.text for doc in dataset.documents}


def _write_lines(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def test_alpaca_sharegpt_and_text_inputs(tmp_path):
    inputs = tmp_path / "inputs"
    (inputs / "corpus").mkdir(parents=True)
    long_a = "星辰科技2023年营业收入为12.5亿元，同比增长15.2%，毛利率为42.3%，经营活动现金流量净额为2.8亿元。"
    long_b = "华信银行2022年总资产为520亿元，资产负债率为61.2%，全年实现归母净利润3.1亿元，同比增长8.0%。"
    (inputs / "corpus" / "a.txt").write_text(f"{long_a}\n\n\n{long_b}\n\n短句。\n", encoding="utf-8")
    _write_lines(inputs / "corpus" / "b.jsonl", [{"text": long_a, "id": "dup"}, {"text": long_b + "第二份。"}])
    instructions = _write_lines(
        inputs / "chat.jsonl",
        [
            {"instruction": "计算同比增长率", "input": "本期13.8亿元，上期12亿元", "output": "同比增长15.00%。"},
            {"conversations": [
                {"from": "system", "value": "你是金融助手。"},
                {"from": "human", "value": "营收1.2 billion是多少？"},
                {"from": "gpt", "value": "120,000,000的十倍。"},
            ], "task": "qa", "group": "g1"},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
             "answer": {"value": 1.5}},
            {"instruction": "计算同比增长率", "input": "本期13.8亿元，上期12亿元", "output": "同比增长15.00%。"},
        ],
    )
    manifest = run_data(tmp_path / "run", {"corpus": "inputs/corpus", "instructions": "inputs/chat.jsonl"},
                        base_dir=tmp_path)
    stage_dir = tmp_path / "run" / "data"
    stats = json.loads((stage_dir / "stats.json").read_text())

    assert stats["corpus"]["read"] == 5
    # b.jsonl:2 is a.txt:4 plus four characters: a near duplicate (in its split, or a leak across splits).
    dropped_by = dict(stats["corpus"]["dropped_by"])
    near = dropped_by.pop("near_dedup", 0) + dropped_by.pop("near_dedup_leak", 0)
    assert dropped_by == {"exact_dedup": 1, "min_length": 1} and near == 1
    assert "noise" not in stats["corpus"]
    corpus = {row["id"]: row for s in SPLITS for row in read_jsonl(stage_dir / f"corpus/{s}.jsonl")}
    assert set(corpus) == {"a.txt:1", "a.txt:4"}
    assert corpus["a.txt:1"]["text"].startswith("星辰科技2023年营业收入为1250000000元,")
    assert corpus["a.txt:1"]["source"] == "a.txt"

    assert stats["instructions"]["read"] == 4
    assert stats["instructions"]["dropped_by"] == {"exact_dedup": 1}
    sft = {row["id"]: row for s in SPLITS for row in read_jsonl(stage_dir / f"sft/{s}.jsonl")}
    assert set(sft) == {"chat.jsonl:1", "chat.jsonl:2", "chat.jsonl:3"}
    alpaca = sft["chat.jsonl:1"]
    assert alpaca["task"] == "general"
    assert alpaca["messages"] == [
        {"role": "user", "content": "计算同比增长率\n\n本期1380000000元,上期1200000000元"},
        {"role": "assistant", "content": "同比增长15.00%。"},
    ]
    assert alpaca["answer"] == {"text": "同比增长15.00%。"}
    sharegpt = sft["chat.jsonl:2"]
    assert [m["role"] for m in sharegpt["messages"]] == ["system", "user", "assistant"]
    assert sharegpt["task"] == "qa"
    assert sharegpt["messages"][1]["content"] == "营收1200000000是多少?"
    assert sharegpt["messages"][2]["content"] == "120000000的十倍。" == sharegpt["answer"]["text"]
    assert sft["chat.jsonl:3"]["answer"] == {"value": 1.5}  # short, but min_length is corpus-only
    assert manifest.metrics["sft_kept"] == 3


@pytest.mark.parametrize(
    ("lines", "line_number", "message"),
    [
        ([{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "d"}, '{"instruction": "x",'], 3,
         "invalid JSON"),
        ([{"instruction": "a", "output": "b"}, {"prompt": "a", "completion": "b"}], 2, "not an instruction record"),
        (["", {"conversations": [{"from": "alien", "value": "x"}]}], 2, "unknown speaker 'alien'"),
        ([{"instruction": "a"}], 1, "alpaca record needs a string 'output'"),
        ([{"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]}], 1,
         "the last turn must be the assistant's answer"),
        ([["not", "an", "object"]], 1, "expected a JSON object"),
    ],
)
def test_malformed_instruction_lines_name_file_and_line(tmp_path, lines, line_number, message):
    path = _write_lines(tmp_path / "bad.jsonl", lines)
    with pytest.raises(UserError) as error:
        run_data(tmp_path / "run", {"corpus": "embedded:finance", "instructions": str(path),
                                    "embedded": {"companies": 2}})
    assert f"{path}:{line_number}:" in str(error.value)
    assert message in str(error.value)


def test_malformed_corpus_line_names_file_and_line(tmp_path):
    path = _write_lines(tmp_path / "corpus.jsonl", [{"text": "好的文本"}, {"body": "no text field"}])
    with pytest.raises(UserError, match=rf"{path}:2: a corpus line needs a string field 'text'"):
        run_data(tmp_path / "run", {"corpus": str(path), "embedded": {"companies": 2}})


def test_empty_folder_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no .jsonl, .json, .csv, .parquet, .txt, .md files in this folder"):
        run_data(tmp_path / "run", {"corpus": str(tmp_path / "empty"), "embedded": {"companies": 2}})
