"""The recipe's data stage runs the optional steps: quality report, synthesis, augmentation, annotation."""

from __future__ import annotations

import json

from lmsmith.data.synth import write_embedded_table
from lmsmith.pipeline import run_pipeline
from lmsmith.recipe import validate_recipe


def _rows(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_data_stage_with_every_step(tmp_path):
    table = write_embedded_table(tmp_path / "table.csv", seed=3, companies=4, years=3)
    recipe = validate_recipe({
        "data": {
            "embedded": {"companies": 12, "years": 3},
            "synth_tables": [str(table)],
            "augment": {"oversample": {"target": "uniform"}},
            "annotate": {},
        }
    })
    manifests = run_pipeline(recipe, tmp_path / "run", only="data")
    data = manifests["data"]
    stage_dir = tmp_path / "run" / "data"
    metrics = data.metrics

    # Synthesized ratio questions exist only because of the table.
    tasks = {row["task"] for split in ("train", "val", "test") for row in _rows(stage_dir / "sft" / f"{split}.jsonl")}
    assert "ratio" in tasks

    # The quality report describes the cleaned data before augmentation.
    report = json.loads((stage_dir / "quality" / "report.json").read_text(encoding="utf-8"))
    assert report["summary"]["records_after"] == metrics["corpus_kept"] + metrics["sft_kept"]
    assert "data:image/png;base64," in (stage_dir / "quality" / "report.html").read_text(encoding="utf-8")
    assert 0 <= metrics["quality_noise_rate_after"] < metrics["quality_noise_rate_before"]

    # Oversampling grew the train split only, and wrote the class weights for training.
    train = _rows(stage_dir / "sft" / "train.jsonl")
    assert len(train) == metrics["sft_train"] + metrics["augment_added"] and metrics["augment_added"] > 0
    weights = json.loads((stage_dir / "class_weights.json").read_text(encoding="utf-8"))
    assert set(weights["counts_after"]) == {row["task"] for row in train}
    assert len(set(weights["counts_after"].values())) == 1  # uniform target reached
    assert len(_rows(stage_dir / "sft" / "test.jsonl")) == metrics["sft_test"]

    # Annotation is exported as CoNLL and scored against the embedded ground truth.
    conll = (stage_dir / "entities.conll").read_text(encoding="utf-8")
    assert "B-COMPANY" in conll or "B-company" in conll.lower()
    assert metrics["entities_f1"] > 0.9

    # Accounting still reconciles.
    assert metrics["corpus_read"] == metrics["corpus_kept"] + metrics["corpus_dropped"]
    assert metrics["sft_read"] == metrics["sft_kept"] + metrics["sft_dropped"]
