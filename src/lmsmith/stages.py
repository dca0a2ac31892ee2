"""The stage registry: order, dependencies, and where each stage's `run(config, ctx)` lives.

Stage modules are imported only when the stage actually runs, so checking a finished run for staleness
never pays for importing torch.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class StageSpec:
    name: str
    module: str
    requires: tuple[str, ...]

    def load_run(self) -> Callable:
        return importlib.import_module(self.module).run


STAGES: tuple[StageSpec, ...] = (
    StageSpec("data", "lmsmith.data.stage", ()),
    StageSpec("tokenizer", "lmsmith.tokenizer.stage", ("data",)),
    StageSpec("pretrain", "lmsmith.train.pretrain", ("data", "tokenizer")),
    StageSpec("sft", "lmsmith.train.sft", ("data", "tokenizer", "pretrain")),
    StageSpec("eval", "lmsmith.eval.stage", ("data", "pretrain", "sft")),
    StageSpec("compress", "lmsmith.compress.stage", ("data", "sft")),
    StageSpec("serve", "lmsmith.serve.stage", ("data", "sft")),
    StageSpec("report", "lmsmith.report.stage", ("data", "tokenizer", "pretrain", "sft", "eval", "compress", "serve")),
)
STAGE_NAMES = tuple(spec.name for spec in STAGES)


def get_stage(name: str) -> StageSpec:
    for spec in STAGES:
        if spec.name == name:
            return spec
    raise KeyError(name)
