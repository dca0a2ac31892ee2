"""Run a recipe's stages in order, skipping those whose config and inputs are unchanged."""

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

from lmsmith.artifacts import Manifest, describe_outputs
from lmsmith.console import console
from lmsmith.errors import UserError
from lmsmith.hashing import hash_json, hash_path
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


def _stage_inputs(spec: StageSpec, config: Any, run_dir: Path) -> dict[str, str]:
    inputs = {}
    for upstream in spec.requires:
        manifest = Manifest.read(run_dir / upstream)
        inputs[f"stage:{upstream}"] = manifest.fingerprint if manifest else "missing"
    for name, path in external_inputs(config).items():
        inputs[f"file:{name}"] = hash_path(Path(path))
    return inputs


def external_inputs(config: Any) -> dict[str, Path]:
    """Files a config points at: any Path-valued field, at any depth, that exists."""
    found: dict[str, Path] = {}

    def visit(value: Any, prefix: str) -> None:
        if isinstance(value, BaseModel):
            for key in type(value).model_fields:
                visit(getattr(value, key), f"{prefix}{key}.")
        elif isinstance(value, Path) and value.exists():
            found[prefix.rstrip(".")] = value
        elif isinstance(value, str) and len(value) < 4096 and ("/" in value) and Path(value).exists():
            found[prefix.rstrip(".")] = Path(value)

    visit(config, "")
    return found


def select_stages(start: str | None, only: str | None) -> list[str]:
    for flag, name in (("--from", start), ("--only", only)):
        if name is not None and name not in STAGE_NAMES:
            raise UserError(f"{flag} {name}: unknown stage; stages are {', '.join(STAGE_NAMES)}")
    if only:
        return [only]
    if start:
        return list(STAGE_NAMES[STAGE_NAMES.index(start):])
    return list(STAGE_NAMES)


def run_pipeline(
    recipe: Recipe,
    run_dir: str | Path,
    start: str | None = None,
    only: str | None = None,
) -> dict[str, Manifest]:
    """Run (or skip) each selected stage; `--from`/`--only` force the stages they name."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "recipe.json").write_text(recipe.model_dump_json(indent=2))
    selected = select_stages(start, only)
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
        missing = [u for u in spec.requires if Manifest.read(run_dir / u) is None]
        if missing:
            raise UserError(f"stage {spec.name!r} needs {', '.join(missing)} in {run_dir}; run them first")
        config_json = config.model_dump(mode="json")
        config_hash = hash_json({"seed": recipe.seed, "config": config.identity()})
        inputs = _stage_inputs(spec, config, run_dir)
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


def _is_main_process() -> bool:
    # Under torchrun / accelerate launch every rank runs the stage; only rank 0 owns its folder.
    return int(os.environ.get("RANK", "0")) == 0


def _barrier() -> None:
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.barrier()


def _run_stage(spec, config, config_json, config_hash, inputs, recipe, run_dir) -> Manifest:
    stage_dir = run_dir / spec.name
    main = _is_main_process()
    if main:
        if stage_dir.exists():
            shutil.rmtree(stage_dir)
        stage_dir.mkdir(parents=True)
    else:
        # Ranks may start before rank 0 has recreated the folder; the stage itself synchronises later.
        stage_dir.mkdir(parents=True, exist_ok=True)
    console.rule(f"[bold]{spec.name}")
    started = time.perf_counter()
    run = spec.load_run()
    seed_everything(recipe.seed)
    result: StageResult = run(config, StageContext(run_dir=run_dir, stage_dir=stage_dir, recipe=recipe))
    _barrier()
    manifest = Manifest(
        stage=spec.name,
        config=config_json,
        config_hash=config_hash,
        inputs=inputs,
        outputs=describe_outputs(stage_dir, result.outputs),
        metrics=result.metrics,
        wall_time_s=round(time.perf_counter() - started, 3),
    )
    if main:
        manifest.write(stage_dir)
    console.print(f"[green]done[/] {spec.name} in {manifest.wall_time_s:.1f}s")
    return manifest
