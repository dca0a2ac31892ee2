"""`lmsmith eval curve RUN`: sample efficiency. The run's sft stage (as its recipe.json has it, overrides
included) is trained again on 10/25/50/100% of the run's training conversations, each with the same step budget (the full run's steps), and every
resulting model is scored on the same tasks; each headline metric is plotted against the number of
training conversations.

Each fraction is a run folder of its own under `out/`: a `data` stage holding the subset (and the run's
val split), links to the stage the run's sft started from, and the sft stage run by the pipeline, so a
second call skips the fractions already trained. Scoring and the table are `lmsmith.eval.suite`'s and
`lmsmith.eval.compare`'s; matplotlib draws the curve.
"""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path
from typing import Any, Optional

from pydantic import Field, field_validator

from lmsmith.console import console
from lmsmith.errors import UserError
from lmsmith.schema import StrictModel


class CurveConfig(StrictModel):
    """Train the recipe's sft stage on growing shares of a finished run's data; plot the scores."""

    run: Path = Field(..., description="A finished run: its recipe, data, sft start model and step count.")
    fraction: list[float] = Field([0.1, 0.25, 0.5, 1.0], description="Shares of the training conversations.")
    task: list[str] = Field(["finance-suite"], description="Tasks: held-out, finance-suite, or task YAML files.")
    max_items: Optional[int] = Field(None, ge=1, description="Score at most this many items per task.")
    steps: Optional[int] = Field(None, ge=1, description="The step budget of every fraction (default: the run's "
                                 "sft steps).")
    out: Path = Field(Path("eval-curve"), description="Folder for the fractions' runs and the curve.")
    batch_size: int = Field(16, ge=1, description="Sequences per forward pass when scoring.")

    @field_validator("fraction")
    @classmethod
    def _shares(cls, value: list[float]) -> list[float]:
        if not value or any(not 0 < share <= 1 for share in value):
            raise ValueError("each fraction must be in (0, 1]")
        return sorted(set(value))


def _subset_data(run_dir: Path, folder: Path, share: float, seed: int) -> int:
    """`folder/data`: a data stage holding `share` of the run's training conversations; returns their count."""
    from lmsmith.artifacts import Manifest, describe_outputs
    from lmsmith.jsonl import iter_jsonl

    source = Manifest.read(run_dir / "data")
    if source is None:
        raise UserError(f"{run_dir}: the data stage has not run (run the recipe first)")
    stage = folder / "data"
    stage.mkdir(parents=True, exist_ok=True)
    rows = [row for _, row in iter_jsonl(source.output_path(run_dir / "data", "sft_train"))]
    random.Random(seed).shuffle(rows)
    kept = rows[: max(1, math.ceil(share * len(rows)))]
    (stage / "sft_train.jsonl").write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in kept),
                                           encoding="utf-8")
    outputs: dict[str, str] = {"sft_train": "sft_train.jsonl"}
    # corpus_train feeds sft.replay: the curve varies the conversations, not the replayed text.
    for name in ("sft_val", "class_weights", "corpus_train"):
        if name in source.outputs:
            copied = stage / f"{name}{source.output_path(run_dir / 'data', name).suffix}"
            shutil.copyfile(source.output_path(run_dir / "data", name), copied)
            outputs[name] = copied.name
    Manifest(stage="data", config={"subset_of": str(run_dir / "data"), "share": share, "seed": seed},
             config_hash=f"subset-{share}-{seed}", inputs={},
             outputs=describe_outputs(stage, outputs), metrics={"sft_train": len(kept)}).write(stage)
    return len(kept)


