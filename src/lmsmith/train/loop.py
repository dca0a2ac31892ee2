"""lmsmith's own training loop on accelerate: AdamW, warmup + cosine, clipping, validation, early
stopping, checkpoints for exact resume, metrics.jsonl / TensorBoard and alerts.

The loss of an optimiser step is the sum of token losses over all its micro-batches (on every process)
divided by the number of target tokens in the whole step, so splitting a step into micro-batches or
processes of different lengths never changes the gradient. Logits are computed only at target positions,
through a chunked linear + cross-entropy (`efficiency.py`) that never holds the full logits tensor. On
CPUs with native bf16 and on GPUs, matrices run under bf16 autocast (weights and optimiser state stay
fp32), which measured about twice as fast as fp32 on CPU for these model sizes. accelerate provides the
process setup, DDP/FSDP/DeepSpeed wrapping and gradient synchronisation (`dist.py`).
"""

from __future__ import annotations

import math
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol, Sequence

import torch
import torch.nn.functional as F

from lmsmith.console import console, track
from lmsmith.errors import UserError
from lmsmith.train import dist
from lmsmith.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, trainable_state
from lmsmith.train.config import OptimConfig, TrainingSchedule
from lmsmith.train.data import IGNORE_INDEX, Batch
from lmsmith.train.efficiency import (
    apply_liger_kernels,
    chunked_linear_cross_entropy,
    compile_layers,
    enable_gradient_checkpointing,
)
from lmsmith.train.monitor import AlertMonitor, RunLog, mfu, peak_flops, peak_memory_mb, training_flops_per_token

# objective(model, batch) -> (summed loss over target tokens, number of target tokens)
Objective = Callable[[Any, Batch], "tuple[torch.Tensor, int]"]


def configure_threads() -> int:
    """Use every core this process may run on, unless the user pinned a count with OMP_NUM_THREADS."""
    if "OMP_NUM_THREADS" not in os.environ:
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:
            cores = os.cpu_count() or 1
        torch.set_num_threads(max(1, cores))
    return torch.get_num_threads()


def resolve_precision(precision: str, device: torch.device | None = None) -> str:
    """"auto" is bf16 where the device multiplies bf16 natively (several times faster), else fp32."""
    if precision != "auto":
        return precision
    if device is not None and device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"


def autocast(precision: str, device_type: str = "cpu"):
    """Mixed precision for the forward pass: matrices in bf16, weights, optimiser state and loss in fp32."""
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16")


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


