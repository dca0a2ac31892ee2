"""The compress stage's schema: a list of named variants, each one method, and the quality gate."""

from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from pydantic import Field, model_validator

from lmsmith.schema import StrictModel
from lmsmith.train.config import OptimConfig, TrainingSchedule

# What a module may be stored and run as (mixed precision; the other methods pick one of these).
PRECISIONS = ("fp32", "bf16", "fp16", "int8", "int8_weight", "int4_weight")
Precision = Literal["fp32", "bf16", "fp16", "int8", "int8_weight", "int4_weight"]


def refuse_inapplicable(variant: StrictModel, fields: tuple[str, ...], why: str) -> None:
    """A field this variant's settings do not use, given another value than its default, is an error
    rather than ignored. (By value, not by what was typed: a saved recipe.json repeats every default.)"""
    given = [name for name in fields
             if getattr(variant, name) != variant.model_fields[name].get_default(call_default_factory=True)]
    if given:
        raise ValueError(f"{', '.join(given)}: not used {why}")


class VariantBase(StrictModel):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
                      description="Folder under RUN/compress/ and the name `lmsmith serve --variant` takes.")
    source: Optional[str] = Field(
        None, description="Another variant's name to compress further (e.g. quantize a distilled student); "
        "None: the tuned model.")
    modules: list[str] = Field(["*"], description="fnmatch patterns of the Linear modules this method touches.")
    skip: list[str] = Field([], description="fnmatch patterns of Linear modules left as they are.")
    max_drop: Optional[dict[str, float]] = Field(
        None, description="This variant's gate, replacing compress.gate.max_drop (same keys).")


class DynamicInt8(VariantBase):
    """INT8 weights, activations quantized per call from their own range (fbgemm's int8 GEMM)."""

    method: Literal["dynamic_int8"] = "dynamic_int8"
    weights: Literal["per_channel", "per_tensor"] = "per_channel"


class StaticInt8(VariantBase):
    """W8A8: INT8 weights, and activations quantized with ranges fixed by calibration."""

    method: Literal["static_int8"] = "static_int8"
    calibration_samples: int = Field(128, ge=1, description="Conversations from the train split run through the "
                                     "model to fix activation ranges.")
    calibration_max_len: int = Field(256, ge=8, description="Tokens per calibration sample (longer ones are cut).")
    weights: Literal["per_channel", "per_tensor"] = "per_channel"
    scheme: Literal["symmetric", "asymmetric"] = Field(
        "asymmetric", description="Zero point at the middle of the int8 range (symmetric) or fitted to the "
        "observed minimum (asymmetric); applies to weights and activations.")
    observer: Literal["minmax", "percentile"] = "minmax"
    percentile: float = Field(99.99, gt=50, le=100, description="percentile observer: the range kept, in %.")
    smoothquant: Optional[float] = Field(
        None, ge=0, le=1, description="SmoothQuant's alpha: move activation outliers into the weights "
        "(s = max|X|^a / max|W|^(1-a)) before quantizing; None: off.")

    @model_validator(mode="after")
    def _observer(self) -> "StaticInt8":
        if self.observer != "percentile":
            refuse_inapplicable(self, ("percentile",), "by the minmax observer")
        return self


class WeightOnly(VariantBase):
    """INT8 or INT4 weights, bf16 activations (ATen's int8/int4 weight-packed matmuls)."""

    method: Literal["weight_only"] = "weight_only"
    bits: Literal[8, 4] = 8
    group_size: int = Field(64, description="INT4: weights per scale/zero pair along the input dimension.")

    @model_validator(mode="after")
    def _group(self) -> "WeightOnly":
        if self.bits == 4 and self.group_size not in (32, 64, 128, 256):
            raise ValueError("group_size: INT4 groups are 32, 64, 128 or 256 weights")
        if self.bits == 8:
            refuse_inapplicable(self, ("group_size",), "by INT8 weights (one scale per row)")
        return self


class Mixed(VariantBase):
    """A precision per module pattern, e.g. attention in bf16 and the MLP in INT8."""

    method: Literal["mixed"] = "mixed"
    precision: dict[str, Precision] = Field(
        description="fnmatch pattern → precision, first match wins, e.g. {'*.self_attn.*': bf16, '*.mlp.*': int8}.")
    default: Precision = Field("fp32", description="Precision of Linear modules no pattern matches.")
    group_size: int = Field(64, description="Group size of int4_weight modules.")


class Recovery(TrainingSchedule):
    """A short full fine-tune on the run's sft train split after pruning, to win back what it cost."""

    max_steps: Optional[int] = Field(30, ge=1)
    max_len: int = Field(256, ge=16, description="Longer conversations are skipped.")
    optim: OptimConfig = OptimConfig(lr=5e-4)
    checkpoint_every: Optional[int] = None
    val_every: Optional[int] = Field(None, ge=1)