def curve_plot(results: dict[str, Any], sizes: dict[str, int]) -> bytes:
    """One panel per headline metric: the score (± stderr) against the training conversations."""
    import io

    from matplotlib.figure import Figure

    from lmsmith.eval.compare import headline_columns

    columns = headline_columns(results)
    width = min(4, len(columns)) or 1
    rows = math.ceil(len(columns) / width) or 1
    figure = Figure(figsize=(3.2 * width, 2.6 * rows), dpi=100)
    axes_grid = figure.subplots(rows, width, squeeze=False)
    labels = list(results["models"])
    x = [sizes[label] for label in labels]
    for index, (task, metric) in enumerate(columns):
        axes = axes_grid[index // width][index % width]
        scores = results["tasks"][task]["scores"]
        y = [scores.get(label, {}).get(metric) for label in labels]
        errors = [scores.get(label, {}).get(f"{metric}_stderr") or 0.0 for label in labels]
        axes.errorbar(x, [value if value is not None else float("nan") for value in y], yerr=errors, marker="o",
                      capsize=3)
        axes.set_xscale("log")
        axes.set_title(f"{task}\n{metric}", fontsize=8)
        axes.set_xlabel("training conversations", fontsize=7)
        axes.grid(alpha=0.3)
    for index in range(len(columns), rows * width):
        axes_grid[index // width][index % width].axis("off")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def run_curve(config: CurveConfig) -> dict[str, Any]:
    from lmsmith.artifacts import Manifest
    from lmsmith.eval.compare import ModelEntry, write_outputs
    from lmsmith.eval.stage import task_files
    from lmsmith.eval.suite import evaluate_models
    from lmsmith.models import start_model
    from lmsmith.pipeline import StageContext, run_pipeline
    from lmsmith.recipe import validate_recipe
    from lmsmith.report.document import Image

    run_dir = config.run.expanduser()
    saved = run_dir / "recipe.json"
    if not saved.is_file():
        raise UserError(f"{run_dir}: no recipe.json; is it a run folder (lmsmith run --out)?")
    # Absent blocks are saved as null, which a recipe reads as "this stage with its defaults": drop them.
    raw = {key: value for key, value in json.loads(saved.read_text(encoding="utf-8")).items() if value is not None}
    recipe = validate_recipe(raw, str(saved))
    if recipe.sft is None:
        raise UserError(f"{saved}: the run's recipe has no sft stage to repeat")
    steps = config.steps
    if steps is None:
        finished = Manifest.read(run_dir / "sft")
        if finished is None or not finished.metrics.get("steps"):
            raise UserError(f"{run_dir}: no finished sft stage to take the step budget from; give --steps")
        steps = int(finished.metrics["steps"])
    out = config.out.expanduser()
    # A fixed budget: every fraction trains `steps` steps, however many epochs that takes.
    sft = recipe.sft.model_copy(update={"max_steps": steps, "epochs": 1e6, "early_stopping": None,
                                        "checkpoint_every": None, "resume": False})
    fraction_recipe = recipe.model_copy(update={"sft": sft})
    base = start_model(recipe, "sft")
    entries, sizes = [], {}
    for share in config.fraction:
        label = f"{share:.0%}"
        folder = out / f"fraction-{round(share * 100)}"
        count = _subset_data(run_dir, folder, share, recipe.seed)
        if base is not None and base.stage is not None:
            link = folder / base.stage
            if not link.exists():
                link.symlink_to((run_dir / base.stage).resolve(), target_is_directory=True)
        console.rule(f"sft on {label} of the training data ({count} conversations, {steps} steps)")
        run_pipeline(fraction_recipe, folder, stages=["sft"])
        model_dir = Manifest.read(folder / "sft").output_path(folder / "sft", "model")
        entries.append(ModelEntry(label, f"sft on {count} conversations ({steps} steps)", model_dir))
        sizes[label] = count
    ctx = StageContext(run_dir=run_dir, stage_dir=out, recipe=recipe)
    tasks = task_files(config.task, ctx, out / "tasks", max_items=config.max_items)
    results = evaluate_models(entries, tasks, out, config.batch_size, speed=None, write=False)
    results["training_conversations"] = sizes
    results["steps"] = steps
    image = Image("plots/curve.png", "each headline metric against the training conversations (± stderr)",
                  curve_plot(results, sizes))
    table = write_outputs(results, out, f"{recipe.name}: learning curve", extra_images=[image])
    console.print(table.to_markdown(), markup=False)
    return results
