"""The recipe's data stage reads every format `lmsmith data clean` reads, and runs on Ray with the same
outputs as on local processes."""

from __future__ import annotations

import csv
import gzip
import json
import os
from pathlib import Path

import pytest

from lmsmith.datasets.finance import generate
from lmsmith.errors import UserError
from lmsmith.pipeline import run_pipeline
from lmsmith.recipe import validate_recipe

SPLITS = ("train", "val", "test")
OUTPUTS = [f"{prefix}/{split}.jsonl" for prefix in ("corpus", "sft") for split in SPLITS] + ["dropped.jsonl", "stats.json"]


def _inputs(tmp_path: Path) -> tuple[Path, Path]:
    """A parquet corpus and a gzipped csv of alpaca instructions, from the embedded finance data."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    dataset = generate(companies=8)
    corpus = tmp_path / "corpus.parquet"
    docs = dataset.documents
    pq.write_table(pa.table({"id": [d.id for d in docs], "text": [d.text for d in docs],
                             "group": [d.group for d in docs]}), corpus, row_group_size=50)
    instructions = tmp_path / "instructions.csv.gz"
    with gzip.open(instructions, "wt", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["id", "group", "task", "instruction", "input", "output"])
        writer.writeheader()
        for item in dataset.instructions:
            user = [m["content"] for m in item.messages if m["role"] == "user"][-1]
            writer.writerow({"id": item.id, "group": item.group, "task": item.task, "instruction": user,
                             "input": "", "output": item.messages[-1]["content"]})
    return corpus, instructions


def _run(run_dir: Path, data: dict, base_dir: Path):
    recipe = validate_recipe({"data": {"quality": None, **data}}, base_dir=base_dir)
    return run_pipeline(recipe, run_dir, only="data")["data"]


def test_parquet_corpus_and_gzipped_csv_instructions(tmp_path):
    corpus, instructions = _inputs(tmp_path)
    manifest = _run(tmp_path / "run", {"corpus": str(corpus), "instructions": str(instructions)}, tmp_path)
    dataset = generate(companies=8)
    stage = tmp_path / "run" / "data"
    stats = json.loads((stage / "stats.json").read_text(encoding="utf-8"))
    assert stats["corpus"]["read"] == len(dataset.documents)
    assert stats["instructions"]["read"] == len(dataset.instructions)
    for kind in ("corpus", "instructions"):
        steps = stats[kind]["steps"]
        assert all(step["in"] == step["out"] + step["dropped"] for step in steps)
        assert steps[-1]["out"] == stats[kind]["kept"]
    # The corpus's own ids and groups survive; the groups decide the split.
    split_of: dict[str, str] = {}
    group_of = {d.id: d.group for d in dataset.documents} | {i.id: i.group for i in dataset.instructions}
    for prefix in ("corpus", "sft"):
        for split in SPLITS:
            for line in (stage / prefix / f"{split}.jsonl").read_text(encoding="utf-8").splitlines():
                row = json.loads(line)
                assert split_of.setdefault(group_of[row["id"]], split) == split
    sft = [json.loads(line) for line in (stage / "sft" / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    assert sft and all(row["messages"][0]["role"] == "user" and row["task"] != "general" for row in sft)
    assert "亿元" not in "".join(row["messages"][-1]["content"] for row in sft)  # the operators ran on csv text
    assert manifest.metrics["corpus_kept"] == stats["corpus"]["kept"] > 0


def test_a_bad_row_in_a_gzipped_csv_names_its_line(tmp_path):
    bad = tmp_path / "bad.csv.gz"
    with gzip.open(bad, "wt", encoding="utf-8") as handle:
        handle.write("instruction,output\n问题,回答\n只有问题,\n")
    with pytest.raises(UserError, match=rf"{bad}:3: alpaca record needs a string 'output'"):
        _run(tmp_path / "run", {"instructions": str(bad), "embedded": {"companies": 2}}, tmp_path)


def test_ray_address_needs_the_ray_executor(tmp_path):
    with pytest.raises(UserError, match="ray_address is only used with executor: ray"):
        validate_recipe({"data": {"ray_address": "auto"}})


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ray_executor_writes_what_local_processes_write(tmp_path):
    pytest.importorskip("ray")
    corpus, instructions = _inputs(tmp_path)
    data = {"corpus": str(corpus), "instructions": str(instructions), "batch_size": 32, "shard_bytes": 50_000}
    local = _run(tmp_path / "local", {**data, "executor": "local", "workers": 2}, tmp_path)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    remote = _run(tmp_path / "ray", {**data, "executor": "ray", "workers": 2}, tmp_path)
    for name in OUTPUTS:
        ours, theirs = tmp_path / "local" / "data" / name, tmp_path / "ray" / "data" / name
        if name == "stats.json":  # the executor is named in it; everything else must agree
            first, second = json.loads(ours.read_text()), json.loads(theirs.read_text())
            assert first.pop("executor") != second.pop("executor") and first == second
        else:
            assert ours.read_bytes() == theirs.read_bytes(), name
    assert len(json.loads((tmp_path / "local" / "data" / "stats.json").read_text())["shards"]) > 1
    assert remote.metrics == local.metrics


def test_amounts_from_real_news_are_normalised_and_approximate_ones_counted(tmp_path):
    corpus = tmp_path / "news.jsonl"
    texts = [
        "公司2024年营业收入为7.1 亿元，同比增长12.5%，经营活动现金流量净额为-118.35 亿元，主要受回款节奏影响。",
        "行业规模已达数千亿元，龙头企业亿纬锂能全年出货量保持增长，公司计划投资500多亿元建设新基地并扩充产能。",
    ]
    corpus.write_text("".join(json.dumps({"text": text}, ensure_ascii=False) + "\n" for text in texts), encoding="utf-8")
    _run(tmp_path / "run", {"corpus": str(corpus), "embedded": {"companies": 2}, "split": {"ratios": [1, 0, 0]}},
         tmp_path)
    stage = tmp_path / "run" / "data"
    kept = [json.loads(line)["text"] for line in (stage / "corpus" / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    assert "710000000元" in kept[0] and "-11835000000元" in kept[0]
    assert "数千亿元" in kept[1] and "500多亿元" in kept[1] and "亿纬锂能" in kept[1]
    stats = json.loads((stage / "stats.json").read_text(encoding="utf-8"))
    assert stats["corpus"]["tags"] == {"normalize_numbers:approximate_amount": 2}


def test_an_operator_file_resolves_against_the_recipe_folder_and_reruns_the_stage(tmp_path):
    from lmsmith.pipeline import external_inputs

    (tmp_path / "words.txt").write_text("广告\n", encoding="utf-8")
    recipe = validate_recipe({"data": {"ops": [{"op": "blacklist", "file": "words.txt"}]}}, base_dir=tmp_path)
    assert recipe.data.ops[0]["file"] == str((tmp_path / "words.txt").resolve())
    assert external_inputs(recipe.data) == {"ops.0.file": (tmp_path / "words.txt").resolve()}
    with pytest.raises(UserError, match=r"data.ops.0: blacklist.file: file not found: .*nope.txt"):
        validate_recipe({"data": {"ops": [{"op": "blacklist", "file": "nope.txt"}]}}, base_dir=tmp_path)


def test_on_error_skip_drops_malformed_rows_with_their_line(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    good = "公司2024年营业收入为7.1亿元，同比增长12.5%，经营活动现金流量净额为2.3亿元，主要受回款节奏影响。"
    corpus.write_text(json.dumps({"text": good}, ensure_ascii=False) + "\n{broken\n"
                      + json.dumps({"body": "no text"}) + "\n", encoding="utf-8")
    with pytest.raises(UserError, match=rf"{corpus}:2: invalid JSON"):
        _run(tmp_path / "strict", {"corpus": str(corpus), "embedded": {"companies": 2}}, tmp_path)
    recipe = validate_recipe({"data": {"corpus": str(corpus), "embedded": {"companies": 2}, "on_error": "skip"}},
                             base_dir=tmp_path)  # the quality report on: its sample must pass malformed rows by
    manifest = run_pipeline(recipe, tmp_path / "run", only="data")["data"]
    dropped = [json.loads(line) for line in (tmp_path / "run" / "data" / "dropped.jsonl").read_text().splitlines()]
    reads = [row for row in dropped if row["reason"] == "read"]
    assert [row["detail"] for row in reads] == [f"{corpus}:2: invalid JSON: Expecting property name enclosed in "
                                               "double quotes (column 2)",
                                               f"{corpus}:3: a corpus line needs a string field 'text'"]
    assert reads[1]["record"] == {"body": "no text"}
    assert manifest.metrics["corpus_read"] == 3 and manifest.metrics["corpus_kept"] == 1