def loss_sum(model, batch: Batch, chunk_size: int | None = 1024) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the batch's target positions, and their count.

    `chunk_size` rows of logits at a time (None: all target logits at once, the plain reference).
    """
    targets = batch.labels[:, 1:]
    selected = targets != IGNORE_INDEX
    count = int(selected.sum())
    path = _hidden_states_path(model)
    if path is None:
        # Prompt learning: peft builds its own positions and puts virtual tokens in front; cut them off.
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
        logits = logits[:, -batch.input_ids.shape[1] :][:, :-1][selected]
        return F.cross_entropy(logits.float(), targets[selected], reduction="sum"), count
    decoder, head = path
    # No KV cache: transformers only derives the per-document mask of packed rows without one.
    hidden = decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                     position_ids=batch.position_ids, use_cache=False).last_hidden_state[:, :-1][selected]
    if chunk_size is None:
        return F.cross_entropy(head(hidden).float(), targets[selected], reduction="sum"), count
    return chunked_linear_cross_entropy(hidden, head, targets[selected], chunk_size), count


class TrainingForward(torch.nn.Module):
    """The whole training forward (model and loss) as one module, so DDP and FSDP see every use of
    every parameter through their wrapper even though the loss calls the decoder and head directly."""

    def __init__(self, model, objective: Objective | None = None, chunk_size: int | None = 1024):
        super().__init__()
        self.model = model
        self.objective = objective
        self.chunk_size = chunk_size

    def forward(self, batch: Batch) -> torch.Tensor:
        if self.objective is not None:
            return self.objective(self.model, batch)[0]
        return loss_sum(self.model, batch, self.chunk_size)[0]


def accumulate_gradients(
    model, micro_batches: Sequence[Batch], forward: torch.nn.Module | None = None, accelerator=None
) -> tuple[float, float]:
    """Backpropagate one optimiser step's mean token loss; return its summed loss and target count.

    With several processes, `micro_batches` is this process's share and the returned figures are
    the global ones. With class weights the count is the weighted target count (`Batch.target_weight`),
    so the step's loss is a weighted per-token mean.
    """
    forward = forward if forward is not None else TrainingForward(model)
    local_targets = sum(batch.target_weight for batch in micro_batches)
    world = accelerator.num_processes if accelerator is not None else 1
    targets = dist.all_sum([local_targets], accelerator)[0]
    total = 0.0
    for index, batch in enumerate(micro_batches):
        if accelerator is not None:
            batch = batch.to(accelerator.device)
        last = index == len(micro_batches) - 1
        # Only the last micro-batch's backward needs DDP to synchronise gradients.
        sync = nullcontext() if accelerator is None or last else accelerator.no_sync(forward)
        with sync:
            loss = forward(batch)
            # Dividing every micro-batch by the step's global target count (times the world size,
            # which DDP's gradient averaging divides out) makes the summed gradients those of the
            # global batch's per-token mean loss, whatever the micro-batches' sizes.
            scaled = loss * (world / (targets or 1))
            if accelerator is not None:
                accelerator.backward(scaled)
            else:
                scaled.backward()
        total += float(loss.detach())
    total = dist.all_sum([total], accelerator)[0]
    return total, targets


@torch.no_grad()
def evaluate(model, batches: Sequence[Batch], objective: Objective | None = None, device=None) -> float | None:
    """Mean token loss over `batches` (None when there is nothing to score)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        if device is not None:
            batch = batch.to(device)
        loss, n = objective(model, batch) if objective is not None else loss_sum(model, batch)
        total += float(loss)
        count += float(n)
    model.train(was_training)
    return total / count if count else None


@dataclass
class GenerationProbe:
    """A few validation conversations answered greedily at each val check and scored by ROUGE-L
    against their reference answers (lmsmith.generation and lmsmith.eval.metrics do the work)."""

    tokenizer: Any
    prompts: list[list[dict[str, str]]]
    references: list[str]
    max_new_tokens: int = 48

    def scores(self, model) -> dict[str, float]:
        from lmsmith.eval.metrics import rouge_l
        from lmsmith.generation import generate_chat

        was_training = model.training
        model.eval()
        try:
            generation = generate_chat(model, self.tokenizer, self.prompts, max_new_tokens=self.max_new_tokens,
                                       batch_size=len(self.prompts))
        finally:
            model.train(was_training)
        return {"val_rouge_l": round(rouge_l(generation.texts, self.references), 3)}


class Probe(Protocol):
    """Something measured on the model at each val check: `scores(model)` gives metrics.jsonl keys."""

    def scores(self, model) -> dict[str, float]: ...


def higher_is_better(metric: str) -> bool:
    """val_loss and the eval tasks' lower-is-better metrics (perplexity, edit rate, ...) fall as a model improves."""
    from lmsmith.eval.compare import LOWER_IS_BETTER

    return metric != "val_loss" and metric.rsplit(".", 1)[-1] not in LOWER_IS_BETTER


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
    extra: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)  # metrics, alerts, tensorboard: stage output names

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
            **self.extra,
        }


def val_steps(total_steps: int, val_every: int | None) -> set[int]:
    """1-based steps after which val loss is measured: every `val_every` (default: 4 times), and the last."""
    every = val_every or max(1, math.ceil(total_steps / 4))
    return set(range(every, total_steps + 1, every)) | {total_steps}


