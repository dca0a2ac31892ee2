"""What a training run updates and how: the `method` block, and the distillation and DP-SGD blocks.

These are light pydantic models (no torch import), so recipes validate fast; `methods.py`, `objectives.py`
and `privacy.py` hold the code that applies them. Every method is one variant of the `MethodConfig`
union, chosen by `name`; `--set sft.method.r=8` without a name means the default method (LoRA).
"""

from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from pydantic import BeforeValidator, Field, model_validator

from lmsmith.paths import InputPath
from lmsmith.schema import StrictModel


class FullMethod(StrictModel):
    """Update every weight. Most memory (weights, gradients and two AdamW moments: about 16 bytes a
    parameter in fp32); best quality when data is plentiful."""

    name: Literal["full"] = "full"


class FreezeMethod(StrictModel):
    """Train only some layers: the last N decoder layers, or every parameter whose name matches a regex.
    Gradients and optimiser state exist only for those; the frozen rest needs no gradient memory."""

    name: Literal["freeze"] = "freeze"
    last_n_layers: Optional[int] = Field(
        2, ge=1, description="Train the last N decoder layers (ignored when `pattern` is set)."
    )
    pattern: Optional[str] = Field(
        None,
        description="Regex searched in parameter names (e.g. 'layers\\.(2|3)\\.mlp'); matching ones train.",
    )
    train_embeddings: bool = Field(False, description="Also train the input token embeddings.")
    train_head: bool = Field(
        False, description="Also train the output head (with tied embeddings this is the same matrix)."
    )
    train_final_norm: bool = Field(True, description="Also train the norm before the head (a few hundred weights).")

    @model_validator(mode="after")
    def _something_trains(self) -> "FreezeMethod":
        if self.pattern is not None:
            import re

            try:
                re.compile(self.pattern)
            except re.error as exc:
                raise ValueError(f"pattern: invalid regex: {exc}") from None
        elif self.last_n_layers is None:
            raise ValueError("set last_n_layers or pattern")
        return self


class LoraMethod(StrictModel):
    """Low-rank adapters (peft LoRA) beside frozen linear layers: W + (alpha/r)·B·A. Tiny optimiser state;
    the usual choice for instruction tuning. Seed advice: adapt the last 4 layers
    (`layers_to_transform: [L-4, ..., L-1]`) when the base already writes fluent text."""

    name: Literal["lora"] = "lora"
    r: int = Field(16, ge=1, description="Rank of the update.")
    alpha: int = Field(32, ge=1, description="Scale numerator: the update is multiplied by alpha / r.")
    dropout: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Dropout on the adapters' inputs. Off by default: on CPU its random masks cost about a "
        "third of a LoRA step, and it did not improve val loss on the embedded data.",
    )
    targets: Union[Literal["all-linear"], list[str]] = Field(
        "all-linear", description="Module names to adapt (e.g. [q_proj, v_proj]); all-linear: every linear but the head."
    )
    layers_to_transform: Optional[list[int]] = Field(
        None,
        description="Only adapt these decoder layer indices (None: every layer). The seed recommends the "
        "last 4 layers.",
    )
    train_tokens: Literal["none", "used", "all"] = Field(
        "used",
        description="Token embedding rows that train beside the adapters (peft trainable tokens): none, the "
        "tokens the SFT data uses (the chat tokens and any format the base never saw), or the whole vocabulary.",
    )


class DoraMethod(LoraMethod):
    """Weight-decomposed LoRA (peft `use_dora`): a LoRA direction plus a trained magnitude per output
    feature. Closer to full fine-tuning at low rank; about 20-30% slower than LoRA per step."""

    name: Literal["dora"] = "dora"  # type: ignore[assignment]


class QLoraMethod(LoraMethod):
    """LoRA over a 4-bit base: linear weights stored as bitsandbytes nf4 (double quantization squeezes
    the block scales too), adapters in full precision, paged 8-bit AdamW. Roughly a quarter of the
    base's weight memory; for bases that do not fit otherwise."""

    name: Literal["qlora"] = "qlora"  # type: ignore[assignment]
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type (nf4 suits normal weights).")
    double_quant: bool = Field(True, description="Quantize the quantization constants as well (about 0.4 bits/param saved).")
    compute_dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="Dtype the 4-bit weights are dequantized to for each matmul."
    )
    paged_optimizer: bool = Field(
        True, description="Paged 8-bit AdamW (bitsandbytes); false: plain torch AdamW on the adapters."
    )


