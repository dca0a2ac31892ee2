"""lmsmith's own training loop, in plain torch: AdamW, warmup + cosine, clipping, metrics.jsonl.

The loss of an optimiser step is the sum of token losses over all its micro-batches divided by the
number of target tokens in the whole step, so splitting a step into micro-batches of different lengths
never changes the gradient. Logits are computed only at target positions when the model allows it: with
a small hidden size the output projection is a large share of the compute, and prompt positions in SFT
need none. On CPUs with native bf16, matrices run under bf16 autocast (weights and optimiser state
stay fp32), which measured about twice as fast as fp32 for these model sizes.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F

from lmsmith.console import console, track
from lmsmith.train.config import OptimConfig
from lmsmith.train.data import IGNORE_INDEX, Batch


def configure_threads() -> int:
    """Use every core this process may run on, unless the user pinned a count with OMP_NUM_THREADS."""
    if "OMP_NUM_THREADS" not in os.environ:
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:
            cores = os.cpu_count() or 1
        torch.set_num_threads(max(1, cores))
    return torch.get_num_threads()


def resolve_precision(precision: str) -> str:
    """"auto" is bf16 where the CPU multiplies bf16 natively (several times faster), else fp32."""
    if precision != "auto":
        return precision
    return "bf16" if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"


def autocast(precision: str):
    """Mixed precision for the forward pass: matrices in bf16, weights, optimiser state and loss in fp32."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")


def _hidden_states_path(model):
    """(decoder, output head) when logits can be taken at chosen positions only, else None.

    Adapters that live inside the layers (LoRA and kin) leave the plain decoder → head path intact;
    prompt-learning methods change the inputs in the wrapper's forward, so those use the full forward.
    """
    base = model
    if hasattr(model, "peft_config"):
        config = model.peft_config[model.active_adapter]
        if getattr(config, "is_prompt_learning", False):
            return None
        base = model.get_base_model()
    decoder, head = base.get_decoder(), base.get_output_embeddings()
    if decoder is None or head is None:
        return None
    return decoder, head


def loss_sum(model, batch: Batch) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the batch's target positions, and their count."""
    targets = batch.labels[:, 1:]
    selected = targets != IGNORE_INDEX
    count = int(selected.sum())
    path = _hidden_states_path(model)
    if path is not None:
        decoder, head = path
        hidden = decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        logits = head(hidden[:, :-1][selected])
    else:
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1][selected]
    loss = F.cross_entropy(logits.float(), targets[selected], reduction="sum")
    return loss, count


def accumulate_gradients(model, micro_batches: Sequence[Batch]) -> tuple[float, int]:
    """Backpropagate one optimiser step's mean token loss; return its summed loss and target count."""
    targets = sum(batch.target_tokens for batch in micro_batches)
    total = 0.0
    for batch in micro_batches:
        loss, _ = loss_sum(model, batch)
        # Dividing every micro-batch by the step's target count makes the summed gradients those of the
        # step's per-token mean loss, whatever the micro-batches' sizes.
        (loss / max(1, targets)).backward()
        total += float(loss.detach())
    return total, targets


@torch.no_grad()
def evaluate(model, batches: Sequence[Batch]) -> float | None:
    """Mean token loss over `batches` (None when there is nothing to score)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        loss, n = loss_sum(model, batch)
        total += float(loss)
        count += n
    model.train(was_training)
    return total / count if count else None


def build_optimizer(model, optim: OptimConfig) -> torch.optim.AdamW:
    """AdamW over trainable parameters; matrices decay, vectors (norms, biases) do not."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": optim.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        [group for group in groups if group["params"]], lr=optim.lr, betas=optim.betas, foreach=True
    )


def lr_factor(step: int, total_steps: int, warmup_ratio: float, min_lr_ratio: float) -> float:
    """Multiplier of the peak lr at `step` (0-based): linear warmup, then cosine down to `min_lr_ratio`."""
    warmup = math.ceil(total_steps * warmup_ratio)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class TrainSummary:
    steps: int
    train_loss: float
    val_loss: float | None
    tokens: int
    seconds: float
    precision: str = "fp32"
    history: list[dict] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def metrics(self) -> dict:
        val = self.val_loss
        return {
            "steps": self.steps,
            "train_loss": round(self.train_loss, 4),
            "val_loss": round(val, 4) if val is not None else None,
            "val_ppl": round(math.exp(min(val, 50.0)), 3) if val is not None else None,
            "train_tokens": self.tokens,
            "train_time_s": round(self.seconds, 2),
            "tokens_per_s": round(self.tokens_per_s, 1),
            "precision": self.precision,
        }


