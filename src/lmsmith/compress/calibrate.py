"""Calibration: run representative text through the float model and record what each Linear sees.

Forward hooks (torch) gather, per selected Linear, the input's per-channel absolute maximum (for
SmoothQuant), and the input's and output's range as the chosen observer reads it: min-max, or a
percentile of a bounded random sample of the values (so a rare outlier does not stretch the int8 grid).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from lmsmith.console import track

SAMPLE_CAP = 1 << 18  # values kept per tensor for a percentile; torch.quantile takes at most 2^24


@dataclass
class TensorStats:
    low: float = float("inf")
    high: float = float("-inf")
    samples: list[torch.Tensor] = field(default_factory=list)
    kept: int = 0

    def update(self, values: torch.Tensor, keep_samples: bool, generator: torch.Generator) -> None:
        flat = values.detach().float().reshape(-1)
        self.low = min(self.low, float(flat.min()))
        self.high = max(self.high, float(flat.max()))
        if keep_samples and self.kept < SAMPLE_CAP:
            take = min(flat.numel(), SAMPLE_CAP - self.kept, max(SAMPLE_CAP // 16, 1))
            chosen = flat[torch.randint(flat.numel(), (take,), generator=generator)]
            self.samples.append(chosen)
            self.kept += take

    def range(self, observer: str, percentile: float) -> tuple[float, float]:
        if observer == "minmax" or not self.samples:
            return self.low, self.high
        values = torch.cat(self.samples)
        q = torch.tensor([(100 - percentile) / 100, percentile / 100])
        low, high = torch.quantile(values, q).tolist()
        return low, high


@dataclass
class LinearStats:
    inputs: TensorStats = field(default_factory=TensorStats)
    outputs: TensorStats = field(default_factory=TensorStats)
    channel_absmax: torch.Tensor | None = None


def calibration_batches(tokenizer, conversations: Sequence[list[dict]], max_len: int, batch_size: int = 8
                        ) -> list[dict[str, torch.Tensor]]:
    """Whole conversations rendered with the chat template, cut to `max_len` tokens, padded per batch."""
    texts = [tokenizer.apply_chat_template(list(messages), tokenize=False) for messages in conversations]
    batches = []
    for start in range(0, len(texts), batch_size):
        encoded = tokenizer(texts[start: start + batch_size], return_tensors="pt", padding=True,
                            truncation=True, max_length=max_len, add_special_tokens=False)
        batches.append({"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]})
    return batches


def collect(model: nn.Module, names: Sequence[str], batches: Sequence[dict[str, torch.Tensor]],
            keep_samples: bool = False, description: str = "calibrate",
            divisors: dict[str, torch.Tensor] | None = None) -> dict[str, LinearStats]:
    """Run `batches` through `model` (no grad) and return the statistics of each named Linear.

    Padding positions are left out: their activations are not text the model will serve. With
    `divisors`, a Linear's input ranges are those of x / s (what its SmoothQuant-ed int8 GEMM sees)."""
    divisors = divisors or {}
    stats = {name: LinearStats() for name in names}
    generator = torch.Generator().manual_seed(0)
    current_mask: list[torch.Tensor] = []

    def hook(name: str):
        def record(module, args, output):
            x = args[0]
            keep = current_mask[0].reshape(-1).bool()
            rows = x.reshape(-1, x.shape[-1])[keep]
            out = output.reshape(-1, output.shape[-1])[keep]
            entry = stats[name]
            absmax = rows.detach().abs().amax(dim=0).float()
            entry.channel_absmax = absmax if entry.channel_absmax is None else torch.maximum(entry.channel_absmax, absmax)
            if name in divisors:
                rows = rows / divisors[name]
            entry.inputs.update(rows, keep_samples, generator)
            entry.outputs.update(out, keep_samples, generator)
        return record

    handles = [model.get_submodule(name).register_forward_hook(hook(name)) for name in names]
    forward_all(model, batches, handles, current_mask, description)
    return stats


def forward_all(model: nn.Module, batches: Sequence[dict[str, torch.Tensor]], handles: list, current_mask: list,
                description: str) -> None:
    """Run every batch (no grad) with `handles`' hooks in place, then remove them; `current_mask` holds the
    batch's attention mask for the hooks to read."""
    try:
        with torch.inference_mode(), track(description, len(batches)) as progress:
            for batch in batches:
                current_mask[:] = [batch["attention_mask"]]
                model(**batch, use_cache=False)
                progress.advance()
    finally:
        for handle in handles:
            handle.remove()


def smoothing_divisor(channel_absmax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's per-input-channel s = max|X_j|^alpha / max|W_j|^(1-alpha); x/s and W·s multiply to the same."""
    weight_absmax = weight.detach().float().abs().amax(dim=0).clamp_min(1e-5)
    s = channel_absmax.clamp_min(1e-5).pow(alpha) / weight_absmax.pow(1 - alpha)
    return s.clamp_min(1e-5)
