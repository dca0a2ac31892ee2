"""A stage publishes its folder only on success: a failure injected into any stage of a finished run leaves
every stage folder byte-identical, and a kill between the two renames of a swap is repaired."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmsmith import pipeline
from lmsmith.artifacts import recover_folder
from lmsmith.recipe import load_recipe
from lmsmith.stages import STAGE_NAMES, StageSpec

DEMO = Path(__file__).resolve().parents[1] / "recipes" / "finance-demo.yaml"
TINY_DEMO = [
    "data.embedded.companies=6", "data.embedded.years=2", "tokenizer.vocab_size=400",
    "pretrain.model={hidden_size: 32, num_layers: 1, num_heads: 2, num_kv_heads: 1, intermediate_size: 64}",
    "pretrain.max_steps=3", "pretrain.seq_len=64", "pretrain.batch_size=4",
    "sft.max_steps=3", "sft.batch_size=4", "sft.val_generations=0",
    "eval.max_items=2", "eval.max_new_tokens=4", "eval.speed_requests=1",
    "compress.max_items=1", "compress.max_new_tokens=4", "compress.speed_requests=1", "compress.speed_batch=1",
    "compress.speed_new_tokens=2", "compress.agreement_texts=1", "compress.peak_memory=false",
    "compress.variants=[{name: int8, method: dynamic_int8}]", "serve.smoke_questions=1", "serve.max_new_tokens=4",
]


def snapshot(run_dir: Path) -> dict[str, bytes]:
    return {str(path.relative_to(run_dir)): path.read_bytes()
            for stage in STAGE_NAMES for path in sorted((run_dir / stage).rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    recipe = load_recipe(DEMO, overrides=TINY_DEMO)
    run_dir = tmp_path_factory.mktemp("publish") / "run"
    pipeline.run_pipeline(recipe, run_dir)
    return recipe, run_dir


def failing_after_the_real_run(stage: str, error: BaseException):
    real_load = StageSpec.load_run

    def load_run(self):
        run = real_load(self)
        if self.name != stage:
            return run

        def run_then_fail(config, ctx):
            run(config, ctx)  # the stage writes everything it would publish, then dies
            raise error

        return run_then_fail

    return load_run


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGE_NAMES)
def test_a_failed_rerun_leaves_every_stage_byte_identical(finished_run, stage, monkeypatch):
    recipe, run_dir = finished_run
    before = snapshot(run_dir)
    assert any(name.startswith(f"{stage}/") for name in before) and f"{stage}/manifest.json" in before
    error = KeyboardInterrupt() if stage == "sft" else RuntimeError(f"injected failure in {stage}")
    monkeypatch.setattr(StageSpec, "load_run", failing_after_the_real_run(stage, error))
    with pytest.raises(type(error)):
        pipeline.run_pipeline(recipe, run_dir, only=stage)
    assert snapshot(run_dir) == before
    partial = pipeline.staging_dir(run_dir, stage)
    assert any(partial.iterdir()), "the failed attempt's output stays in the staging folder for a look"


def test_a_swap_killed_between_its_renames_is_repaired(tmp_path):
    run_dir = tmp_path
    (run_dir / ".data.previous").mkdir()
    (run_dir / ".data.previous" / "manifest.json").write_text("{}")
    recover_folder(run_dir / "data")  # killed after moving the old folder aside
    assert (run_dir / "data" / "manifest.json").read_text() == "{}" and not (run_dir / ".data.previous").exists()
    (run_dir / ".data.previous").mkdir()
    recover_folder(run_dir / "data")  # killed after the new folder was in place
    assert (run_dir / "data").exists() and not (run_dir / ".data.previous").exists()
