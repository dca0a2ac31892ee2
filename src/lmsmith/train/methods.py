"""Training methods: which weights an SFT run updates, and how the result is saved.

Each method config in `lmsmith.train.config.MethodConfig` has an entry in `APPLY` here. LoRA comes from
peft; the full fine-tune needs nothing beyond torch.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Collection

from lmsmith.errors import UserError
from lmsmith.train.config import FullMethod, LoraMethod


@dataclass(frozen=True)
class ParameterCount:
    trainable: int
    total: int

    @property
    def share(self) -> float:
        return self.trainable / self.total if self.total else 0.0


def count_parameters(model) -> ParameterCount:
    """Trainable and total parameters; tied weights are counted once (`parameters()` deduplicates)."""
    trainable = total = 0
    for param in model.parameters():
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
    return ParameterCount(trainable=trainable, total=total)


def apply_full(model, method: FullMethod, used_token_ids: Collection[int] = ()):
    """Every weight trains (embedding rows included, so `used_token_ids` changes nothing)."""
    for param in model.parameters():
        param.requires_grad_(True)
    return model


def linear_layer_names(model) -> list[str]:
    """Names (last component) of every `nn.Linear` except the output head: what "all-linear" means."""
    import torch

    head = model.get_output_embeddings()
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and module is not head
    }
    return sorted(names)


def trainable_token_ids(model, method: LoraMethod, used_token_ids: Collection[int]) -> list[int] | None:
    """Embedding rows that train with the adapters, per `method.train_tokens`.

    A base pretrained on other text never learned the rows of tokens that only the SFT data uses (the
    chat markers, a JSON answer format); frozen, those rows leave the adapters fighting a fixed, untrained
    output layer.
    """
    if method.train_tokens == "none":
        return None
    if method.train_tokens == "all":
        return list(range(model.get_input_embeddings().num_embeddings))
    return sorted(set(used_token_ids)) or None


def apply_lora(model, method: LoraMethod, used_token_ids: Collection[int] = ()):
    """Wrap `model` in a peft LoRA model; the adapters (and chosen embedding rows) train."""
    from peft import LoraConfig, get_peft_model

    layers = model.config.num_hidden_layers
    if method.layers_to_transform is not None:
        wrong = [i for i in method.layers_to_transform if not 0 <= i < layers]
        if wrong:
            raise UserError(
                f"sft.method.layers_to_transform: layer(s) {wrong} out of range; the model has {layers} layers"
            )
    # peft refuses layers_to_transform with the "all-linear" shorthand, so it is spelled out here.
    targets = linear_layer_names(model) if method.targets == "all-linear" else method.targets
    config = LoraConfig(
        r=method.r,
        lora_alpha=method.alpha,
        lora_dropout=method.dropout,
        target_modules=targets,
        layers_to_transform=method.layers_to_transform,
        trainable_token_indices=trainable_token_ids(model, method, used_token_ids),
        task_type="CAUSAL_LM",
    )
    try:
        with warnings.catch_warnings():
            # peft asks transformers a deprecated question about gradient checkpointing; nothing to act on.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            return get_peft_model(model, config)
    except ValueError as exc:
        raise UserError(f"sft.method: {exc}") from None


APPLY: dict[str, Callable] = {"full": apply_full, "lora": apply_lora}


def apply_method(model, method, used_token_ids: Collection[int] = ()):
    """The model to train under `method` (the same object for full fine-tuning, a peft wrapper for LoRA).

    `used_token_ids`: the token ids the training data contains.
    """
    return APPLY[method.name](model, method, used_token_ids)


def is_adapter(model) -> bool:
    return hasattr(model, "peft_config")


def save_adapter(model, path: Path) -> None:
    model.save_pretrained(path)


def merged_model(model):
    """A plain transformers model with any adapter folded into the base weights."""
    return model.merge_and_unload() if is_adapter(model) else model
