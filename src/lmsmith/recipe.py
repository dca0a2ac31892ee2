"""The recipe: one YAML document, one pydantic model per stage. The CLI and the Python API use it too."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import Field, ValidationError, model_validator

from lmsmith.compress.config import CompressConfig
from lmsmith.data.config import DataConfig
from lmsmith.errors import UserError
from lmsmith.paths import InputPath, names_a_path
from lmsmith.eval.config import EvalConfig
from lmsmith.report.config import ReportConfig
from lmsmith.schema import StrictModel, read_yaml_mapping
from lmsmith.serve.config import ServeConfig
from lmsmith.tokenizer.config import TokenizerConfig
from lmsmith.train.config import PretrainConfig, SFTConfig


class ModelConfig(StrictModel):
    """The checkpoint a run starts from: a local HF causal-LM folder with its tokenizer.

    With it a recipe needs no tokenizer or pretrain stage: sft fine-tunes this model with its own
    tokenizer and chat template, and eval compares the tuned model against it.
    """

    path: InputPath = Field(..., description="Local HF model folder (config.json, weights, tokenizer files).")
    chat_template: Union[Literal["auto", "chatml", "plain"], InputPath] = Field(
        "auto",
        description="Chat template for SFT and serving. auto: the checkpoint's own; when it has none, ChatML if "
        "its vocabulary holds <|im_start|>/<|im_end|>, else the run stops and asks for one. chatml: ChatML (the "
        "vocabulary must hold its tokens). plain: 'User: ... / Assistant: ...' turns ended by the tokenizer's "
        "eos, for base models without chat tokens. Or a path to a .jinja file.",
    )


class Recipe(StrictModel):
    """A whole run: data → tokenizer → pretrain → sft → compress → eval → serve → report.

    A stage runs only when its block is in the recipe (`pretrain: {}` runs it with defaults).
    """

    name: str = "run"
    seed: int = Field(0, description="Seed for every stage's randomness.")
    model: Optional[ModelConfig] = Field(None, description="Start from this local checkpoint instead of pretraining.")
    data: Optional[DataConfig] = None
    tokenizer: Optional[TokenizerConfig] = None
    pretrain: Optional[PretrainConfig] = None
    sft: Optional[SFTConfig] = None
    eval: Optional[EvalConfig] = None
    compress: Optional[CompressConfig] = None
    serve: Optional[ServeConfig] = None
    report: Optional[ReportConfig] = None

    @model_validator(mode="after")
    def _one_vocabulary(self) -> "Recipe":
        from lmsmith.models import start_model

        try:
            starts = {stage: start_model(self, stage) for stage in ("pretrain", "sft") if getattr(self, stage) is not None}
        except UserError as exc:  # sft with nothing to start from
            raise ValueError(str(exc)) from None
        if self.model is not None:
            if not any(ref is not None and ref.path == Path(self.model.path) for ref in starts.values()):
                shown = "; ".join(f"{stage} starts from {ref.describe() if ref else 'scratch'}"
                                  for stage, ref in starts.items()) or "the recipe has no pretrain or sft block"
                raise ValueError(f"model.path: {self.model.path} is not used ({shown}); remove it or the setting "
                                 "that overrides it (sft.base_model, pretrain.base_model, tokenizer.extend)")
        trains_vocabulary = self.tokenizer is not None and self.tokenizer.extend is None
        if not trains_vocabulary:
            return self
        if not starts:
            return self  # a tokenizer-only run
        # The first training stage decides: pretrain when there is one, else sft.
        checkpoint = starts["pretrain"] if "pretrain" in starts else starts["sft"]
        if checkpoint is not None and checkpoint.path is not None:
            raise ValueError(
                f"tokenizer: trains a new vocabulary, but training starts from the checkpoint {checkpoint.path}, "
                "which keeps its own; remove the tokenizer block, or grow the checkpoint's vocabulary with "
                "tokenizer.extend")
        return self

    @model_validator(mode="after")
    def _dp_data_stays_out_of_the_vocabulary(self) -> "Recipe":
        # DP-SGD's ε covers only what the sft stage sees through opacus; a vocabulary trained on the same
        # conversations would carry their rare strings into the released tokenizer unprotected.
        if (
            self.sft is not None
            and self.sft.privacy is not None
            and self.tokenizer is not None
            and self.tokenizer.extend is None
            and "instructions" in self.tokenizer.train_on
        ):
            raise ValueError(
                "tokenizer.train_on includes instructions while sft.privacy is set: the vocabulary would be "
                "learnt from the conversations DP-SGD protects, outside ε; set tokenizer.train_on: [corpus] "
                "or extend an existing tokenizer (tokenizer.extend, which mines corpus_train only)"
            )
        return self

    @model_validator(mode="after")
    def _named_variants_exist(self) -> "Recipe":
        made = [variant.name for variant in self.compress.variants] if self.compress is not None else []
        for where, name in (("eval.variants", n) for n in (self.eval.variants if self.eval else [])):
            if name not in made:
                raise ValueError(f"{where}: {name!r} is not a compress variant of this recipe "
                                 f"({', '.join(made) or 'it has no compress block'})")
        if self.serve is not None and self.serve.variant is not None and self.serve.variant not in made:
            raise ValueError(f"serve.variant: {self.serve.variant!r} is not a compress variant of this recipe "
                             f"({', '.join(made) or 'it has no compress block'})")
        return self

    def stages(self) -> list[str]:
        """The stages this recipe runs, in pipeline order."""
        from lmsmith.stages import STAGE_NAMES

        return [name for name in STAGE_NAMES if getattr(self, name) is not None]


STAGE_BLOCKS = ("model", "data", "tokenizer", "pretrain", "sft", "eval", "compress", "serve", "report")


def _listed_stages_as_blocks(raw: dict[str, Any]) -> dict[str, Any]:
    # `eval:` with nothing after it lists the stage with its defaults, as `eval: {}` does.
    return {key: ({} if value is None and key in STAGE_BLOCKS else value) for key, value in raw.items()}


def format_validation_error(source: str, error: ValidationError) -> str:
    """One line: `SOURCE: field.path: message`, problems joined by '; '."""
    lines = []
    for problem in error.errors():
        location = ".".join(str(part) for part in problem["loc"] if not str(part).startswith("function-"))
        message = problem["msg"].removeprefix("Value error, ")
        if problem["type"] == "extra_forbidden":
            message = "unknown field"
        lines.append(f"{location or '<root>'}: {message}")
    return f"{source}: " + "; ".join(lines)


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Apply an override like `sft.method.r=8` to a nested dict (the value is parsed as YAML); a number
    indexes a list, as in `compress.variants.1.calibration_samples=64`."""
    keys = dotted.split(".")
    node: Any = tree
    for depth, key in enumerate(keys):
        last = depth == len(keys) - 1
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise UserError(f"--set {dotted}: {'.'.join(keys[:depth]) or key} is a list of {len(node)}; "
                                f"{key} is not an index in it")
            if last:
                node[int(key)] = value
                return
            node = node[int(key)]
        elif isinstance(node, dict):
            if last:
                node[key] = value
                return
            node = node.setdefault(key, {})
        else:
            raise UserError(f"--set {dotted}: {keys[depth - 1]} is not a section")


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read and validate a recipe YAML; relative paths inside it are taken from its folder."""
    path = Path(path)
    raw = _listed_stages_as_blocks(read_yaml_mapping(path, "recipe"))
    for item in overrides or []:
        if "=" not in item:
            raise UserError(f"--set {item}: expected KEY.PATH=VALUE")
        key, value = item.split("=", 1)
        stage = key.split(".", 1)[0]
        if "." in key and stage in STAGE_BLOCKS and stage not in raw:
            raise UserError(f"--set {item}: the recipe has no {stage} block; add one (e.g. --set {stage}={{}}) first")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise UserError(f"--set {item}: invalid YAML value: {getattr(exc, 'problem', None) or exc}") from None
        # A path typed on the command line is relative to where it was typed, not to the recipe's folder.
        if (isinstance(parsed, str) and parsed and not Path(parsed).expanduser().is_absolute()
                and Path(parsed).exists() and names_a_path(Recipe, key)):
            parsed = str(Path(parsed).resolve())
        set_dotted(raw, key, parsed)
    return validate_recipe(raw, source=str(path), base_dir=path.parent)


def validate_recipe(raw: dict[str, Any], source: str = "recipe", base_dir: Path | None = None) -> Recipe:
    raw = _listed_stages_as_blocks(raw)
    try:
        return Recipe.model_validate(raw, context={"base_dir": base_dir or Path.cwd()})
    except ValidationError as exc:
        raise UserError(format_validation_error(source, exc)) from None
