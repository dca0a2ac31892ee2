"""Exact resume: a run killed with SIGKILL mid-training and resumed writes the same loss curve, bit
for bit, as a run that was never interrupted (CPU, LoRA with dropout, so RNG state matters too)."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lmsmith.artifacts import Manifest, describe_outputs
from lmsmith.errors import UserError
from lmsmith.recipe import Recipe
from lmsmith.train.checkpoint import checkpoint_root, list_checkpoints
from lmsmith.train.config import EarlyStoppingConfig, LoraMethod, MonitorConfig, OptimConfig, SFTConfig
from test_tokenizer import write_data_stage

CHECKPOINT_EVERY = 3
MAX_STEPS = 16
COMPARED = ("step", "loss", "lr", "grad_norm", "val_loss")

CHILD = textwrap.dedent('''
    import os, signal, sys
    from pathlib import Path
    from lmsmith.pipeline import run_pipeline
    from lmsmith.recipe import Recipe
    from lmsmith.train import monitor

    run_dir, recipe_file, kill_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if kill_at:
        write_row = monitor.RunLog.metrics

        def write_row_then_die(self, row):
            write_row(self, row)
            if row["step"] >= kill_at:
                os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no flush beyond what is on disk

        monitor.RunLog.metrics = write_row_then_die
    run_pipeline(Recipe.model_validate_json(Path(recipe_file).read_text()), run_dir, only="sft")
''')


def handmade_stage(run_dir: Path, stage: str, outputs: dict[str, str]) -> None:
    Manifest(stage=stage, config={}, config_hash="handmade", inputs={},
             outputs=describe_outputs(run_dir / stage, outputs)).write(run_dir / stage)


@pytest.fixture(scope="module")
def upstream(tmp_path_factory, tiny_model_dir) -> Path:
    """data, tokenizer and pretrain folders (the tiny fixture model stands in for a pretrained one)."""
    run_dir = write_data_stage(tmp_path_factory.mktemp("resume_upstream"))
    shutil.copytree(tiny_model_dir, run_dir / "tokenizer" / "tokenizer")
    handmade_stage(run_dir, "tokenizer", {"tokenizer": "tokenizer"})
    shutil.copytree(tiny_model_dir, run_dir / "pretrain" / "model")
    handmade_stage(run_dir, "pretrain", {"model": "model"})
    return run_dir


def recipe_file(folder: Path, **overrides) -> Path:
    settings = dict(
        method=LoraMethod(r=4, alpha=8, dropout=0.1, train_tokens="none"), batch_size=4, grad_accum_steps=2,
        epochs=100, max_steps=MAX_STEPS, log_every=1, val_every=4, checkpoint_every=CHECKPOINT_EVERY, resume="auto",
        val_generations=0, optim=OptimConfig(lr=5e-3, warmup_ratio=0.2), monitor=MonitorConfig(tensorboard=False),
        early_stopping=EarlyStoppingConfig(patience=50),  # its best weights ride in the checkpoint too
    )
    path = folder / "recipe.json"
    path.write_text(Recipe(pretrain={}, sft=SFTConfig(**{**settings, **overrides})).model_dump_json())
    return path


def run_child(run_dir: Path, recipe: Path, kill_at: int = 0) -> subprocess.CompletedProcess:
    script = run_dir / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(script), str(run_dir), str(recipe), str(kill_at)],
                          env=env, capture_output=True, text=True, timeout=240)


def curve(run_dir: Path, folder: str = "sft") -> list[tuple]:
    rows = [json.loads(line) for line in (run_dir / folder / "metrics.jsonl").read_text().splitlines()]
    return [tuple(row.get(key) for key in COMPARED) for row in rows]


def fresh_copy(upstream: Path, target: Path) -> Path:
    for stage in ("data", "tokenizer", "pretrain"):
        shutil.copytree(upstream / stage, target / stage)
    return target


@pytest.mark.slow
def test_killed_and_resumed_run_matches_the_uninterrupted_run_bit_for_bit(upstream, tmp_path):
    whole = fresh_copy(upstream, tmp_path / "whole")
    done = run_child(whole, recipe_file(whole))
    assert done.returncode == 0, done.stderr[-3000:]
    reference = curve(whole)
    assert [row[0] for row in reference] == list(range(1, MAX_STEPS + 1))
    # The run finished, so its checkpoints were cleared.
    assert list_checkpoints(checkpoint_root(whole, "sft")) == []

    kill_at = random.randint(CHECKPOINT_EVERY + 1, MAX_STEPS - 2)
    broken = fresh_copy(upstream, tmp_path / "broken")
    killed = run_child(broken, recipe_file(broken), kill_at=kill_at)
    assert killed.returncode == -signal.SIGKILL, f"kill at {kill_at}: {killed.stderr[-2000:]}"
    saved = list_checkpoints(checkpoint_root(broken, "sft"))
    # The kill comes as step kill_at's row is written, before that step's own checkpoint (if any).
    last_saved = ((kill_at - 1) // CHECKPOINT_EVERY) * CHECKPOINT_EVERY
    assert saved and saved[-1].name == f"step-{last_saved}", (kill_at, saved)
    assert len(saved) <= 2  # keep_checkpoints
    assert (saved[-1] / "trainable.safetensors").stat().st_size < 200_000  # the adapter only, not the base
    assert (saved[-1] / "best.safetensors").exists() == (last_saved >= 4)  # after the first val check
    # Rows after the checkpoint were written before the kill, into the unpublished staging folder.
    assert curve(broken, ".sft.partial")[-1][0] == kill_at
    assert not (broken / "sft").exists()

    resumed = run_child(broken, recipe_file(broken))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"step {last_saved} of {MAX_STEPS}" in resumed.stdout
    assert curve(broken) == reference, f"killed at step {kill_at}, resumed from {last_saved}"
    for output in ("adapter", "merged"):
        assert (broken / "sft" / output).is_dir()


@pytest.mark.slow
def test_resume_refuses_changed_settings_and_a_fresh_start_discards_the_checkpoint(upstream, tmp_path):
    from lmsmith.pipeline import run_pipeline

    run_dir = fresh_copy(upstream, tmp_path / "run")
    killed = run_child(run_dir, recipe_file(run_dir), kill_at=CHECKPOINT_EVERY + 1)
    assert killed.returncode == -signal.SIGKILL
    assert list_checkpoints(checkpoint_root(run_dir, "sft"))

    changed = Recipe.model_validate_json(recipe_file(run_dir, batch_size=2).read_text())
    with pytest.raises(UserError, match="cannot resume.*batch_size"):
        run_pipeline(changed, run_dir, only="sft")
    assert list_checkpoints(checkpoint_root(run_dir, "sft"))  # refusing touched nothing

    run_pipeline(Recipe.model_validate_json(recipe_file(run_dir, resume=False, max_steps=4).read_text()),
                 run_dir, only="sft")
    assert [row[0] for row in curve(run_dir)] == [1, 2, 3, 4]
    assert not checkpoint_root(run_dir, "sft").exists()

    # resume: true insists on a checkpoint; the finished stage's output survives the refusal untouched.
    finished = {path: path.read_bytes() for path in (run_dir / "sft").rglob("*") if path.is_file()}
    with pytest.raises(UserError, match="resume: no checkpoint of this stage.*resume: auto"):
        run_pipeline(Recipe.model_validate_json(recipe_file(run_dir, resume=True, max_steps=4).read_text()),
                     run_dir, only="sft")
    assert {path: path.read_bytes() for path in (run_dir / "sft").rglob("*") if path.is_file()} == finished


def test_resume_is_strict_for_the_interrupted_stage_only(tmp_path):
    from lmsmith.train.cli import apply_resume

    recipe = Recipe(tokenizer={}, pretrain={}, sft={})
    with pytest.raises(UserError, match="--resume: no checkpoint of pretrain or sft"):
        apply_resume(recipe, True, ["pretrain", "sft"], tmp_path)
    step = checkpoint_root(tmp_path, "pretrain") / "step-50"
    step.mkdir(parents=True)
    (step / "state.json").write_text("{}")
    apply_resume(recipe, True, ["pretrain", "sft"], tmp_path)
    # pretrain was killed mid-way: it must resume; sft never started: it starts afresh after it.
    assert (recipe.pretrain.resume, recipe.sft.resume) == (True, "auto")
    apply_resume(recipe, "auto", ["pretrain", "sft"], tmp_path)
    assert (recipe.pretrain.resume, recipe.sft.resume) == ("auto", "auto")
