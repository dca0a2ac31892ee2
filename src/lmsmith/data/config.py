from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, Field, ValidationInfo, field_validator

from lmsmith.paths import resolve_existing
from lmsmith.schema import StrictModel

EMBEDDED = "embedded:finance"


def _embedded_or_existing(value: str, info: ValidationInfo) -> str:
    if value.startswith("embedded:"):
        if value != EMBEDDED:
            raise ValueError(f"unknown embedded dataset {value!r}; available: {EMBEDDED!r}")
        return value
    return str(resolve_existing(value, info))


# Either the embedded dataset's name or a file/folder that must exist.
DataSource = Annotated[str, AfterValidator(_embedded_or_existing)]


class EmbeddedFinanceConfig(StrictModel):
    """Size of the embedded synthetic finance dataset (`lmsmith.datasets.finance`)."""

    seed: int = 0
    companies: int = Field(60, ge=1)
    years: int = Field(5, ge=2)


class SplitConfig(StrictModel):
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
        EMBEDDED, description="Raw-text corpus: a jsonl/txt file, or 'embedded:finance'."
    )
    instructions: DataSource = Field(
        EMBEDDED, description="Instruction data (alpaca or sharegpt jsonl), or 'embedded:finance'."
    )
    embedded: EmbeddedFinanceConfig = EmbeddedFinanceConfig()
    ops: list[dict[str, Any]] = Field(
        default_factory=list, description="Cleaning operators in order: [{op: NAME, ...params}]."
    )
    exact_dedup: bool = True
    split: SplitConfig = SplitConfig()
