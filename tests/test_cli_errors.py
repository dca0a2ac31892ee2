"""Bad input on the command line ends in one line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from lmsmith.cli import main
from test_checkpoint_recipe import RECIPE, SMALL_RUN, qwen_checkpoint


def one_line_error(capsys, argv: list[str]) -> str:
    capsys.readouterr()  # what building the fixtures printed
    assert main(argv) == 2
    err = capsys.readouterr().err
    # Progress bars of the steps that ran before may precede it; the error itself is the last line.
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: ") and sum(line.startswith("error") for line in lines) == 1, lines
    return lines[-1]


def small_run(checkpoint: Path, run_dir: Path) -> list[str]:
    argv = ["run", str(RECIPE), "--out", str(run_dir), "--set", f"model.path={checkpoint}"]
    for item in SMALL_RUN:
        argv += ["--set", item]
    return argv


def test_invalid_yaml_value_in_set(capsys, tmp_path):
    line = one_line_error(capsys, ["run", str(RECIPE), "--set", "sft.optim={lr: [", "--out", str(tmp_path)])
    assert "--set sft.optim={lr: [: invalid YAML value" in line


def test_truncated_weights_name_the_folder(capsys, tmp_path):
    checkpoint = qwen_checkpoint(tmp_path / "checkpoint")
    weights = checkpoint / "model.safetensors"
    with open(weights, "r+b") as handle:
        handle.truncate(os.path.getsize(weights) // 2)
    line = one_line_error(capsys, small_run(checkpoint, tmp_path / "run"))
    assert f"cannot load the model weights in {checkpoint}" in line


def test_resume_with_privacy_and_resume_without_a_checkpoint(capsys, tmp_path):
    checkpoint = qwen_checkpoint(tmp_path / "checkpoint")
    recipe = tmp_path / "dp.yaml"
    recipe.write_text(json.dumps({
        "model": {"path": str(checkpoint)}, "data": {"embedded": {"companies": 4, "years": 2}},
        "sft": {"method": {"name": "lora", "train_tokens": "none"},
                "privacy": {"noise_multiplier": 1.0, "delta": 1e-5}}}), encoding="utf-8")
    line = one_line_error(capsys, ["train", str(recipe), "--resume", "--out", str(tmp_path / "dp")])
    assert "--resume (sft)" in line and "privacy cannot be combined with resume" in line

    line = one_line_error(capsys, small_run(checkpoint, tmp_path / "run") + ["--resume"])
    assert f"--resume: no checkpoint of sft in {tmp_path / 'run' / '.checkpoints'}" in line
    assert "--resume=auto starts afresh" in line
    assert not (tmp_path / "run" / "data").exists()  # refused before anything ran
    with pytest.raises(SystemExit):
        main(["train", str(recipe), "--resume=sometimes"])
