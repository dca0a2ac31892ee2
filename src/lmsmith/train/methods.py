"""Training methods: which weights a run updates, the optimiser for them, and how the result is saved.

Each method config in `lmsmith.train.method_config.MethodConfig` has an entry in `APPLY`. peft supplies
LoRA, DoRA, prefix and prompt tuning and IA3; bitsandbytes the 4-bit base and paged 8-bit AdamW of QLoRA;
full fine-tuning and layer freezing need nothing beyond torch.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Callable, Collection

from lmsmith.console import console
from lmsmith.errors import UserError
from lmsmith.train.config import OptimConfig
from lmsmith.train.method_config import (
    FreezeMethod,
    FullMethod,
    Ia3Method,
    LoraMethod,
    PrefixTuningMethod,
    PromptTuningMethod,
    QLoraMethod,
)


@dataclass(frozen=True)
class TrainableStats:
    """How many parameters train under a method, out of how many the model holds."""

    trainable: int
    total: int

    @property
    def share(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def describe(self, method: str) -> str:
        return f"method {method}: {self.trainable:,} trainable of {self.total:,} parameters ({100 * self.share:.3f}%)"


def parameter_size(param) -> int:
    """Logical number of weights: a bitsandbytes 4-bit tensor packs two per byte and keeps the shape aside."""
    quant_state = getattr(param, "quant_state", None)
    if quant_state is not None:
        return prod(quant_state.shape)
    return param.numel()


def count_parameters(model) -> TrainableStats:
    """Trainable and total parameters; tied weights are counted once (`parameters()` deduplicates)."""
    trainable = total = 0
    for param in model.parameters():
        size = parameter_size(param)
        total += size
        if param.requires_grad:
            trainable += size
    return TrainableStats(trainable=trainable, total=total)


def _decoder_layers(model):
    """The ordered decoder layers of a causal LM (Qwen2, Llama, Mistral and kin keep them in `.layers`)."""
    decoder = model.get_decoder()
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise UserError(f"method: cannot find the decoder layers of a {type(model).__name__}")
    return layers


def _check_layer_indices(model, indices: list[int] | None, field: str) -> None:
    if indices is None:
        return
    layers = len(_decoder_layers(model))
    wrong = [i for i in indices if not 0 <= i < layers]
    if wrong:
        raise UserError(f"{field}: layer(s) {wrong} out of range; the model has {layers} layers")


# ---------------------------------------------------------------- full and freeze


def apply_full(model, method: FullMethod, used_token_ids: Collection[int] = ()):
    """Every weight trains (embedding rows included, so `used_token_ids` changes nothing)."""
    for param in model.parameters():
        param.requires_grad_(True)
    return model


def apply_freeze(model, method: FreezeMethod, used_token_ids: Collection[int] = ()):
    """Only the chosen layers (and, if asked, embeddings, head and final norm) train."""
    for param in model.parameters():
        param.requires_grad_(False)
    if method.pattern is not None:
        pattern = re.compile(method.pattern)
        chosen = [param for name, param in model.named_parameters() if pattern.search(name)]
        if not chosen:
            raise UserError(f"method.pattern: {method.pattern!r} matches no parameter name")
    else:
        layers = _decoder_layers(model)
        if method.last_n_layers > len(layers):
            raise UserError(
                f"method.last_n_layers: {method.last_n_layers} exceeds the model's {len(layers)} layers"
            )
        chosen = [param for layer in layers[-method.last_n_layers :] for param in layer.parameters()]
    if method.train_embeddings:
        chosen.extend(model.get_input_embeddings().parameters())
    if method.train_head:
        chosen.extend(model.get_output_embeddings().parameters())
    if method.train_final_norm:
        norm = getattr(model.get_decoder(), "norm", None)
        if norm is not None:
            chosen.extend(norm.parameters())
    for param in chosen:
        param.requires_grad_(True)
    return model


# ---------------------------------------------------------------- LoRA, DoRA, QLoRA


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


def _wrap_with_peft(model, config):
    from peft import get_peft_model

    try:
        with warnings.catch_warnings():
            # peft asks transformers a deprecated question about gradient checkpointing; nothing to act on.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            return get_peft_model(model, config)
    except ValueError as exc:
        raise UserError(f"method: {exc}") from None


def lora_config(model, method: LoraMethod, used_token_ids: Collection[int] = ()):
    """The peft `LoraConfig` for a LoRA, DoRA or QLoRA method."""
    from peft import LoraConfig

    _check_layer_indices(model, method.layers_to_transform, "method.layers_to_transform")
    # peft refuses layers_to_transform with the "all-linear" shorthand, so it is spelled out here.
    targets = linear_layer_names(model) if method.targets == "all-linear" else method.targets
    return LoraConfig(
        r=method.r,
        lora_alpha=method.alpha,
        lora_dropout=method.dropout,
        target_modules=targets,
        layers_to_transform=method.layers_to_transform,
        trainable_token_indices=trainable_token_ids(model, method, used_token_ids),
        use_dora=method.name == "dora",
        task_type="CAUSAL_LM",
    )


def apply_lora(model, method: LoraMethod, used_token_ids: Collection[int] = ()):
    """Wrap `model` in a peft LoRA (or DoRA) model; the adapters (and chosen embedding rows) train."""
    return _wrap_with_peft(model, lora_config(model, method, used_token_ids))


def bnb_config(method: QLoraMethod):
    """The transformers `BitsAndBytesConfig` of a QLoRA method (for `from_pretrained(quantization_config=)`)."""
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=method.quant_type,
        bnb_4bit_use_double_quant=method.double_quant,
        bnb_4bit_compute_dtype=getattr(torch, method.compute_dtype),
    )


def is_quantized(model) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False))


def quantize_linear_layers(model, method: QLoraMethod):
    """Replace every linear layer but the head by a bitsandbytes 4-bit one, in place, as
    `from_pretrained(quantization_config=bnb_config(method))` would load it."""
    import bitsandbytes as bnb
    import torch

    config = bnb_config(method)
    head = model.get_output_embeddings()
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if not isinstance(child, torch.nn.Linear) or child is head or isinstance(child, bnb.nn.Linear4bit):
                continue
            device = child.weight.device
            quantized = bnb.nn.Linear4bit(
                child.in_features,
                child.out_features,
                bias=child.bias is not None,
                compute_dtype=config.bnb_4bit_compute_dtype,
                compress_statistics=config.bnb_4bit_use_double_quant,
                quant_type=config.bnb_4bit_quant_type,
                device="meta",
            )
            # Moving a Params4bit to a device is what quantizes it.
            quantized.weight = bnb.nn.Params4bit(
                child.weight.data.float(),
                requires_grad=False,
                compress_statistics=config.bnb_4bit_use_double_quant,
                quant_type=config.bnb_4bit_quant_type,
            ).to(device)
            if child.bias is not None:
                quantized.bias = torch.nn.Parameter(child.bias.data.clone(), requires_grad=False)
            quantized.support_avx512bf16_for_cpu = False  # see apply_qlora
            setattr(module, child_name, quantized)
    model.is_loaded_in_4bit = True
    return model


def dequantize_linear_layers(model):
    """Turn every bitsandbytes 4-bit linear back into an fp32 `nn.Linear` holding the dequantized weights."""
    import bitsandbytes as bnb
    import torch

    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if not isinstance(child, bnb.nn.Linear4bit):
                continue
            # If an eval forward repacked the weights for bitsandbytes' CPU bf16 kernel (apply_qlora turns
            # that off), saving a state dict restores the standard layout that dequantize_4bit reads.
            child.state_dict()
            weight = bnb.functional.dequantize_4bit(child.weight.data, child.weight.quant_state).float()
            plain = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
            plain.weight = torch.nn.Parameter(weight, requires_grad=False)
            if child.bias is not None:
                plain.bias = torch.nn.Parameter(child.bias.data.float(), requires_grad=False)
            setattr(module, child_name, plain)
    model.is_loaded_in_4bit = False
    # A base loaded through from_pretrained(quantization_config=...) would otherwise save as 4-bit.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    for attribute in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(model.config, attribute):
            delattr(model.config, attribute)
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    return model


def keep_fp32_cpu_kernel(model) -> None:
    """Make bitsandbytes' 4-bit layers compute eval forwards as they compute training ones (see apply_qlora)."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def apply_qlora(model, method: QLoraMethod, used_token_ids: Collection[int] = ()):
    """Quantize the base to 4 bits (unless it was loaded so), prepare it for k-bit training, add LoRA.

    On CPUs with bf16 support bitsandbytes would run eval-mode forwards through a repacked bf16 kernel
    (logits about 1e-2 away from training's fp32 ones, and a lossy layout to merge from); lmsmith turns
    that off so validation, merging and training see the same weights.
    """
    from peft import prepare_model_for_kbit_training

    if not is_quantized(model):
        quantize_linear_layers(model, method)
    keep_fp32_cpu_kernel(model)
    # Freezes the base and keeps norms and embeddings in fp32; checkpointing is the loop's decision.
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return apply_lora(model, method, used_token_ids)


