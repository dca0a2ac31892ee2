"""Which model folder a user means: a run folder stands for its tuned (sft) model, an HF folder for itself.

`lmsmith serve` and `lmsmith chat` accept either. A run folder is recognised by `sft/manifest.json` and
read through `lmsmith.artifacts.Manifest`, so the sft stage's `model` output (the merged model) is found
exactly as downstream stages find it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lmsmith.artifacts import MANIFEST, Manifest
from lmsmith.errors import UserError

_SFT_STAGE = "sft"
_SFT_MODEL_OUTPUT = "model"


@dataclass(frozen=True)
class ResolvedModel:
    """A loadable HF model folder and the name clients address it by."""

    path: Path
    name: str


def resolve_model(path: str | Path, variant: str | None = None) -> ResolvedModel:
    """Resolve a run folder or an HF model folder; the name is the run's folder name or the model's.

    `variant` picks one of a run's compressed variants (RUN/compress/<name>) instead of its tuned model."""
    given = Path(path).expanduser()
    if not given.exists():
        raise UserError(f"{given}: no such run folder or model folder")
    if not given.is_dir():
        raise UserError(f"{given}: expected a run folder or an HF model folder, got a file")
    folder = given.resolve()
    if variant is not None:
        return ResolvedModel(path=_variant_dir(folder, variant), name=f"{folder.name}-{variant}")
    if (folder / _SFT_STAGE / MANIFEST).is_file():
        return ResolvedModel(path=_sft_model_dir(folder), name=folder.name)
    if (folder / "config.json").is_file():
        return ResolvedModel(path=folder, name=folder.name)
    raise UserError(
        f"{given}: neither a run folder (no {_SFT_STAGE}/{MANIFEST}) nor an HF model folder (no config.json)"
    )


def resolve_model_dir(path: str | Path) -> Path:
    """The HF model folder to load for `path` (a run folder or a model folder)."""
    return resolve_model(path).path


def _variant_dir(run_dir: Path, variant: str) -> Path:
    import json

    stage_dir = run_dir / "compress"
    manifest = Manifest.read(stage_dir)
    if manifest is None:
        raise UserError(f"--variant {variant}: {run_dir} has no compress stage ({stage_dir / MANIFEST} is missing)")
    key = f"variant.{variant}"
    made = sorted(name.removeprefix("variant.") for name in manifest.outputs if name.startswith("variant."))
    if key not in manifest.outputs:
        raise UserError(f"--variant {variant}: the compress stage of {run_dir} made {', '.join(made) or 'no variants'}")
    folder = manifest.output_path(stage_dir, key)
    gate = json.loads((folder / MANIFEST).read_text(encoding="utf-8")).get("gate", {})
    if gate and not gate.get("passed", True):
        from lmsmith.console import console

        console.print(f"[yellow]warning[/]: variant {variant} failed its quality gate (over max_drop on "
                      f"{gate.get('over')})")
    return folder


def _sft_model_dir(run_dir: Path) -> Path:
    stage_dir = run_dir / _SFT_STAGE
    manifest = Manifest.read(stage_dir)
    if manifest is None:
        raise UserError(f"{stage_dir / MANIFEST}: unreadable manifest; rerun the sft stage")
    if _SFT_MODEL_OUTPUT not in manifest.outputs:
        raise UserError(f"{stage_dir / MANIFEST}: the sft stage recorded no {_SFT_MODEL_OUTPUT!r} output")
    model_dir = manifest.output_path(stage_dir, _SFT_MODEL_OUTPUT)
    if not (model_dir / "config.json").is_file():
        raise UserError(f"{model_dir}: the sft model folder is missing or has no config.json")
    return model_dir


@dataclass(frozen=True)
class ModelRef:
    """Where a stage's model comes from: an upstream stage's output in this run, or a folder on disk.

    Recipes never spell these out: `start_model` derives them from which stages the recipe holds and
    which base fields it sets, so the same rule decides what a stage loads, what it depends on, and
    what the eval stage compares the tuned model against.
    """

    stage: str | None = None
    output: str = "model"
    path: Path | None = None

    def resolve(self, ctx) -> Path:
        """The folder to load, through the run's manifests for stage outputs."""
        if self.path is not None:
            return self.path
        return ctx.artifact(self.stage, self.output)

    def describe(self) -> str:
        return str(self.path) if self.path is not None else f"{self.stage}/{self.output}"


def extends_a_model(recipe) -> bool:
    """Whether the tokenizer stage writes a model too: it extends the vocabulary of an HF model folder."""
    tokenizer = recipe.tokenizer
    return tokenizer is not None and tokenizer.extend is not None and (Path(tokenizer.extend.base) / "config.json").is_file()


def start_model(recipe, stage: str) -> ModelRef | None:
    """The model a training stage starts from, None for pretraining from scratch.

    pretrain: `pretrain.base_model`, else the tokenizer stage's extended model, else the recipe's
    `model.path`, else a tiny model built from scratch over the tokenizer stage's vocabulary.
    sft: `sft.base_model`, else the pretrain stage's model when the recipe pretrains, else the
    extended model, else `model.path`; with none of these there is nothing to fine-tune.
    """
    config = getattr(recipe, stage)
    if config is not None and config.base_model is not None:
        return ModelRef(path=Path(config.base_model))
    if stage == "sft" and recipe.pretrain is not None:
        return ModelRef(stage="pretrain")
    if extends_a_model(recipe):
        return ModelRef(stage="tokenizer")
    if recipe.model is not None:
        return ModelRef(path=Path(recipe.model.path))
    if stage == "sft":
        raise UserError("sft: no model to fine-tune; set model.path (a local HF checkpoint), sft.base_model, "
                        "or add a pretrain stage to the recipe")
    return None
