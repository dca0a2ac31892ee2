"""The data stage's config. Light on purpose: pydantic and the operator registry, no torch."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, Field, ValidationInfo, field_validator

from lmsmith.data.ops import DEFAULT_OPS, validate_op_spec
from lmsmith.paths import resolve_existing
from lmsmith.schema import StrictModel

EMBEDDED = "embedded:finance"
CORPUS_SUFFIXES = (".jsonl", ".txt")
INSTRUCTION_SUFFIXES = (".jsonl",)


def _embedded_or_existing(value: str, info: ValidationInfo) -> str:
    if value.startswith("embedded:"):
        if value != EMBEDDED:
            raise ValueError(f"unknown embedded dataset {value!r}; available: {EMBEDDED!r}")
        return value
    return str(resolve_existing(value, info))


# Either the embedded dataset's name or a file/folder that must exist.
DataSource = Annotated[str, AfterValidator(_embedded_or_existing)]

# One cleaning operator, `{op: NAME, ...params}`, checked against the registry in `lmsmith.data.ops`
# and stored with every default filled in (so the config hash changes when a default does).
OpSpec = Annotated[dict[str, Any], AfterValidator(validate_op_spec)]


def _check_suffix(value: str, suffixes: tuple[str, ...], what: str) -> str:
    if value == EMBEDDED or Path(value).is_dir() or Path(value).suffix in suffixes:
        return value
    allowed = " or ".join(suffixes)
    raise ValueError(f"{value}: {what} must be a {allowed} file, a folder of them, or {EMBEDDED!r}")


class EmbeddedFinanceConfig(StrictModel):
    """Size of the embedded synthetic finance dataset (`lmsmith.datasets.finance`)."""

    seed: int = 0
    companies: int = Field(60, ge=1, le=1000)
    years: int = Field(5, ge=2, le=30)


class SplitConfig(StrictModel):
    """Train/val/test ratios. Whole groups (company-years) go to one split, drawn with `seed`."""

    ratios: tuple[float, float, float] = (0.8, 0.1, 0.1)
    seed: int = 0

    @field_validator("ratios")
    @classmethod
    def _sum_to_one(cls, ratios: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(r < 0 for r in ratios) or abs(sum(ratios) - 1.0) > 1e-6:
            raise ValueError(f"split ratios must be non-negative and sum to 1, got {ratios}")
        return ratios


class DataConfig(StrictModel):
    """Read, clean, deduplicate and split the corpus (raw text) and the instructions."""

    corpus: DataSource = Field(
        EMBEDDED,
        description="Raw-text corpus: a jsonl file (a 'text' field per line), a .txt file (documents "
        "separated by blank lines), a folder of those, or 'embedded:finance'.",
    )
    instructions: DataSource = Field(
        EMBEDDED,
        description="Instruction data: jsonl in alpaca, sharegpt or messages format (detected per line), "
        "a folder of such files, or 'embedded:finance'.",
    )
    embedded: EmbeddedFinanceConfig = EmbeddedFinanceConfig()
    ops: list[OpSpec] = Field(
        default_factory=lambda: [dict(spec) for spec in DEFAULT_OPS],
        validate_default=True,
        description="Cleaning operators in order: [{op: NAME, ...params}]; see `lmsmith.data.ops`.",
    )
    exact_dedup: bool = Field(True, description="Drop records whose normalised text was already seen.")
    split: SplitConfig = SplitConfig()

    @field_validator("corpus")
    @classmethod
    def _corpus_format(cls, value: str) -> str:
        return _check_suffix(value, CORPUS_SUFFIXES, "corpus")

    @field_validator("instructions")
    @classmethod
    def _instructions_format(cls, value: str) -> str:
        return _check_suffix(value, INSTRUCTION_SUFFIXES, "instructions")
