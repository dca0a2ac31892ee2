"""Run a recipe's stages in order, skipping those whose config and inputs are unchanged.

A stage never writes over its last good output: it runs in a staging folder beside it,
`RUN/.<stage>.partial/`, and only a finished stage (outputs hashed, manifest written) is swapped into
`RUN/<stage>/`. A failed or interrupted run leaves the previous folder and manifest exactly as they
were, and its partial output stays in the staging folder for a look until the next attempt.
"""

from __future__ import annotations

import os
import random
import sys
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from lmsmith.artifacts import Manifest, checkpoint_root, describe_outputs, recover_folder, replace_folder
from lmsmith.console import console
from lmsmith.errors import UserError
from lmsmith.hashing import hash_json, hash_path
from lmsmith.paths import as_input_path
from lmsmith.recipe import Recipe
from lmsmith.stages import STAGE_NAMES, STAGES, StageSpec


@dataclass
class StageResult:
    """What a stage's `run` returns: output paths relative to its folder, and its metrics."""

    outputs: dict[str, str | Path]
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class StageContext:
    """What a stage sees: its own folder, the run folder, the seed and its upstream artifacts."""

    run_dir: Path
    stage_dir: Path
    recipe: Recipe

    @property
    def seed(self) -> int:
        return self.recipe.seed

    def manifest(self, stage: str) -> Manifest:
        manifest = Manifest.read(self.run_dir / stage)
        if manifest is None:
            raise UserError(f"{self.run_dir / stage}: stage {stage!r} has not run yet")
        return manifest

    def artifact(self, stage: str, name: str) -> Path:
        """Path of output `name` of an upstream `stage`."""
        manifest = self.manifest(stage)
        if name not in manifest.outputs:
            raise KeyError(f"stage {stage!r} has no output {name!r} (has {sorted(manifest.outputs)})")
        return manifest.output_path(self.run_dir / stage, name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass
    # Only stages that imported torch need it seeded; importing it here would cost a second per stage.
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.manual_seed(seed)


def _stage_inputs(spec: StageSpec, config: Any, run_dir: Path, recipe: Recipe) -> dict[str, str]:
    inputs = {}
    for upstream in spec.requirements(recipe):
        manifest = Manifest.read(run_dir / upstream)
        inputs[f"stage:{upstream}"] = manifest.fingerprint if manifest else "missing"
    external = external_inputs(config)
    for name, path in external.items():
        inputs[f"file:{name}"] = hash_path(Path(path))
    inputs.update(_start_model_inputs(spec.name, recipe, set(external.values())))
    return inputs


def _start_model_inputs(stage: str, recipe: Recipe, hashed: set[Path]) -> dict[str, str]:
    """What a training or eval stage starts from but its own block does not name: the recipe's
    `model.path` (a changed checkpoint must rerun the stages built on it) and its chat template."""
    from lmsmith.models import start_model

    if stage not in ("pretrain", "sft", "eval") or recipe.model is None:
        return {}
    inputs = {}
    ref = start_model(recipe, "pretrain" if stage == "pretrain" else "sft")
    if ref is not None and ref.path is not None and ref.path not in hashed:
        inputs["file:model.path"] = hash_path(ref.path)
    if stage != "pretrain":
        template = recipe.model.chat_template
        inputs["model.chat_template"] = hash_path(template) if isinstance(template, Path) else str(template)
    return inputs


def external_inputs(config: Any) -> dict[str, Path]:
    """Files and folders a config names (see `as_input_path`), at any depth: fields of nested models and
    items of lists, tuples and dicts (`synth_tables.0`, `ops.3.file`), keyed by where they sit. A file
    left out here would leave its stage "up to date" after an edit."""
    found: dict[str, Path] = {}

    def visit(value: Any, where: tuple[str, ...]) -> None:
        if isinstance(value, BaseModel):
            for key in type(value).model_fields:
                visit(getattr(value, key), (*where, key))
        elif isinstance(value, dict):
            for key, item in value.items():
                visit(item, (*where, str(key)))
        elif isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                visit(item, (*where, str(index)))
        elif (path := as_input_path(value)) is not None:
            found[".".join(where)] = path

    visit(config, ())
    return found


def select_stages(recipe: Recipe, start: str | None, only: str | None, stages: list[str] | None = None) -> list[str]:
    """The stages to consider: those in the recipe (or of them, `stages`), from `start` on, or just `only`."""
    in_recipe = [name for name in recipe.stages() if name in STAGE_NAMES and (stages is None or name in stages)]
    for flag, name in (("--from", start), ("--only", only)):
        if name is None:
            continue
        if name not in STAGE_NAMES:
            raise UserError(f"{flag} {name}: unknown stage; stages are {', '.join(STAGE_NAMES)}")
        if name not in in_recipe:
            raise UserError(f"{flag} {name}: the recipe has no {name} block; its stages are {', '.join(in_recipe)}")
    if only:
        return [only]
    if start:
        return in_recipe[in_recipe.index(start):]
    return in_recipe


def check_requirements(recipe: Recipe, selected: list[str], run_dir: Path) -> None:
    """Refuse before anything runs when a stage reads one the recipe lacks or that never ran."""
    in_recipe = set(recipe.stages())
    for spec in STAGES:
        if spec.name not in selected:
            continue
        needed = spec.requirements(recipe)
        absent = [name for name in needed if name not in in_recipe and Manifest.read(run_dir / name) is None]
        if absent:
            raise UserError(f"stage {spec.name!r} needs {', '.join(absent)}, which the recipe does not have; "
                            f"add {' and '.join(absent)} to the recipe")
        not_run = [name for name in needed if name not in selected and Manifest.read(run_dir / name) is None]
        if not_run:
            raise UserError(f"stage {spec.name!r} needs {', '.join(not_run)} in {run_dir}; run them first")


def run_pipeline(
    recipe: Recipe,
    run_dir: str | Path,
    start: str | None = None,
    only: str | None = None,
    stages: list[str] | None = None,
) -> dict[str, Manifest]:
    """Run (or skip) each selected stage; `--from`/`--only` force the stages they name, `stages`
    restricts the run to some of the recipe's stages without forcing them."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if _is_main_process():
        for spec in STAGES:
            recover_folder(run_dir / spec.name)
    _barrier()
    selected = select_stages(recipe, start, only, stages)
    check_requirements(recipe, selected, run_dir)
    (run_dir / "recipe.json").write_text(recipe.model_dump_json(indent=2))
    forced = set(selected) if (start or only) else set()
    manifests: dict[str, Manifest] = {}
    for spec in STAGES:
        stage_dir = run_dir / spec.name
        if spec.name not in selected:
            existing = Manifest.read(stage_dir)
            if existing is not None:
                manifests[spec.name] = existing
            continue
        config = getattr(recipe, spec.name)
        config_json = config.model_dump(mode="json")
        config_hash = hash_json({"seed": recipe.seed, "config": config.identity()})
        inputs = _stage_inputs(spec, config, run_dir, recipe)
        existing = Manifest.read(stage_dir)
        if (
            spec.name not in forced
            and existing is not None
            and existing.config_hash == config_hash
            and existing.inputs == inputs
            and existing.outputs_present(stage_dir)
        ):
            console.print(f"[green]skip[/] {spec.name}: config and inputs unchanged")
            manifests[spec.name] = existing
            continue
        manifests[spec.name] = _run_stage(spec, config, config_json, config_hash, inputs, recipe, run_dir)
    return manifests


def staging_dir(run_dir: Path, stage: str) -> Path:
    return run_dir / f".{stage}.partial"


def _is_main_process() -> bool:
    # Under torchrun / accelerate launch every rank runs the stage; only rank 0 owns its folder.
    return int(os.environ.get("RANK", "0")) == 0


def _barrier() -> None:
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.barrier()


def _run_stage(spec, config, config_json, config_hash, inputs, recipe, run_dir) -> Manifest:
    staging = staging_dir(run_dir, spec.name)
    main = _is_main_process()
    if main:
        if staging.exists():
            shutil.rmtree(staging)  # what a failed attempt left
        staging.mkdir(parents=True)
    else:
        # Ranks may start before rank 0 has recreated the folder; the stage itself synchronises later.
        staging.mkdir(parents=True, exist_ok=True)
    console.rule(f"[bold]{spec.name}")
    started = time.perf_counter()
    run = spec.load_run()
    seed_everything(recipe.seed)
    try:
        result: StageResult = run(config, StageContext(run_dir=run_dir, stage_dir=staging, recipe=recipe))
    except BaseException:
        if main and (run_dir / spec.name).exists():
            console.print(f"[yellow]{spec.name} failed[/]: its previous output in {run_dir / spec.name} is unchanged; "
                          f"this attempt's partial output is in {staging}")
        raise
    _barrier()
    # Rank 0 alone hashes, writes and publishes: the others would be hashing a folder it renames.
    if main:
        manifest = Manifest(
            stage=spec.name,
            config=config_json,
            config_hash=config_hash,
            inputs=inputs,
            outputs=describe_outputs(staging, result.outputs),
            metrics=result.metrics,
            wall_time_s=round(time.perf_counter() - started, 3),
        )
        manifest.write(staging)
        replace_folder(staging, run_dir / spec.name)
        # Checkpoints outlive the training loop until the output they led to is safely published.
        shutil.rmtree(checkpoint_root(run_dir, spec.name), ignore_errors=True)
    _barrier()
    if not main:
        manifest = Manifest.read(run_dir / spec.name)
    console.print(f"[green]done[/] {spec.name} in {manifest.wall_time_s:.1f}s")
    return manifest