def val_steps(total_steps: int, val_every: int | None) -> set[int]:
    """1-based steps after which val loss is measured: every `val_every` (default: 4 times), and the last."""
    every = val_every or max(1, math.ceil(total_steps / 4))
    return set(range(every, total_steps + 1, every)) | {total_steps}


@dataclass
class _Interval:
    """Running sums between two metrics rows."""

    loss: float = 0.0
    targets: int = 0
    tokens: int = 0
    grad_norm: float = 0.0
    steps: int = 0
    start: float = field(default_factory=time.perf_counter)

    def add(self, loss: float, targets: int, tokens: int, grad_norm: float) -> None:
        self.loss += loss
        self.targets += targets
        self.tokens += tokens
        self.grad_norm += grad_norm
        self.steps += 1

    def row(self, step: int, lr: float, elapsed: float) -> dict:
        return {
            "step": step,
            "loss": round(self.loss / max(1, self.targets), 5),
            "lr": lr,
            "grad_norm": round(self.grad_norm / max(1, self.steps), 5),
            "tokens_per_s": round(self.tokens / elapsed, 1) if elapsed > 0 else None,
        }


def train(
    model,
    steps: Iterable[list[Batch]],
    total_steps: int,
    optim: OptimConfig,
    metrics_path: Path,
    val_batches: Sequence[Batch] = (),
    log_every: int = 10,
    val_every: int | None = None,
    precision: str = "fp32",
    attention: str | None = None,
    description: str = "train",
) -> TrainSummary:
    """Run `total_steps` optimiser steps; one metrics.jsonl row per `log_every` steps and per val check.

    `steps` yields each optimiser step's micro-batches. Val loss is measured without autocast, so it is
    comparable across precisions; time spent on it is left out of tokens_per_s.
    """
    configure_threads()
    precision = resolve_precision(precision)
    saved_attention = model.config._attn_implementation
    if attention:
        model.set_attn_implementation(attention)
    model.train()
    optimizer = build_optimizer(model, optim)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, optim.warmup_ratio, optim.min_lr_ratio)
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    check_at = val_steps(total_steps, val_every) if val_batches else set()
    history: list[dict] = []
    interval = _Interval()
    step, total_tokens, train_seconds, val_loss, last_loss = 0, 0, 0.0, None, float("nan")
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(metrics_path, "w", encoding="utf-8") as log, track(description, total=total_steps) as progress:
            for step, micro_batches in enumerate(steps, start=1):
                with autocast(precision):
                    step_loss, targets = accumulate_gradients(model, micro_batches)
                grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, optim.grad_clip))
                lr = optimizer.param_groups[0]["lr"]
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                interval.add(step_loss, targets, sum(batch.tokens for batch in micro_batches), grad_norm)
                last_loss = step_loss / max(1, targets)
                progress.advance(loss=last_loss)

                if step % log_every and step != total_steps and step not in check_at:
                    continue
                elapsed = time.perf_counter() - interval.start
                row = interval.row(step, lr, elapsed)
                total_tokens += interval.tokens
                train_seconds += elapsed
                if step in check_at:
                    val_loss = evaluate(model, val_batches)
                    row["val_loss"] = round(val_loss, 5) if val_loss is not None else None
                log.write(json.dumps(row) + "\n")
                log.flush()
                history.append(row)
                interval = _Interval()
    finally:
        model.set_attn_implementation(saved_attention)
        model.eval()
    # The last logged interval's mean is a steadier figure than the final step's loss alone.
    final_loss = history[-1]["loss"] if history else last_loss
    summary = TrainSummary(
        steps=step, train_loss=final_loss, val_loss=val_loss, tokens=total_tokens, seconds=train_seconds,
        precision=precision, history=history,
    )
    shown_val = f"{val_loss:.4f}" if val_loss is not None else "n/a"
    console.print(
        f"{description}: {step} steps, loss {final_loss:.4f}, val loss {shown_val}, "
        f"{summary.tokens_per_s:,.0f} tok/s ({precision}, {torch.get_num_threads()} threads)"
    )
    return summary