class Prune(VariantBase):
    """Magnitude pruning (unstructured or 2:4) or structured removal of attention heads and MLP channels."""

    method: Literal["prune"] = "prune"
    kind: Literal["magnitude", "2:4", "structured"] = "magnitude"
    sparsity: float = Field(0.5, gt=0, lt=1, description="magnitude: share of each matrix's weights set to zero.")
    heads: float = Field(0.0, ge=0, lt=1, description="structured: share of key/value head groups removed per layer.")
    mlp: float = Field(0.25, ge=0, lt=1, description="structured: share of MLP channels removed per layer.")
    calibration_samples: int = Field(64, ge=1, description="structured: train conversations that rank heads and "
                                     "channels by how much they contribute.")
    recovery: Optional[Recovery] = Field(None, description="A short fine-tune after pruning; None: none.")

    @model_validator(mode="after")
    def _kind(self) -> "Prune":
        if self.kind == "structured" and not (self.heads or self.mlp):
            raise ValueError("structured pruning: set heads and/or mlp to the share removed")
        if self.kind == "2:4" and "sparsity" in self.model_fields_set and self.sparsity != 0.5:
            raise ValueError("sparsity: 2:4 pruning is always 0.5 (two of every four weights)")
        if self.kind == "structured":
            refuse_inapplicable(self, ("sparsity",), "by structured pruning (it removes heads and channels)")
        else:
            refuse_inapplicable(self, ("heads", "mlp", "calibration_samples"), f"by {self.kind} pruning")
        return self


class DistillTraining(TrainingSchedule):
    """The student's training: the sft stage's distillation loss (KL to the teacher + CE) on the train split."""

    epochs: float = 2.0
    max_len: int = Field(256, ge=16, description="Longer conversations are skipped.")
    temperature: float = Field(2.0, gt=0)
    alpha: float = Field(0.5, ge=0, le=1, description="Weight of the KL term; 1 − alpha weighs the CE term.")
    optim: OptimConfig = OptimConfig(lr=2e-3)
    checkpoint_every: Optional[int] = None


class Distill(VariantBase):
    """A smaller student initialised from the teacher's layers, trained to match the teacher."""

    method: Literal["distill"] = "distill"
    layers: Optional[int] = Field(None, ge=1, description="Layers kept, evenly spaced from first to last.")
    keep_layers: Optional[list[int]] = Field(None, description="Exactly which teacher layers the student keeps.")
    mlp: float = Field(0.0, ge=0, lt=1, description="Share of MLP channels removed (a narrower student).")
    heads: float = Field(0.0, ge=0, lt=1, description="Share of key/value head groups removed.")
    calibration_samples: int = Field(64, ge=1, description="Conversations that rank channels/heads when narrowing.")
    training: DistillTraining = DistillTraining()

    @model_validator(mode="after")
    def _shape(self) -> "Distill":
        if self.layers is not None and self.keep_layers is not None:
            raise ValueError("distill: give layers or keep_layers, not both")
        if self.layers is None and self.keep_layers is None and not (self.mlp or self.heads):
            raise ValueError("distill: the student must be smaller: set layers, keep_layers, mlp or heads")
        refuse_inapplicable(self, ("modules", "skip"), "by distill (the student is the whole model)")
        if not (self.mlp or self.heads):
            refuse_inapplicable(self, ("calibration_samples",), "unless mlp or heads narrow the student")
        return self


Variant = Annotated[Union[DynamicInt8, StaticInt8, WeightOnly, Mixed, Prune, Distill], Field(discriminator="method")]


class GateConfig(StrictModel):
    """How much each variant may lose against the model it was made from."""

    max_drop: dict[str, float] = Field(
        {"agreement": 10.0, "perplexity": 10.0},
        description="Metric → largest allowed loss: agreement (points below 100% argmax agreement with the "
        "source), perplexity (% increase), or TASK.METRIC of the scored tasks (points, sign-aware).")
    strict: bool = Field(False, description="A variant over its max_drop fails the run (false: it is marked failed).")


class CompressConfig(StrictModel):
    """Compressed variants of the tuned model, each scored and timed against it."""

    variants: list[Variant] = Field(
        default_factory=lambda: [DynamicInt8(name="int8")],
        description="Each is a folder RUN/compress/<name> with a manifest.")
    gate: GateConfig = GateConfig()
    tasks: list[str] = Field(["held-out"], description="Eval tasks every variant is scored on (the eval stage's names).")
    max_items: Optional[int] = Field(40, ge=1, description="Items scored per task.")
    max_new_tokens: Optional[int] = Field(96, ge=1, description="Cap on answer length.")
    batch_size: int = Field(16, ge=1, description="Sequences per forward pass (agreement, perplexity, the tasks).")
    agreement_texts: int = Field(16, ge=1, description="Held-out texts whose next-token argmax is compared with "
                                 "the source model's at every position.")
    speed_requests: int = Field(4, ge=1, description="Requests timed per variant (tok/s at batch 1, p50 latency).")
    speed_batch: int = Field(8, ge=1, description="Batch size of the batched tok/s figure.")
    speed_new_tokens: int = Field(48, ge=1)
    peak_memory: bool = Field(True, description="Measure each variant's peak memory in a fresh process.")

    @model_validator(mode="after")
    def _names(self) -> "CompressConfig":
        seen: set[str] = set()
        for variant in self.variants:
            if variant.name in seen:
                raise ValueError(f"variants: two variants are named {variant.name!r}")
            if variant.name == "source":
                raise ValueError("variants: 'source' names the tuned model in the comparison; pick another name")
            if variant.source is not None and variant.source not in seen:
                raise ValueError(f"variants.{variant.name}.source: {variant.source!r} is not a variant listed "
                                 "before it")
            seen.add(variant.name)
        if not self.variants:
            raise ValueError("variants: list at least one")
        return self
