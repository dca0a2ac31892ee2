"""The stage registry: order, dependencies, and where each stage's `run(config, ctx)` lives.

Stage modules are imported only when the stage actually runs, so checking a finished run for staleness
never pays for importing torch. Which upstream stages a stage reads can depend on the recipe: sft reads
the pretrain stage's model only when the recipe pretrains, and a recipe that starts from a checkpoint
has no pretrain or tokenizer stage at all.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Union


@dataclass(frozen=True)
class StageSpec:
    name: str
    module: str
    # The upstream stages it reads: fixed, or derived from the recipe.
    requires: Union[tuple[str, ...], Callable[..., tuple[str, ...]]]

    def load_run(self) -> Callable:
        return importlib.import_module(self.module).run

    def requirements(self, recipe) -> tuple[str, ...]:
        return self.requires(recipe) if callable(self.requires) else self.requires


def _model_stage(recipe, stage: str) -> tuple[str, ...]:
    from lmsmith.models import start_model

    ref = start_model(recipe, stage)
    if ref is None:
        return ("tokenizer",)  # pretraining from scratch over the tokenizer stage's vocabulary
    return (ref.stage,) if ref.stage is not None else ()


def _pretrain_requires(recipe) -> tuple[str, ...]:
    return ("data", *_model_stage(recipe, "pretrain"))


def _sft_requires(recipe) -> tuple[str, ...]:
    return ("data", *_model_stage(recipe, "sft"))


def _eval_requires(recipe) -> tuple[str, ...]:
    # The base row of the comparison is whatever sft started from; the variants eval.variants names are rows too.
    compressed = ("compress",) if recipe.eval is not None and recipe.eval.variants else ()
    return (*_sft_requires(recipe), "sft", *compressed)


def _serve_requires(recipe) -> tuple[str, ...]:
    serves_variant = recipe.serve is not None and recipe.serve.variant is not None
    return ("data", "sft", *(("compress",) if serves_variant else ()))


def _report_requires(recipe) -> tuple[str, ...]:
    return tuple(name for name in recipe.stages() if name != "report")


STAGES: tuple[StageSpec, ...] = (
    StageSpec("data", "lmsmith.data.stage", ()),
    StageSpec("tokenizer", "lmsmith.tokenizer.stage", ("data",)),
    StageSpec("pretrain", "lmsmith.train.pretrain", _pretrain_requires),
    StageSpec("sft", "lmsmith.train.sft", _sft_requires),
    StageSpec("compress", "lmsmith.compress.stage", ("data", "sft")),
    StageSpec("eval", "lmsmith.eval.stage", _eval_requires),
    StageSpec("serve", "lmsmith.serve.stage", _serve_requires),
    StageSpec("report", "lmsmith.report.stage", _report_requires),
)
STAGE_NAMES = tuple(spec.name for spec in STAGES)


def get_stage(name: str) -> StageSpec:
    for spec in STAGES:
        if spec.name == name:
            return spec
    raise KeyError(name)