# ---------------------------------------------------------------- prompt learning and IA3


def apply_prefix(model, method: PrefixTuningMethod, used_token_ids: Collection[int] = ()):
    from peft import PrefixTuningConfig

    config = PrefixTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=method.num_virtual_tokens,
        prefix_projection=method.projection,
        encoder_hidden_size=method.projection_hidden,
    )
    return _wrap_with_peft(model, config)


def apply_prompt(model, method: PromptTuningMethod, used_token_ids: Collection[int] = ()):
    from peft import PromptTuningConfig, PromptTuningInit

    fields = {}
    if method.init_text is not None:
        name = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", "")
        if not name or not Path(name).is_dir():
            raise UserError("method.init_text: needs a model loaded from a local folder (its tokenizer encodes the text)")
        fields = {
            "prompt_tuning_init": PromptTuningInit.TEXT,
            "prompt_tuning_init_text": method.init_text,
            "tokenizer_name_or_path": str(name),
        }
    config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=method.num_virtual_tokens, **fields)
    return _wrap_with_peft(model, config)


def apply_ia3(model, method: Ia3Method, used_token_ids: Collection[int] = ()):
    from peft import IA3Config

    if method.feedforward is not None and method.targets is not None:
        stray = sorted(set(method.feedforward) - set(method.targets))
        if stray:
            raise UserError(f"method.feedforward: {stray} are not in method.targets")
    config = IA3Config(
        task_type="CAUSAL_LM", target_modules=method.targets, feedforward_modules=method.feedforward
    )
    return _wrap_with_peft(model, config)