@dataclass
class _Interval:
    """Running sums between two metrics rows (saved in checkpoints, so a resumed row is the same)."""

    loss: float = 0.0
    targets: float = 0.0
    tokens: int = 0
    grad_norm: float = 0.0
    steps: int = 0
    seconds: float = 0.0

    def add(self, loss: float, targets: float, tokens: int, grad_norm: float, seconds: float) -> None:
        self.loss += loss
        self.targets += targets
        self.tokens += tokens
        self.grad_norm += grad_norm
        self.steps += 1
        self.seconds += seconds

    def row(self, step: int, lr: float) -> dict:
        return {
            "step": step,
            "loss": round(self.loss / (self.targets or 1), 5),
            "lr": lr,
            "grad_norm": round(self.grad_norm / max(1, self.steps), 5),
            "tokens_per_s": round(self.tokens / self.seconds, 1) if self.seconds > 0 else None,
        }


@dataclass
class _EarlyStopping:
    """Counts val checks without improvement of the watched metric; remembers the best weights."""

    metric: str
    higher_is_better: bool
    patience: int
    min_delta: float
    best: float | None = None
    best_step: int = 0
    bad_checks: int = 0
    best_weights: dict[str, torch.Tensor] | None = None

    def update(self, step: int, value: float | None, model) -> bool:
        """Record a val check; True when training should stop."""
        if value is None:
            return False
        gain = (value - self.best) if self.best is not None else math.inf
        if not self.higher_is_better:
            gain = (self.best - value) if self.best is not None else math.inf
        if gain > self.min_delta:
            self.best, self.best_step, self.bad_checks = value, step, 0
            self.best_weights = trainable_state(model)
            return False
        self.bad_checks += 1
        return self.bad_checks >= self.patience

    def state(self) -> dict:
        return {"best": self.best, "best_step": self.best_step, "bad_checks": self.bad_checks}


def _fingerprint(config: TrainingSchedule, world: int, model) -> dict[str, Any]:
    """What must not change between a checkpoint and its resume. Log and checkpoint cadence may, and so may
    the peak learning rate and the non-finite policy: a run stopped by a non-finite step resumes from its
    last checkpoint with a lower lr (`checkpoint.RESUMABLE_CHANGES`)."""
    free = {"resume", "checkpoint_every", "keep_checkpoints", "log_every", "monitor"}
    dumped = config.model_dump(mode="json", exclude=free)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {**dumped, "world_size": world, "trainable_params": trainable}


def _apply_peak_lr(optimizer, scheduler, peak_lr: float) -> None:
    """Set the schedule's peak lr after a resume restored the checkpoint's (the same one unless changed)."""
    if all(base == peak_lr for base in scheduler.base_lrs):
        return
    scheduler.base_lrs = [peak_lr] * len(scheduler.base_lrs)
    factor = scheduler.lr_lambdas[0](scheduler.last_epoch)
    for group in optimizer.param_groups:
        group["initial_lr"] = peak_lr
        group["lr"] = peak_lr * factor


class NonFiniteStep(UserError):
    """A step's loss or gradient was not finite: the run stops before that update, publishing nothing."""


def _first_non_finite(model) -> str:
    """The first parameter (or, failing that, gradient) holding a NaN or an infinity, named for the user."""
    named = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
    for name, param in named:
        if not torch.isfinite(param.detach()).all():
            return f"the weight {name}"
    for name, param in named:
        if param.grad is not None and not torch.isfinite(param.grad).all():
            return f"the gradient of {name}"
    return "no single tensor (the loss itself)"


def _non_finite_message(step: int, loss: float, grad_norm: float, model, checkpoint_dir: Path | None,
                        skipped: int = 0) -> str:
    what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {grad_norm}"
    saved = latest_checkpoint(checkpoint_dir) if checkpoint_dir is not None and checkpoint_dir.exists() else None
    resume = (f"; its last finite checkpoint is {saved}: rerun with --resume and a lower optim.lr" if saved else
              "; lower optim.lr (or set on_non_finite: skip_step) and rerun")
    streak = f" after {skipped} skipped steps in a row" if skipped else ""
    return f"step {step}: {what}{streak}, first non-finite tensor: {_first_non_finite(model)}{resume}"


