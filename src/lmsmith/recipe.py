"""The recipe: one YAML document, one pydantic model per stage. The CLI and the Python API use it too."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError

from lmsmith.compress.config import CompressConfig
from lmsmith.data.config import DataConfig
from lmsmith.errors import UserError
from lmsmith.eval.config import EvalConfig
from lmsmith.report.config import ReportConfig
from lmsmith.schema import StrictModel
from lmsmith.serve.config import ServeConfig
from lmsmith.tokenizer.config import TokenizerConfig
from lmsmith.train.config import PretrainConfig, SFTConfig


class Recipe(StrictModel):
    """A whole run: data → tokenizer → pretrain → sft → eval → compress → serve → report."""

    name: str = "run"
    seed: int = Field(0, description="Seed for every stage's randomness.")
    data: DataConfig = DataConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    pretrain: PretrainConfig = PretrainConfig()
    sft: SFTConfig = SFTConfig()
    eval: EvalConfig = EvalConfig()
    compress: CompressConfig = CompressConfig()
    serve: ServeConfig = ServeConfig()
    report: ReportConfig = ReportConfig()


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
    """Apply an override like `sft.method.r=8` to a nested dict (the value is parsed as YAML)."""
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise UserError(f"--set {dotted}: {key} is not a section")
    node[keys[-1]] = value


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read and validate a recipe YAML; relative paths inside it are taken from its folder."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: recipe file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise UserError(f"{where}: invalid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a recipe must be a mapping of stage names to settings")
    for item in overrides or []:
        if "=" not in item:
            raise UserError(f"--set {item}: expected KEY.PATH=VALUE")
        key, value = item.split("=", 1)
        set_dotted(raw, key, yaml.safe_load(value))
    return validate_recipe(raw, source=str(path), base_dir=path.parent)


def validate_recipe(raw: dict[str, Any], source: str = "recipe", base_dir: Path | None = None) -> Recipe:
    try:
        return Recipe.model_validate(raw, context={"base_dir": base_dir or Path.cwd()})
    except ValidationError as exc:
        raise UserError(format_validation_error(source, exc)) from None
