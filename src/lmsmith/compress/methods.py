"""Each compression method: from a source model and the run's data to a variant model.

`build` dispatches on the variant's `method`; every builder works on a copy and returns the model, the
weights to store sparse, and facts for the variant's manifest (what was touched, what was left and why).
The modules are `lmsmith.compress.quant`'s, the pruning `lmsmith.compress.prune`'s, the training
`lmsmith.compress.finetune`'s.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from lmsmith.compress import calibrate, prune, quant
from lmsmith.compress.config import DynamicInt8, Distill, Mixed, Prune, StaticInt8, WeightOnly
from lmsmith.console import track
from lmsmith.errors import UserError


@dataclass
class Materials:
    """What methods may read besides the source model: the tokenizer, the run's train/val conversations."""

    tokenizer: Any
    train: Sequence[list[dict]]
    val: Sequence[list[dict]]
    seed: int
    work_dir: Path


@dataclass
class Built:
    model: nn.Module
    sparse: list[str] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)


def _targets(model: nn.Module, variant) -> list[tuple[str, nn.Linear]]:
    chosen = quant.selected_linears(model, variant.modules, variant.skip)
    if not chosen:
        raise UserError(f"compress.variants.{variant.name}: modules {variant.modules} (skip {variant.skip}) "
                        "select no Linear module of the model")
    return chosen


def _calibration(variant, materials: Materials, count: int, max_len: int):
    conversations = list(materials.train[:count])
    if not conversations:
        raise UserError(f"compress.variants.{variant.name}: the train split holds no conversations to calibrate on")
    return calibrate.calibration_batches(materials.tokenizer, conversations, max_len)


def dynamic_int8(model: nn.Module, variant: DynamicInt8, materials: Materials) -> Built:
    targets = _targets(model, variant)
    with track(f"{variant.name}: quantize", len(targets)) as progress:
        for name, linear in targets:
            quant.set_module(model, name, quant.DynamicInt8Linear.from_linear(linear, variant.weights == "per_channel"))
            progress.advance()
    return Built(model, facts={"quantized_modules": len(targets), "weights": variant.weights,
                               "activations": "int8 per call (dynamic range)"})


def static_int8(model: nn.Module, variant: StaticInt8, materials: Materials) -> Built:
    targets = _targets(model, variant)
    names = [name for name, _ in targets]
    batches = _calibration(variant, materials, variant.calibration_samples, variant.calibration_max_len)
    divisors: dict[str, torch.Tensor] = {}
    if variant.smoothquant is not None:
        absmax = calibrate.collect(model, names, batches, description=f"{variant.name}: channel ranges")
        divisors = {name: calibrate.smoothing_divisor(absmax[name].channel_absmax, linear.weight, variant.smoothquant)
                    for name, linear in targets}
    stats = calibrate.collect(model, names, batches, keep_samples=variant.observer == "percentile",
                              description=f"{variant.name}: calibrate", divisors=divisors)
    symmetric, per_channel = variant.scheme == "symmetric", variant.weights == "per_channel"
    for name, linear in targets:
        entry = stats[name]
        module = quant.StaticInt8Linear.from_linear(
            linear, entry.inputs.range(variant.observer, variant.percentile),
            entry.outputs.range(variant.observer, variant.percentile), per_channel, symmetric, divisors.get(name))
        quant.set_module(model, name, module)
    tokens = sum(int(batch["attention_mask"].sum()) for batch in batches)
    return Built(model, facts={"quantized_modules": len(targets), "calibration_samples": min(
        variant.calibration_samples, len(materials.train)), "calibration_tokens": tokens, "weights": variant.weights,
        "scheme": variant.scheme, "observer": variant.observer, "smoothquant": variant.smoothquant})


def _convert_all(model: nn.Module, variant, choose) -> dict[str, Any]:
    counts: dict[str, int] = {}
    kept: list[str] = []
    for name, linear in _targets(model, variant):
        precision = choose(name)
        module = quant.convert(linear, precision, getattr(variant, "group_size", 64))
        if module is None:
            if precision != "fp32":
                kept.append(name)
            precision = "fp32"
        else:
            quant.set_module(model, name, module)
        counts[precision] = counts.get(precision, 0) + 1
    return {"modules_by_precision": counts, "kept_fp32_shape": kept}


def weight_only(model: nn.Module, variant: WeightOnly, materials: Materials) -> Built:
    precision = "int8_weight" if variant.bits == 8 else "int4_weight"
    facts = _convert_all(model, variant, lambda name: precision)
    return Built(model, facts={**facts, "bits": variant.bits, "activations": "bf16",
                               **({"group_size": variant.group_size} if variant.bits == 4 else {})})


def mixed(model: nn.Module, variant: Mixed, materials: Materials) -> Built:
    names = [name for name, _ in quant.linear_modules(model)]
    unused = [pattern for pattern in variant.precision if not any(quant.matches(n, [pattern]) for n in names)]
    if unused:
        raise UserError(f"compress.variants.{variant.name}.precision: {', '.join(unused)} matches no Linear "
                        f"module (they are named like {names[0]})")

    def choose(name: str) -> str:
        for pattern, precision in variant.precision.items():
            if quant.matches(name, [pattern]):
                return precision
        return variant.default

    return Built(model, facts=_convert_all(model, variant, choose))