def train(
    model,
    steps: Iterable[list[Batch]],
    total_steps: int,
    config: TrainingSchedule,
    stage_dir: Path,
    *,
    checkpoint_dir: Path | None = None,
    val_batches: Sequence[Batch] = (),
    probes: Sequence[Probe] = (),
    objective: Objective | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    accelerator=None,
    description: str = "train",
) -> TrainSummary:
    """Run `total_steps` optimiser steps of `steps` (an iterable with `.steps(start)`, such as `StepPlan`).

    Writes `metrics.jsonl`, `alerts.jsonl` and `tensorboard/` in `stage_dir`; checkpoints go to
    `checkpoint_dir` every `config.checkpoint_every` steps and stay until the pipeline has published the
    stage's output (a crash while saving or merging can still resume).
    Val loss is measured without autocast, so it is comparable across precisions; time spent on it,
    on generation and on checkpoints is left out of tokens_per_s.
    """
    configure_threads()
    accelerator = accelerator or dist.make_accelerator()
    device = accelerator.device
    precision = resolve_precision(config.precision, device)
    use_accelerate_amp = accelerator.mixed_precision != "no"
    if use_accelerate_amp:
        precision = accelerator.mixed_precision
    is_main = accelerator.is_main_process
    efficiency = config.efficiency

    saved_attention = model.config._attn_implementation
    if config.attention:
        model.set_attn_implementation(config.attention)
    extra: dict[str, Any] = {}
    if efficiency.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if efficiency.liger and apply_liger_kernels(model, device):
        extra["liger"] = True
    if efficiency.compile:
        extra["compiled_layers"] = compile_layers(model)
    if next(model.parameters()).device != device:
        model.to(device)
    model.train()

    world = accelerator.num_processes
    fingerprint = _fingerprint(config, world, model)
    counted_total = sum(p.numel() for p in model.parameters())
    counted_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    flops_per_token = training_flops_per_token(counted_trainable, counted_total)
    peak = peak_flops(device, config.monitor.cpu_peak_tflops * 1e12)

    forward = TrainingForward(model, objective, efficiency.loss_chunk_size if efficiency.chunked_loss else None)
    if config.sharding == "fsdp2":
        base = model.get_base_model() if hasattr(model, "peft_config") else model
        dist.fsdp2_shard(forward, list(base.get_decoder().layers))
    optimizer = optimizer or build_optimizer(model, config.optim)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, config.optim.warmup_ratio, config.optim.min_lr_ratio)
    )
    # The scheduler stays unprepared: accelerate's wrapper steps it once per process, and our steps
    # are already global.
    if config.sharding == "fsdp2":
        optimizer = accelerator.prepare(optimizer)
    else:
        forward, optimizer = accelerator.prepare(forward, optimizer)
    trainable = [p for p in model.parameters() if p.requires_grad]

    # ---- where to start
    if config.sharding == "fsdp2":
        # Our own fully_shard leaves DTensor shards that only accelerate's FSDP plugin knows how to save.
        if config.resume:
            raise UserError("resume: not available with sharding: fsdp2; launch with an accelerate FSDP "
                            "config (configs/accelerate/fsdp2.yaml) to checkpoint sharded runs")
        checkpoint_dir = None
    start_step, loop_state = 0, None
    if checkpoint_dir is not None:
        found = latest_checkpoint(checkpoint_dir) if config.resume else None
        if found is not None:
            start_step, loop_state, saved_tensors = load_checkpoint(found, model, optimizer, scheduler, fingerprint,
                                                                    accelerator)
            _apply_peak_lr(optimizer, scheduler, config.optim.lr)
            if is_main:
                console.print(f"[green]resume[/] from {found} (step {start_step} of {total_steps})")
        elif config.resume is True:
            raise UserError(f"resume: no checkpoint of this stage in {checkpoint_dir}; nothing to resume from "
                            "(resume: auto, or --resume=auto, starts afresh when there is none)")
        elif is_main and checkpoint_dir.exists():
            shutil.rmtree(checkpoint_dir)  # a fresh start must never later resume from an older run

    log = RunLog(stage_dir / "metrics.jsonl", stage_dir / "tensorboard" if config.monitor.tensorboard else None,
                 restored_rows=loop_state["history"] if loop_state else (),
                 restored_alerts=loop_state["alert_rows"] if loop_state else (), enabled=is_main,
                 monitor=config.monitor, params=config.model_dump(mode="json"),
                 tracker_state=loop_state.get("trackers") if loop_state else None)
    alerts = AlertMonitor(config.monitor, device)
    check_at = val_steps(total_steps, config.val_every) if (val_batches or probes) else set()
    stopper = None
    if config.early_stopping is not None:
        rule = config.early_stopping
        stopper = _EarlyStopping(rule.metric, higher_is_better(rule.metric), rule.patience, rule.min_delta)
    history: list[dict] = []
    interval = _Interval()
    total_tokens, train_seconds, val_loss, last_loss, stopped_at = 0, 0.0, None, float("nan"), None
    skipped_steps = skipped_in_a_row = 0
    if loop_state is not None:
        skipped_steps, skipped_in_a_row = loop_state.get("skipped_steps", 0), loop_state.get("skipped_in_a_row", 0)
        interval = _Interval(**loop_state["interval"])
        total_tokens, train_seconds = loop_state["total_tokens"], loop_state["train_seconds"]
        val_loss, last_loss, history = loop_state["val_loss"], loop_state["last_loss"], loop_state["history"]
        alerts.load_state_dict(loop_state["alerts"])
        if stopper is not None and loop_state["early_stopping"]:
            stopper.best, stopper.best_step, stopper.bad_checks = (
                loop_state["early_stopping"][key] for key in ("best", "best_step", "bad_checks"))
            stopper.best_weights = saved_tensors.get("best")

    amp = accelerator.autocast() if use_accelerate_amp else autocast(precision, device.type)
    step = start_step
    finished = False  # trackers mark a run that raised (or was interrupted) as failed
    try:
        with track(description, total=total_steps) as progress:
            progress.advance(start_step)
            plan = steps.steps(start_step) if start_step else steps
            for step, micro_batches in enumerate(plan, start=start_step + 1):
                started = time.perf_counter()
                local = dist.local_share(micro_batches, accelerator)
                with amp:
                    step_loss, targets = accumulate_gradients(model, local, forward, accelerator)
                # accelerate clips the way the strategy needs (DeepSpeed clips inside its engine and may
                # report no norm); under FSDP the norm comes back as a DTensor.
                norm = accelerator.clip_grad_norm_(trainable, config.optim.grad_clip)
                grad_norm = float(dist.full_value(norm)) if norm is not None else 0.0
                lr = optimizer.param_groups[0]["lr"]
                step_mean = step_loss / (targets or 1)
                # The gradient norm is all-reduced, so every process takes the same decision; a NaN loss
                # leaves NaN gradients, and an infinite local loss is caught by the loss test.
                finite = math.isfinite(grad_norm) and math.isfinite(step_mean)
                if finite:
                    skipped_in_a_row = 0
                    optimizer.step()
                else:
                    for alert in alerts.check_step(step, step_mean, grad_norm):
                        log.alert(alert)
                    skipped_in_a_row += 1
                    if config.on_non_finite == "stop" or skipped_in_a_row >= config.max_skipped_steps:
                        raise NonFiniteStep(_non_finite_message(
                            step, step_mean, grad_norm, model, checkpoint_dir,
                            skipped_in_a_row if config.on_non_finite == "skip_step" else 0))
                    skipped_steps += 1
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                if not finite:
                    progress.advance(loss=step_mean)
                    continue
                tokens = sum(batch.tokens for batch in micro_batches)
                interval.add(step_loss, targets, tokens, grad_norm, time.perf_counter() - started)
                last_loss = step_mean
                progress.advance(loss=last_loss)
                for alert in alerts.check_step(step, last_loss, grad_norm) + alerts.check_device(step):
                    log.alert(alert)

                stop = False
                if step % config.log_every == 0 or step == total_steps or step in check_at:
                    row = interval.row(step, lr)
                    total_tokens += interval.tokens
                    train_seconds += interval.seconds
                    if row["tokens_per_s"] is not None:
                        row["mfu"] = round(mfu(row["tokens_per_s"], flops_per_token, peak), 5)
                    row["peak_mem_mb"] = round(peak_memory_mb(device), 1)
                    if step in check_at:
                        row.update(_validate(model, val_batches, probes, objective, device))
                        val_loss = row.get("val_loss", val_loss)
                        if stopper is not None:
                            stop = stopper.update(step, row.get(stopper.metric), model)
                    log.metrics(row)
                    history.append(row)
                    interval = _Interval()
                if stop:
                    stopped_at = step
                    if is_main:
                        console.print(f"[yellow]early stop[/] at step {step}: {stopper.metric} has not improved "
                                      f"for {stopper.patience} checks (best {stopper.best:.4g} at step {stopper.best_step})")
                    break
                if (checkpoint_dir is not None and config.checkpoint_every and step % config.checkpoint_every == 0
                        and step < total_steps):
                    state = {
                        "interval": interval.__dict__, "total_tokens": total_tokens, "train_seconds": train_seconds,
                        "val_loss": val_loss, "last_loss": last_loss, "history": history,
                        "alerts": alerts.state_dict(), "alert_rows": log.alerts, "trackers": log.tracker_state(),
                        "early_stopping": stopper.state() if stopper else None,
                        "skipped_steps": skipped_steps, "skipped_in_a_row": skipped_in_a_row,
                    }
                    best = {"best": stopper.best_weights} if stopper is not None and stopper.best_weights else {}
                    save_checkpoint(checkpoint_dir, step, model, optimizer, scheduler, state, fingerprint,
                                    accelerator, keep=config.keep_checkpoints, extra_tensors=best)
        finished = True
    finally:
        log.close(failed=not finished)
        model.set_attn_implementation(saved_attention)
        model.eval()
    # The val figures reported are those of the weights handed back: the best check's, when restored.
    reported = history[-1] if history else {}
    if stopper is not None and stopper.best_weights is not None and stopper.best_step != step:
        _restore(model, stopper.best_weights)
        reported = next((row for row in history if row["step"] == stopper.best_step), reported)
        val_loss = reported.get("val_loss", val_loss)
        extra.update({"best_step": stopper.best_step, f"best_{stopper.metric}": stopper.best})
    if stopped_at is not None:
        extra["stopped_early_at"] = stopped_at
    if skipped_steps:
        extra["skipped_non_finite_steps"] = skipped_steps
    _check_finite_weights(model, step)
    extra.update({key: value for key, value in reported.items() if key == "val_rouge_l" or key.startswith("val.")})
    extra["peak_mem_mb"] = round(peak_memory_mb(device), 1)
    # The last logged interval's mean is a steadier figure than the final step's loss alone.
    final_loss = history[-1]["loss"] if history else last_loss
    summary = TrainSummary(
        steps=step, train_loss=final_loss, val_loss=val_loss, tokens=total_tokens, seconds=train_seconds,
        precision=precision, history=history, extra=extra, outputs=log.outputs(),
    )
    if summary.seconds:
        summary.extra["mfu"] = round(mfu(summary.tokens_per_s, flops_per_token, peak), 5)
    shown_val = f"{val_loss:.4f}" if val_loss is not None else "n/a"
    if is_main:
        console.print(
            f"{description}: {step} steps, loss {final_loss:.4f}, val loss {shown_val}, "
            f"{summary.tokens_per_s:,.0f} tok/s ({precision}, {torch.get_num_threads()} threads, {world} process"
            f"{'es' if world > 1 else ''}), peak memory {extra['peak_mem_mb']:,.0f} MB"
        )
    return summary


