"""Configs for the pretrain and sft stages. The model, optimiser and method blocks are shared."""

from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from pydantic import BeforeValidator, Field

from lmsmith.paths import InputPath
from lmsmith.schema import StrictModel


class TinyModelConfig(StrictModel):
    """A from-scratch Qwen2-architecture model (transformers' `Qwen2Config`)."""

    architecture: Literal["qwen2"] = "qwen2"
    hidden_size: int = Field(128, ge=16)
    num_layers: int = Field(4, ge=1)
    num_heads: int = Field(4, ge=1)
    num_kv_heads: int = Field(2, ge=1)
    intermediate_size: int = Field(352, ge=16)
    max_position_embeddings: int = Field(1024, ge=64)
    tie_word_embeddings: bool = True


class OptimConfig(StrictModel):
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.05, ge=0, le=1)
    grad_clip: float = Field(1.0, gt=0)
    betas: tuple[float, float] = (0.9, 0.95)


class FullMethod(StrictModel):
    """Update every weight."""

    name: Literal["full"] = "full"


class LoraMethod(StrictModel):
    """Low-rank adapters via peft; the base stays frozen."""

    name: Literal["lora"] = "lora"
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    targets: Union[Literal["all-linear"], list[str]] = "all-linear"
    layers_to_transform: Optional[list[int]] = Field(
        None, description="Only adapt these layer indices (None: every layer)."
    )


DEFAULT_METHOD = "lora"


def _default_method_name(value: object) -> object:
    # `--set sft.method.r=8` names no method: it means the default one, not an error.
    if isinstance(value, dict) and "name" not in value:
        return {"name": DEFAULT_METHOD, **value}
    return value


MethodConfig = Annotated[
    Union[FullMethod, LoraMethod], Field(discriminator="name"), BeforeValidator(_default_method_name)
]


class PretrainConfig(StrictModel):
    """Continued pretraining (causal LM) on the cleaned corpus."""

    base_model: Optional[InputPath] = Field(
        None, description="A local HF causal-LM folder to continue from; None builds `model` from scratch."
    )
    model: TinyModelConfig = TinyModelConfig()
    seq_len: int = Field(256, ge=16)
    batch_size: int = Field(16, ge=1)
    epochs: float = Field(1.0, gt=0)
    max_steps: Optional[int] = Field(None, ge=1, description="Stop after this many optimiser steps.")
    optim: OptimConfig = OptimConfig()
    log_every: int = Field(10, ge=1)


class SFTConfig(StrictModel):
    """Supervised fine-tuning on chat-formatted instructions with answer-only loss."""

    base_model: Optional[InputPath] = Field(
        None, description="A local HF causal-LM folder; None takes the pretrain stage's model."
    )
    method: MethodConfig = LoraMethod()
    max_len: int = Field(384, ge=16)
    batch_size: int = Field(16, ge=1)
    epochs: float = Field(3.0, gt=0)
    max_steps: Optional[int] = Field(None, ge=1)
    optim: OptimConfig = OptimConfig(lr=2e-3)
    log_every: int = Field(10, ge=1)