APPLY: dict[str, Callable] = {
    "full": apply_full,
    "freeze": apply_freeze,
    "lora": apply_lora,
    "dora": apply_lora,
    "qlora": apply_qlora,
    "prefix": apply_prefix,
    "prompt": apply_prompt,
    "ia3": apply_ia3,
}


def apply_method(model, method, used_token_ids: Collection[int] = ()):
    """(the model to train under `method`, its trainable-parameter stats), and logs those stats.

    Full and freeze return the same object with `requires_grad` set; the others a peft wrapper.
    `used_token_ids`: the token ids the training data contains (LoRA's `train_tokens: used`).
    """
    model = APPLY[method.name](model, method, used_token_ids)
    stats = count_parameters(model)
    if stats.trainable == 0:
        raise UserError(f"method {method.name}: no parameter trains under these settings")
    console.print(stats.describe(method.name))
    return model, stats


# ---------------------------------------------------------------- optimiser


def parameter_groups(model, weight_decay: float) -> list[dict]:
    """Trainable parameters in two groups: matrices decay; vectors (norms, biases, DoRA magnitudes) do not."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [group for group in groups if group["params"]]


def build_optimizer(model, method, optim: OptimConfig):
    """AdamW over the trainable parameters; QLoRA with `paged_optimizer` gets bitsandbytes' paged 8-bit
    AdamW (on CPU bitsandbytes falls back to unpaged 8-bit state, still a quarter of fp32 moments)."""
    import torch

    groups = parameter_groups(model, optim.weight_decay)
    if isinstance(method, QLoraMethod) and method.paged_optimizer:
        import bitsandbytes as bnb

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU.*")
            return bnb.optim.PagedAdamW8bit(groups, lr=optim.lr, betas=optim.betas)
    return torch.optim.AdamW(groups, lr=optim.lr, betas=optim.betas, **_adamw_kernel(groups))


def _adamw_kernel(groups: list[dict]) -> dict:
    """torch's fused AdamW (one kernel for every tensor; about 4x faster a step than foreach on CPU) where
    it applies: plain CPU or CUDA tensors of one floating dtype. Sharded (DTensor) parameters and anything
    else keep the foreach kernel."""
    import torch

    params = [param for group in groups for param in group["params"]]
    plain = all(type(param.data) is torch.Tensor and param.device.type in ("cpu", "cuda") for param in params)
    one_dtype = len({param.dtype for param in params}) == 1 and params and params[0].dtype.is_floating_point
    return {"fused": True} if plain and one_dtype else {"foreach": True}


# ---------------------------------------------------------------- saving


def is_adapter(model) -> bool:
    return hasattr(model, "peft_config")


def is_mergeable(model) -> bool:
    """Whether the adapter folds into the base weights (LoRA kin and IA3; prompt learning does not)."""
    if not is_adapter(model):
        return True
    return not getattr(model.peft_config[model.active_adapter], "is_prompt_learning", False)
