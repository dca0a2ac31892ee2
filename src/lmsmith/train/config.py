"""Configs for the pretrain and sft stages. The model, optimiser and method blocks are shared."""

from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from pydantic import Field, model_validator

from lmsmith.paths import InputPath
from lmsmith.schema import StrictModel


class TinyModelConfig(StrictModel):
    """A from-scratch Qwen2-architecture model (transformers' `Qwen2Config`)."""

    architecture: Literal["qwen2"] = "qwen2"
    hidden_size: int = Field(256, ge=16)
    num_layers: int = Field(4, ge=1)
    num_heads: int = Field(4, ge=1)
    num_kv_heads: int = Field(2, ge=1)
    intermediate_size: int = Field(688, ge=16)
    max_position_embeddings: int = Field(1024, ge=64)
    tie_word_embeddings: bool = True

    @model_validator(mode="after")
    def _heads_divide(self) -> "TinyModelConfig":
        if self.hidden_size % self.num_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must divide hidden_size ({self.hidden_size})")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_kv_heads ({self.num_kv_heads}) must divide num_heads ({self.num_heads})")
        return self


class OptimConfig(StrictModel):
    """AdamW with linear warmup then cosine decay; norms and biases get no weight decay."""

    lr: float = Field(1e-3, gt=0, description="Peak learning rate, reached after warmup.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final learning rate as a share of `lr`.")
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.05, ge=0, le=1, description="Share of the steps spent warming up.")
    grad_clip: float = Field(1.0, gt=0, description="Clip the global gradient norm to this.")
    betas: tuple[float, float] = (0.9, 0.95)


class FullMethod(StrictModel):
    """Update every weight."""

    name: Literal["full"] = "full"


class LoraMethod(StrictModel):
    """Low-rank adapters via peft; the base stays frozen."""

    name: Literal["lora"] = "lora"
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Dropout on the adapters' inputs. Off by default: on CPU its random masks cost about a "
        "third of a LoRA step, and it did not improve val loss on the embedded data.",
    )
    targets: Union[Literal["all-linear"], list[str]] = "all-linear"
    layers_to_transform: Optional[list[int]] = Field(
        None, description="Only adapt these layer indices (None: every layer)."
    )
    train_tokens: Literal["none", "used", "all"] = Field(
        "used",
        description="Token embedding rows that train beside the adapters (peft trainable tokens): none, the "
        "tokens the SFT data uses (the chat tokens and any format the base never saw), or the whole vocabulary.",
    )


MethodConfig = Annotated[Union[FullMethod, LoraMethod], Field(discriminator="name")]


class TrainingSchedule(StrictModel):
    """How long and in what portions to train, and how often to log and validate."""

    batch_size: int = Field(16, ge=1, description="Sequences per micro-batch.")
    grad_accum_steps: int = Field(
        1, ge=1, description="Micro-batches per optimiser step; the loss is averaged over all their target tokens."
    )
    epochs: float = Field(1.0, gt=0)
    max_steps: Optional[int] = Field(None, ge=1, description="Stop after this many optimiser steps.")
    optim: OptimConfig = OptimConfig()
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="Matrix precision while training (bf16 autocast keeps fp32 weights); "
        "auto: bf16 where the CPU has native bf16, else fp32. Saved weights are always fp32.",
    )
    attention: Literal["eager", "sdpa"] = Field(
        "eager",
        description="Attention kernel while training. On CPU, eager is faster for short sequences: "
        "sdpa's flash-attention backward dominated the step time in measurements.",
    )
    log_every: int = Field(5, ge=1, description="Write a metrics.jsonl row every N optimiser steps.")
    val_every: Optional[int] = Field(
        None, ge=1, description="Measure val loss every N steps (None: four times over the run); always at the end."
    )


class PretrainConfig(TrainingSchedule):
    """Continued pretraining (causal LM) on the cleaned corpus."""

    base_model: Optional[InputPath] = Field(
        None, description="A local HF causal-LM folder to continue from; None builds `model` from scratch."
    )
    model: TinyModelConfig = TinyModelConfig()
    seq_len: int = Field(256, ge=16, description="Length of the packed training blocks.")
    # The embedded corpus is small (about 75k tokens): many passes keep improving val loss without
    # overfitting, and 12 take about 1-1.5 minutes on 2 cores.
    epochs: float = Field(12.0, gt=0)
    optim: OptimConfig = OptimConfig(lr=2e-3)


class SFTConfig(TrainingSchedule):
    """Supervised fine-tuning on chat-formatted instructions with answer-only loss."""

    base_model: Optional[InputPath] = Field(
        None, description="A local HF causal-LM folder; None takes the pretrain stage's model."
    )
    method: MethodConfig = LoraMethod()
    max_len: int = Field(384, ge=16, description="Longer conversations are skipped (and counted), not cut.")
    epochs: float = Field(5.0, gt=0)
    optim: OptimConfig = OptimConfig(lr=2e-3)