class _Mask(nn.Module):
    """Keeps pruned weights at zero while the recovery fine-tune updates the rest."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask


def _recover(model: nn.Module, variant: Prune, materials: Materials, masked: Sequence[str]) -> dict[str, Any]:
    from lmsmith.compress.finetune import finetune

    modules = [model.get_submodule(name.rsplit(".", 1)[0]) for name in masked]
    for module in modules:
        parametrize.register_parametrization(module, "weight", _Mask((module.weight != 0).float()))
    try:
        return finetune(model, materials.tokenizer, materials.train, variant.recovery, variant.recovery.max_len,
                        materials.work_dir / "recovery", materials.seed, f"{variant.name}: recovery fine-tune",
                        val_conversations=materials.val)
    finally:
        for module in modules:
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)


def prune_model(model: nn.Module, variant: Prune, materials: Materials) -> Built:
    facts: dict[str, Any] = {"kind": variant.kind}
    sparse: list[str] = []
    if variant.kind in ("magnitude", "2:4"):
        _targets(model, variant)
        sparse = (prune.magnitude_prune(model, variant.sparsity, variant.modules, variant.skip)
                  if variant.kind == "magnitude" else prune.semi_structured_prune(model, variant.modules, variant.skip))
        total = sum(model.get_parameter(name).numel() for name in sparse)
        zeros = sum(int((model.get_parameter(name) == 0).sum()) for name in sparse)
        facts |= {"pruned_matrices": len(sparse), "sparsity": round(zeros / max(total, 1), 4)}
    else:
        if variant.modules != ["*"] or variant.skip:
            raise UserError(f"compress.variants.{variant.name}: structured pruning removes heads and channels "
                            "in every layer; modules/skip do not apply")
        batches = _calibration(variant, materials, variant.calibration_samples, 256)
        before = sum(p.numel() for p in model.parameters())
        model = prune.shrink(model, None, variant.heads, variant.mlp, batches)
        facts |= {"params_before": before, "params_after": sum(p.numel() for p in model.parameters()),
                  "num_key_value_heads": model.config.num_key_value_heads,
                  "intermediate_size": model.config.intermediate_size}
    if variant.recovery is not None:
        facts["recovery"] = _recover(model, variant, materials, sparse)
        if sparse:
            facts["sparsity_after_recovery"] = round(
                sum(int((model.get_parameter(name) == 0).sum()) for name in sparse)
                / max(sum(model.get_parameter(name).numel() for name in sparse), 1), 4)
    if variant.kind == "2:4":
        facts["two_four_pattern_holds"] = all(prune.is_two_four(model.get_parameter(name)) for name in sparse)
    return Built(model, sparse=sparse, facts=facts)


def distill(model: nn.Module, variant: Distill, materials: Materials) -> Built:
    from lmsmith.compress.finetune import finetune

    layers = len(model.model.layers) if hasattr(model, "model") and hasattr(model.model, "layers") else None
    if layers is None:
        raise UserError(f"compress.variants.{variant.name}: distill needs a decoder-only model with model.layers")
    keep = variant.keep_layers if variant.keep_layers is not None else (
        prune.evenly_spaced(layers, variant.layers) if variant.layers is not None else list(range(layers)))
    if variant.layers is not None and variant.layers >= layers:
        raise UserError(f"compress.variants.{variant.name}.layers: {variant.layers} is not fewer than the "
                        f"teacher's {layers}")
    batches = (_calibration(variant, materials, variant.calibration_samples, 256)
               if variant.mlp or variant.heads else ())
    student = prune.shrink(model, keep, variant.heads, variant.mlp, batches)
    training = finetune(student, materials.tokenizer, materials.train, variant.training, variant.training.max_len,
                        materials.work_dir / "training", materials.seed, f"{variant.name}: distil",
                        teacher=model, val_conversations=materials.val)
    return Built(student, facts={
        "teacher_layers": layers, "student_layers": keep, "teacher_params": sum(p.numel() for p in model.parameters()),
        "student_params": sum(p.numel() for p in student.parameters()), "training": training})


BUILDERS = {"dynamic_int8": dynamic_int8, "static_int8": static_int8, "weight_only": weight_only, "mixed": mixed,
            "prune": prune_model, "distill": distill}


def build(source: nn.Module, variant, materials: Materials) -> Built:
    """The variant of `source` (left untouched) that `variant` describes."""
    has_quantized = any(isinstance(m, quant.QuantizedLinear) for m in source.modules())
    if has_quantized and variant.method in ("prune", "distill"):
        raise UserError(f"compress.variants.{variant.name}.source: {variant.source} is quantized; {variant.method} "
                        "needs float weights (prune or distil first, then quantize)")
    model = source if variant.method == "distill" else copy.deepcopy(source)
    return BUILDERS[variant.method](model, variant, materials)