class PrefixTuningMethod(StrictModel):
    """Prefix tuning (peft): trained key/value vectors prepended in every attention layer. The base is
    untouched; very few parameters; weaker than LoRA on small models."""

    name: Literal["prefix"] = "prefix"
    num_virtual_tokens: int = Field(16, ge=1, description="Length of the trained prefix.")
    projection: bool = Field(
        False, description="Produce the prefix with a small MLP (more stable training, more parameters)."
    )
    projection_hidden: int = Field(256, ge=1, description="Hidden width of that MLP.")


class PromptTuningMethod(StrictModel):
    """Prompt tuning (peft): trained input embeddings prepended to every sequence. The fewest parameters
    of all; needs a fairly large base to work well."""

    name: Literal["prompt"] = "prompt"
    num_virtual_tokens: int = Field(16, ge=1, description="Number of trained soft-prompt vectors.")
    init_text: Optional[str] = Field(
        None, description="Initialise the soft prompt from this text's token embeddings (None: random)."
    )


class Ia3Method(StrictModel):
    """IA3 adapters (peft): trained per-feature scaling vectors on attention and feed-forward
    activations. Fewer parameters than LoRA and no inference latency once merged."""

    name: Literal["ia3"] = "ia3"
    targets: Optional[list[str]] = Field(
        None, description="Modules to scale (None: peft's default for the architecture, e.g. k/v/down_proj)."
    )
    feedforward: Optional[list[str]] = Field(
        None, description="Which of `targets` are feed-forward (scaled on the input side); None: peft's default."
    )


DEFAULT_METHOD = "lora"
METHOD_CLASSES = (
    FullMethod,
    FreezeMethod,
    LoraMethod,
    DoraMethod,
    QLoraMethod,
    PrefixTuningMethod,
    PromptTuningMethod,
    Ia3Method,
)
ADAPTER_METHODS = ("lora", "dora", "qlora")  # methods whose result is a mergeable LoRA adapter


def _default_method_name(value: object) -> object:
    # `--set sft.method.r=8` names no method: it means the default one, not an error.
    if isinstance(value, dict) and "name" not in value:
        return {"name": DEFAULT_METHOD, **value}
    return value


MethodConfig = Annotated[
    Union[METHOD_CLASSES],  # one list of methods: the schema and the CLI help cannot drift apart
    Field(discriminator="name"),
    BeforeValidator(_default_method_name),
]


class DistillationConfig(StrictModel):
    """Knowledge distillation from a teacher that shares the student's tokenizer.

    Per target token: alpha · T² · KL(teacher_T ‖ student_T) + (1 − alpha) · CE(student, label), where
    `_T` means softmax at temperature T (the T² keeps gradient sizes comparable across temperatures).
    """

    teacher: InputPath = Field(..., description="Local HF causal-LM folder of the teacher.")
    temperature: float = Field(2.0, gt=0, description="Softening temperature T for both distributions.")
    alpha: float = Field(0.5, ge=0, le=1, description="Weight of the KL term; 1 - alpha weighs the label CE.")
    chunk_tokens: int = Field(
        1024, ge=1, description="Target positions per logits chunk (bounds memory: chunk × vocab floats)."
    )


class PrivacyConfig(StrictModel):
    """Differentially private SGD (opacus): per-example gradient clipping plus Gaussian noise, with
    Poisson sampling of each batch so the RDP accountant's ε at `delta` holds."""

    noise_multiplier: Optional[float] = Field(
        None, gt=0, description="Noise std as a multiple of max_grad_norm; set this or target_epsilon."
    )
    target_epsilon: Optional[float] = Field(
        None, gt=0, description="Calibrate the noise so the whole run spends this ε; set this or noise_multiplier."
    )
    max_grad_norm: float = Field(1.0, gt=0, description="Per-example gradient clipping bound C.")
    delta: Optional[float] = Field(
        None, gt=0, lt=1, description="δ of the (ε, δ) guarantee; required, and below 1 / number of examples."
    )
    accountant: Literal["rdp", "prv"] = Field("rdp", description="opacus privacy accountant.")
    secure_rng: Literal["auto", "required"] = Field(
        "auto",
        description="Noise and batch sampling never come from the recipe seed. auto: opacus' secure mode when "
        "torchcsprng is importable, else torch generators seeded from the OS (warned, and reported as "
        "dp_noise_secure: false); required: refuse to train without torchcsprng.",
    )

    @model_validator(mode="after")
    def _one_noise_source(self) -> "PrivacyConfig":
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError("set exactly one of noise_multiplier and target_epsilon")
        if self.delta is None:
            raise ValueError("delta is required: ε means nothing without the δ it holds at")
        return self
