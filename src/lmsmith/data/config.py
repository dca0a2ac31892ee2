"""The data stage's config. Light on purpose: pydantic and the operator registry, no torch."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Optional

from pydantic import AfterValidator, Field, ValidationInfo, field_validator

from lmsmith.data.annotate import AnnotateConfig
from lmsmith.data.augment import AugmentConfig
from lmsmith.data.executor import ExecutorKind
from lmsmith.data.io import SUFFIXES, TextUnit, is_supported
from lmsmith.data.record import RecordFormat
from lmsmith.data.steps import DEFAULT_OPS, Target, validate_op_spec
from lmsmith.data.quality import QualityConfig
from lmsmith.data.synth import SynthConfig
from lmsmith.paths import resolve_existing
from lmsmith.schema import StrictModel

EMBEDDED = "embedded:finance"
EMBEDDED_MODERATION = "embedded:moderation"  # instructions only: the moderation classifier's labelled set


def _embedded_or_existing(value: str, info: ValidationInfo) -> str:
    if value.startswith("embedded:"):
        if value not in (EMBEDDED, EMBEDDED_MODERATION):
            raise ValueError(f"unknown embedded dataset {value!r}; available: {EMBEDDED!r}, {EMBEDDED_MODERATION!r}")
        return value
    return str(resolve_existing(value, info))


_embedded_or_existing.resolves_paths = True

# Either the embedded dataset's name or a file/folder that must exist.
DataSource = Annotated[str, AfterValidator(_embedded_or_existing)]

# One cleaning operator, `{op: NAME, ...params}`, checked against the registry in `lmsmith.data.steps`
# and stored with every default filled in (so the config hash changes when a default does).
def _op_spec(value: Any, info: ValidationInfo) -> dict[str, Any]:
    return validate_op_spec(value, info)  # with the recipe's folder, for the operators' file parameters


OpSpec = Annotated[dict[str, Any], AfterValidator(_op_spec)]


def _check_suffix(value: str, what: str) -> str:
    if value in (EMBEDDED, EMBEDDED_MODERATION) or Path(value).is_dir() or is_supported(Path(value)):
        return value
    raise ValueError(f"{value}: {what} must be a {', '.join(SUFFIXES)} file (optionally .gz), a folder of them, "
                     f"or {EMBEDDED!r}")


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


class NearDedupConfig(StrictModel):
    """MinHash LSH near-duplicate removal (`lmsmith.data.minhash`): the first text of each cluster of
    texts whose estimated Jaccard similarity reaches `threshold` is kept."""

    enabled: bool = Field(True, description="Run near-duplicate removal.")
    threshold: float = Field(0.8, gt=0, lt=1, description="Estimated Jaccard similarity of shingle sets at which two texts are duplicates.")
    num_perm: int = Field(128, ge=16, le=1024, description="MinHash signature slots (more: finer estimates, slower).")
    unit: Literal["auto", "char", "word"] = Field(
        "auto", description="Shingle unit: char n-grams (Chinese), word n-grams, or auto per text by its Han share."
    )
    char_ngram: int = Field(5, ge=1, le=32, description="Characters per shingle.")
    word_ngram: int = Field(3, ge=1, le=16, description="Words per shingle.")
    apply_to: Target = Field(
        "corpus",
        description="corpus: raw texts only (templated instructions differ only by their numbers and would "
        "cluster), instructions, or both.",
    )


class StreamConfig(StrictModel):
    """What the recipe's data stage and `lmsmith data clean` share: the operators in order, exact and
    near-duplicate removal, how input is read and batched, and the executor that runs the operators."""

    ops: list[OpSpec] = Field(
        default_factory=lambda: [dict(spec) for spec in DEFAULT_OPS],
        validate_default=True,
        description="Cleaning operators in order: [{op: NAME, ...params}]; `lmsmith data ops` lists them.",
    )
    exact_dedup: bool = Field(True, description="Drop records whose normalised text was already seen.")
    near_dedup: NearDedupConfig = NearDedupConfig()
    text_unit: TextUnit = Field("block", description="txt/md files: one record per blank-line-separated block, or per file.")
    batch_size: int = Field(256, ge=1, description="Records per work unit sent to a worker.")
    shard_bytes: int = Field(1 << 30, ge=1, description="Input bytes per shard (about 1 GB): the manifest and stats count records and bytes per shard.")
    executor: ExecutorKind = Field("local", description="Run the operators in local processes or on Ray Data.")
    workers: int = Field(1, ge=1, description="Worker processes (local) or Ray actors.")
    fit_sample: int = Field(
        2000, ge=10, description="Records read from the start of each source to fit the fitted operators on "
        "(perplexity by quantile, quality_classifier, coverage) before the stream runs.",
    )
    ray_address: Optional[str] = Field(
        None, description="A running Ray cluster to join (ray.init(address=...), e.g. 'ray://head:10001' or "
        "'auto'); unset: start a local Ray with `workers` CPUs. Only with executor: ray.",
    )

    @field_validator("ray_address")
    @classmethod
    def _address_needs_ray(cls, value: Optional[str], info: ValidationInfo) -> Optional[str]:
        if value and info.data.get("executor") != "ray":
            raise ValueError("ray_address is only used with executor: ray")
        return value


class PipelineConfig(StreamConfig):
    """A cleaning pipeline for `lmsmith data clean --pipeline PIPE.yaml`."""

    format: RecordFormat = Field("auto", description="Record format: auto (per record), text, alpaca, sharegpt or messages.")


class DataConfig(StreamConfig):
    """Read, clean, deduplicate and split the corpus (raw text) and the instructions."""

    corpus: DataSource = Field(
        EMBEDDED,
        description="Raw-text corpus: a jsonl/json/csv/parquet file with a 'text' field per row, a txt/md file "
        "(documents separated by blank lines), any of them gzipped, a folder of those, or 'embedded:finance'.",
    )
    instructions: DataSource = Field(
        EMBEDDED,
        description="Instruction data: alpaca, sharegpt or messages rows (detected per row) in jsonl/json/csv/"
        "parquet files, gzipped or not, a folder of such files, 'embedded:finance', or 'embedded:moderation' (the moderation classifier's "
        "labelled set, docs/security.md).",
    )
    embedded: EmbeddedFinanceConfig = EmbeddedFinanceConfig()
    on_error: Literal["fail", "skip"] = Field(
        "fail", description="A malformed row stops the stage naming file:line (fail), or goes to dropped.jsonl "
        "with reason 'read' and the same message (skip).",
    )
    split: SplitConfig = SplitConfig()
    synth_tables: list[DataSource] = Field(
        default_factory=list,
        description="Company × year × metric tables (csv/json/jsonl) turned into instructions before the split.",
    )
    synth: SynthConfig = SynthConfig()
    quality: Optional[QualityConfig] = Field(
        QualityConfig(), description="3C quality report (quality/report.{json,md,html}); null turns it off."
    )
    augment: Optional[AugmentConfig] = Field(
        None, description="Augment the train instructions (EDA, back-translation, oversampling); null: off."
    )
    annotate: Optional[AnnotateConfig] = Field(
        None, description="BIO-annotate the instructions (entities.conll, seqeval scores); null: off."
    )

    @field_validator("corpus")
    @classmethod
    def _corpus_format(cls, value: str) -> str:
        if value == EMBEDDED_MODERATION:
            raise ValueError(f"{EMBEDDED_MODERATION} is a labelled instruction set, not a corpus; use it as "
                             "data.instructions")
        return _check_suffix(value, "corpus")

    @field_validator("instructions")
    @classmethod
    def _instructions_format(cls, value: str) -> str:
        return _check_suffix(value, "instructions")
