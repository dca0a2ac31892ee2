"""`lmsmith eval curve`: sft again on shares of a finished run's data with one step budget, every model
scored on the same tasks, each metric plotted against the data size."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmsmith.artifacts import Manifest
from lmsmith.cli import main

DEMO = Path(__file__).resolve().parents[1] / "recipes" / "finance-demo.yaml"
TINY = [
    "data.embedded.companies=6", "data.embedded.years=2", "tokenizer.vocab_size=400",
    "pretrain.model={hidden_size: 32, num_layers: 1, num_heads: 2, num_kv_heads: 1, intermediate_size: 64}",
    "pretrain.max_steps=3", "pretrain.seq_len=64", "sft.max_steps=5", "sft.batch_size=4", "sft.val_generations=0",
]


@pytest.mark.slow
def test_learning_curve_trains_each_share_with_the_same_budget(tmp_path, capsys):
    run = tmp_path / "run"
    for stage in ("data", "tokenizer", "pretrain", "sft"):
        stage_args = ["run", str(DEMO), "--out", str(run), "--only", stage]
        for item in TINY:
            stage_args += ["--set", item]
        assert main(stage_args) == 0, stage
    task = tmp_path / "answers.yaml"
    task.write_text(f"name: answers\ntype: generate\ndataset: {run / 'data' / 'sft' / 'test.jsonl'}\n"
                    "format: messages\nmax_new_tokens: 6\nlimit: 4\n", encoding="utf-8")
    out = tmp_path / "curve"
    curve = ["eval", "curve", str(run), "--fraction", "0.5", "--fraction", "1.0", "--task", str(task), "--out", str(out)]
    assert main(curve) == 0
    results = json.loads((out / "results.json").read_text())
    sizes = results["training_conversations"]
    full = Manifest.read(run / "data").metrics["sft_train"]
    assert sizes == {"50%": -(-full // 2), "100%": full}
    assert results["steps"] == 5
    for share in (50, 100):
        trained = Manifest.read(out / f"fraction-{share}" / "sft")
        subset = Manifest.read(out / f"fraction-{share}" / "data")
        assert trained.metrics["steps"] == 5 and subset.metrics["sft_train"] == sizes[f"{share}%"]
        assert trained.metrics["train_rows"] + trained.metrics["skipped_too_long"] >= sizes[f"{share}%"]
    assert list(results["tasks"]["answers"]["scores"]) == ["50%", "100%"]
    assert (out / "plots" / "curve.png").stat().st_size > 1000 and "plots/curve.png" in (out / "table.md").read_text()
    capsys.readouterr()
    assert main(curve) == 0  # a second call reuses the trained fractions
    assert "skip sft" in capsys.readouterr().out