def _check_finite_weights(model, step: int) -> None:
    """The weights handed back must be finite: a stage never publishes NaN weights."""
    for name, param in model.named_parameters():
        if param.requires_grad and not torch.isfinite(param.detach()).all():
            raise NonFiniteStep(f"step {step}: the trained weight {name} is not finite; lower optim.lr and rerun")


def _validate(model, val_batches, probes: Sequence[Probe], objective, device) -> dict[str, float]:
    row: dict[str, float] = {}
    if val_batches:
        loss = evaluate(model, val_batches, objective, device)
        if loss is not None:
            row["val_loss"] = round(loss, 5)
    for probe in probes:
        row.update(probe.scores(model))
    return row


def _restore(model, weights: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)


def train_private(
    private,
    config: TrainingSchedule,
    stage_dir: Path,
    *,
    val_batches: Sequence[Batch] = (),
    probes: Sequence[Probe] = (),
    description: str = "train (DP-SGD)",
) -> TrainSummary:
    """DP-SGD with opacus (`lmsmith.train.privacy.PrivateTraining`): its Poisson-sampled batches,
    per-example clipping and noise, with this loop's lr schedule, validation, metrics and alerts.

    Each row reports ε spent so far. There are no checkpoints: resuming would also need the
    accountant's history, and the config refuses `resume` with `privacy`. fp32 throughout, as opacus'
    per-example gradient hooks expect.
    """
    configure_threads()
    model = private.model._module if hasattr(private.model, "_module") else private.model
    total_steps = private.steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        private.optimizer, lambda step: lr_factor(step, total_steps, config.optim.warmup_ratio, config.optim.min_lr_ratio)
    )
    log = RunLog(stage_dir / "metrics.jsonl", stage_dir / "tensorboard" if config.monitor.tensorboard else None,
                 monitor=config.monitor, params=config.model_dump(mode="json"))
    alerts = AlertMonitor(config.monitor)
    check_at = val_steps(total_steps, config.val_every) if (val_batches or probes) else set()
    history: list[dict] = []
    losses: list[float] = []
    tokens = total_tokens = 0
    seconds = train_seconds = 0.0
    val_loss, step = None, 0
    model.train()
    finished = False
    try:
        with track(description, total=total_steps) as progress:
            for step, batch in enumerate(private.batches(), start=1):
                started = time.perf_counter()
                lr = private.optimizer.param_groups[0]["lr"]
                loss = private.step(batch)
                scheduler.step()
                seconds += time.perf_counter() - started
                tokens += int(batch["attention_mask"].sum())
                if loss is not None:
                    for alert in alerts.check_step(step, loss, 0.0):
                        log.alert(alert)
                    if not math.isfinite(loss):  # opacus has stepped already: stop before another update
                        raise NonFiniteStep(_non_finite_message(step, loss, 0.0, model, None))
                    losses.append(loss)
                progress.advance(loss=loss if loss is not None else float("nan"))
                if step % config.log_every and step != total_steps and step not in check_at:
                    continue
                row = {"step": step, "loss": round(sum(losses) / len(losses), 5) if losses else None, "lr": lr,
                       "tokens_per_s": round(tokens / seconds, 1) if seconds > 0 else None,
                       "dp_epsilon": round(private.epsilon(), 4)}
                if step in check_at:
                    row.update(_validate(model, val_batches, probes, None, None))
                    val_loss = row.get("val_loss", val_loss)
                    model.train()
                log.metrics(row)
                history.append(row)
                total_tokens, train_seconds = total_tokens + tokens, train_seconds + seconds
                losses, tokens, seconds = [], 0, 0.0
        finished = True
    finally:
        log.close(failed=not finished)
        model.eval()
    _check_finite_weights(model, step)
    final = next((row["loss"] for row in reversed(history) if row["loss"] is not None), float("nan"))
    summary = TrainSummary(steps=step, train_loss=final, val_loss=val_loss, tokens=total_tokens,
                           seconds=train_seconds, precision="fp32", history=history,
                           extra={**private.report(), "peak_mem_mb": round(peak_memory_mb(torch.device("cpu")), 1)},
                           outputs=log.outputs())
    console.print(f"{description}: {step} steps, loss {final:.4f}, ε = {private.epsilon():.3f} at δ = "
                  f"{private.config.delta}")
    return summary
