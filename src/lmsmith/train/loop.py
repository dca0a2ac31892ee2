"""lmsmith's training recipe on accelerate: AdamW, warmup + cosine, clipping, validation, early stopping,
checkpoints for exact resume, metrics.jsonl / TensorBoard and alerts, and DP-SGD as a mode of the same loop.

Read it like a torchtune recipe: `TrainRecipe.setup` builds everything a run needs (precision, optimiser,
schedule, the accelerate wrapping, the resumed state), `TrainRecipe.train` runs the steps,
`save_checkpoint` writes a resumable checkpoint, `cleanup` closes the logs. `LoopState` is everything the
loop carries from one step to the next besides tensors; a checkpoint stores it as JSON. `train()` is the
one-call form the stages use.

The loss of an optimiser step is the sum of token losses over all its micro-batches (on every process)
divided by the number of target tokens in the whole step, so splitting a step into micro-batches or
processes of different lengths never changes the gradient (`forward.py`). On CPUs with native bf16 and
on GPUs, matrices run under bf16 autocast (weights and optimiser state stay fp32), which measured about
twice as fast as fp32 on CPU for these model sizes. accelerate provides the process setup,
DDP/FSDP/DeepSpeed wrapping and gradient synchronisation (`dist.py`); opacus the DP-SGD step
(`privacy.py`).
"""

from __future__ import annotations

import math
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Protocol, Sequence

import torch

from lmsmith.console import console, track
from lmsmith.errors import UserError
from lmsmith.train import dist
from lmsmith.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, trainable_state
from lmsmith.train.config import OptimConfig, TrainingSchedule
from lmsmith.train.data import Batch
from lmsmith.train.efficiency import apply_liger_kernels, compile_layers, enable_gradient_checkpointing
from lmsmith.train.forward import Objective, TrainingForward, accumulate_gradients, evaluate
from lmsmith.train.monitor import AlertMonitor, RunLog, mfu, peak_flops, peak_memory_mb, training_flops_per_token
from lmsmith.train.threads import ThreadBudget


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


def build_optimizer(model, optim: OptimConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; matrices decay, vectors (norms, biases) do not (`methods.py`)."""
    from lmsmith.train.methods import build_optimizer as method_optimizer

    return method_optimizer(model, None, optim)


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
            "loss": round(self.loss / self.targets, 5) if self.targets else None,
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


@dataclass
class LoopState:
    """What the loop carries from step to step besides tensors: running figures, the logged history, and
    the collaborators' own states (alerts, trackers, early stopping) as of the last checkpoint. A
    checkpoint's `state.json` holds it as JSON, so a resumed run logs the same rows as an unbroken one."""

    interval: _Interval = field(default_factory=_Interval)
    total_tokens: int = 0
    train_seconds: float = 0.0
    val_loss: float | None = None
    last_loss: float = math.nan
    history: list[dict] = field(default_factory=list)
    skipped_steps: int = 0
    skipped_in_a_row: int = 0
    alerts: dict[str, Any] = field(default_factory=dict)
    alert_rows: list[dict] = field(default_factory=list)
    trackers: dict[str, Any] | None = None
    early_stopping: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "LoopState":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"checkpoint state: unknown loop fields {', '.join(unknown)}; it was written by "
                            "another version of lmsmith")
        values = {key: value for key, value in data.items() if key != "interval"}
        return cls(interval=_Interval(**data.get("interval", {})), **values)


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


@dataclass
class _StepOutcome:
    """One optimiser step's figures: summed loss over its target count, real tokens, gradient norm
    (None where the update measures none), and whether the update was applied."""

    loss: float
    targets: float
    tokens: int
    grad_norm: float | None
    applied: bool

    @property
    def mean_loss(self) -> float:
        return self.loss / (self.targets or 1)


class TrainRecipe:
    """One training run: `setup`, then `train`, then `cleanup` (whatever happened); `summary` reports it.

    `private` (a `privacy.PrivateTraining`) switches the update to DP-SGD: opacus' Poisson-sampled
    batches, per-example clipping and noise, in fp32, without checkpoints (resuming would also need the
    accountant's history; the config refuses `resume` with `privacy`). Everything else, the schedule,
    validation, metrics, alerts and the non-finite stop, is the same code for both modes.
    """

    def __init__(
        self,
        model,
        config: TrainingSchedule,
        stage_dir: Path,
        *,
        checkpoint_dir: Path | None = None,
        val_batches: Sequence[Batch] = (),
        probes: Sequence[Probe] = (),
        objective: Objective | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        accelerator=None,
        private=None,
        description: str = "train",
    ):
        self.model, self.config, self.stage_dir = model, config, stage_dir
        self.checkpoint_dir = checkpoint_dir if private is None else None
        self.val_batches, self.probes, self.objective = val_batches, probes, objective
        self.optimizer, self.accelerator, self.private = optimizer, accelerator, private
        self.description = description
        self.state = LoopState()
        self.step = self.start_step = 0
        self.extra: dict[str, Any] = {}
        self.stopper: _EarlyStopping | None = None
        self.stopped_at: int | None = None
        self.threads_used: set[int] = set()

    # ---------------------------------------------------------------- setup

    def setup(self, total_steps: int) -> None:
        """Precision, efficiency switches, optimiser, schedule, accelerate wrapping; then the resumed state."""
        self.threads = ThreadBudget()
        config, model = self.config, self.model
        self.total_steps = total_steps
        if self.private is None:
            self._setup_standard()
        else:
            self.accelerator = None
            self.device, self.precision, self.is_main = torch.device("cpu"), "fp32", True  # opacus' hooks want fp32
            self.optimizer = self.private.optimizer
            self.forward, self.trainable, self.fingerprint, self.amp = None, [], None, nullcontext()
            self.saved_attention = None
            model.train()
        counted_total = sum(p.numel() for p in model.parameters())
        counted_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.flops_per_token = training_flops_per_token(counted_trainable, counted_total)
        self.peak = peak_flops(self.device, config.monitor.cpu_peak_tflops * 1e12)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda step: lr_factor(step, total_steps, config.optim.warmup_ratio, config.optim.min_lr_ratio),
        )
        if config.early_stopping is not None:
            rule = config.early_stopping
            self.stopper = _EarlyStopping(rule.metric, higher_is_better(rule.metric), rule.patience, rule.min_delta)
        saved_tensors = self._resume()
        self.step, state = self.start_step, self.state
        self.log = RunLog(self.stage_dir / "metrics.jsonl",
                          self.stage_dir / "tensorboard" if config.monitor.tensorboard else None,
                          restored_rows=state.history, restored_alerts=state.alert_rows, enabled=self.is_main,
                          monitor=config.monitor, params=config.model_dump(mode="json"),
                          tracker_state=state.trackers if self.start_step else None)
        self.alerts = AlertMonitor(config.monitor, self.device)
        if self.start_step:
            self.alerts.load_state_dict(state.alerts)
            if self.stopper is not None and state.early_stopping:
                for key in ("best", "best_step", "bad_checks"):
                    setattr(self.stopper, key, state.early_stopping[key])
                self.stopper.best_weights = saved_tensors.get("best")
        has_checks = bool(self.val_batches or self.probes)
        self.check_at = val_steps(total_steps, config.val_every) if has_checks else set()

    def _setup_standard(self) -> None:
        config, model, efficiency = self.config, self.model, self.config.efficiency
        accelerator = self.accelerator = self.accelerator or dist.make_accelerator()
        self.device = accelerator.device
        self.precision = resolve_precision(config.precision, self.device)
        use_accelerate_amp = accelerator.mixed_precision != "no"
        if use_accelerate_amp:
            self.precision = accelerator.mixed_precision
        self.is_main = accelerator.is_main_process
        self.saved_attention = model.config._attn_implementation
        if config.attention:
            model.set_attn_implementation(config.attention)
        if efficiency.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        if efficiency.liger and apply_liger_kernels(model, self.device):
            self.extra["liger"] = True
        if efficiency.compile:
            self.extra["compiled_layers"] = compile_layers(model)
        if next(model.parameters()).device != self.device:
            model.to(self.device)
        model.train()
        self.fingerprint = _fingerprint(config, accelerator.num_processes, model)
        forward = TrainingForward(model, self.objective,
                                  efficiency.loss_chunk_size if efficiency.chunked_loss else None)
        if config.sharding == "fsdp2":
            base = model.get_base_model() if hasattr(model, "peft_config") else model
            dist.fsdp2_shard(forward, list(base.get_decoder().layers))
        optimizer = self.optimizer or build_optimizer(model, config.optim)
        # The scheduler (built in setup) stays unprepared: accelerate's wrapper steps it once per process,
        # and our steps are already global.
        if config.sharding == "fsdp2":
            optimizer = accelerator.prepare(optimizer)
        else:
            forward, optimizer = accelerator.prepare(forward, optimizer)
        self.forward, self.optimizer = forward, optimizer
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.amp = accelerator.autocast() if use_accelerate_amp else autocast(self.precision, self.device.type)
        if config.sharding == "fsdp2":
            # Our own fully_shard leaves DTensor shards that only accelerate's FSDP plugin knows how to save.
            if config.resume:
                raise UserError("resume: not available with sharding: fsdp2; launch with an accelerate FSDP "
                                "config (configs/accelerate/fsdp2.yaml) to checkpoint sharded runs")
            self.checkpoint_dir = None

    def _resume(self) -> dict[str, dict[str, torch.Tensor]]:
        """Load the newest checkpoint when asked to resume; a fresh start clears older ones."""
        config, root = self.config, self.checkpoint_dir
        if root is None:
            return {}
        found = latest_checkpoint(root) if config.resume else None
        if found is not None:
            self.start_step, loop_json, saved_tensors = load_checkpoint(
                found, self.model, self.optimizer, self.scheduler, self.fingerprint, self.accelerator)
            self.state = LoopState.from_json(loop_json)
            _apply_peak_lr(self.optimizer, self.scheduler, config.optim.lr)
            if self.is_main:
                console.print(f"[green]resume[/] from {found} (step {self.start_step} of {self.total_steps})")
            return saved_tensors
        if config.resume is True:
            raise UserError(f"resume: no checkpoint of this stage in {root}; nothing to resume from "
                            "(resume: auto, or --resume=auto, starts afresh when there is none)")
        if self.is_main and root.exists():
            shutil.rmtree(root)  # a fresh start must never later resume from an older run
        return {}

    # ---------------------------------------------------------------- one step

    def _update(self, micro_batches) -> _StepOutcome:
        """Forward, backward and (when finite) the optimiser step of one step's micro-batches."""
        local = dist.local_share(micro_batches, self.accelerator)
        with self.amp:
            loss, targets = accumulate_gradients(self.model, local, self.forward, self.accelerator)
        # accelerate clips the way the strategy needs (DeepSpeed clips inside its engine and may report
        # no norm); under FSDP the norm comes back as a DTensor.
        norm = self.accelerator.clip_grad_norm_(self.trainable, self.config.optim.grad_clip)
        grad_norm = float(dist.full_value(norm)) if norm is not None else 0.0
        # The gradient norm is all-reduced, so every process takes the same decision; a NaN loss leaves NaN
        # gradients, and an infinite local loss is caught by the loss test.
        applied = math.isfinite(grad_norm) and math.isfinite(loss / (targets or 1))
        if applied:
            self.optimizer.step()
        return _StepOutcome(loss, targets, sum(batch.tokens for batch in micro_batches), grad_norm, applied)

    def _private_update(self, batch: dict[str, torch.Tensor]) -> _StepOutcome:
        """One DP-SGD step; opacus steps even on a non-finite loss, so the caller stops right after."""
        loss = self.private.step(batch)
        tokens = int(batch["attention_mask"].sum())
        if loss is None:  # nobody was sampled this step: noise only, no loss to report
            return _StepOutcome(0.0, 0, tokens, None, True)
        return _StepOutcome(loss, 1, tokens, None, math.isfinite(loss))

    def _on_non_finite(self, step: int, outcome: _StepOutcome) -> None:
        """Alert, then stop (always under DP, whose update has happened) or count a skipped step."""
        state, config = self.state, self.config
        for alert in self.alerts.check_step(step, outcome.mean_loss, outcome.grad_norm or 0.0):
            self.log.alert(alert)
        state.skipped_in_a_row += 1
        if self.private is not None or config.on_non_finite == "stop" \
                or state.skipped_in_a_row >= config.max_skipped_steps:
            skipped = state.skipped_in_a_row if config.on_non_finite == "skip_step" else 0
            raise NonFiniteStep(_non_finite_message(step, outcome.mean_loss, outcome.grad_norm or 0.0, self.model,
                                                    self.checkpoint_dir, skipped))
        state.skipped_steps += 1

    # ---------------------------------------------------------------- the run

    def train(self, steps: Iterable) -> None:
        """Run the steps from where setup left off: `steps` is a `StepPlan` (anything with `.steps(start)`),
        or under DP the private run's batches."""
        config, state = self.config, self.state
        with track(self.description, total=self.total_steps) as progress:
            progress.advance(self.start_step)
            plan = steps.steps(self.start_step) if self.start_step else steps
            for step, work in enumerate(plan, start=self.start_step + 1):
                self.step = step
                self.threads_used.add(self.threads.adjust())
                started = time.perf_counter()
                lr = self.optimizer.param_groups[0]["lr"]
                outcome = self._update(work) if self.private is None else self._private_update(work)
                if not outcome.applied:
                    self._on_non_finite(step, outcome)
                else:
                    state.skipped_in_a_row = 0
                self.scheduler.step()
                if self.private is None:
                    self.optimizer.zero_grad(set_to_none=True)
                if not outcome.applied:
                    progress.advance(loss=outcome.mean_loss)
                    continue
                state.interval.add(outcome.loss, outcome.targets, outcome.tokens, outcome.grad_norm or 0.0,
                                   time.perf_counter() - started)
                if outcome.targets:
                    state.last_loss = outcome.mean_loss
                progress.advance(loss=outcome.mean_loss if outcome.targets else float("nan"))
                if outcome.targets:
                    for alert in self.alerts.check_step(step, outcome.mean_loss, outcome.grad_norm or 0.0):
                        self.log.alert(alert)
                for alert in self.alerts.check_device(step):
                    self.log.alert(alert)
                if self._log_row(step, lr):
                    self.stopped_at = step
                    if self.is_main:
                        stopper = self.stopper
                        console.print(f"[yellow]early stop[/] at step {step}: {stopper.metric} has not improved for "
                                      f"{stopper.patience} checks (best {stopper.best:.4g} at step {stopper.best_step})")
                    break
                if (self.checkpoint_dir is not None and config.checkpoint_every and step % config.checkpoint_every == 0
                        and step < self.total_steps):
                    self.save_checkpoint(step)

    def _log_row(self, step: int, lr: float) -> bool:
        """Write a metrics row when one is due (validating at check steps); True when early stopping says stop."""
        config, state = self.config, self.state
        if not (step % config.log_every == 0 or step == self.total_steps or step in self.check_at):
            return False
        row = state.interval.row(step, lr)
        state.total_tokens += state.interval.tokens
        state.train_seconds += state.interval.seconds
        if row["tokens_per_s"] is not None:
            row["mfu"] = round(mfu(row["tokens_per_s"], self.flops_per_token, self.peak), 5)
        row["peak_mem_mb"] = round(peak_memory_mb(self.device), 1)
        if self.private is not None:
            del row["grad_norm"]  # opacus clips per example: there is no global norm to report
            row["dp_epsilon"] = round(self.private.epsilon(), 4)
        stop = False
        if step in self.check_at:
            row.update(_validate(self.model, self.val_batches, self.probes, self.objective,
                                 self.device if self.private is None else None))
            state.val_loss = row.get("val_loss", state.val_loss)
            if self.stopper is not None:
                stop = self.stopper.update(step, row.get(self.stopper.metric), self.model)
        self.log.metrics(row)
        state.history.append(row)
        state.interval = _Interval()
        return stop

    def save_checkpoint(self, step: int) -> Path:
        """A resumable checkpoint of this step: weights that train, optimiser, schedule, RNGs and LoopState."""
        state, stopper = self.state, self.stopper
        state.alerts, state.alert_rows = self.alerts.state_dict(), self.log.alerts
        state.trackers = self.log.tracker_state()
        state.early_stopping = stopper.state() if stopper else None
        best = {"best": stopper.best_weights} if stopper is not None and stopper.best_weights else {}
        return save_checkpoint(self.checkpoint_dir, step, self.model, self.optimizer, self.scheduler,
                               state.to_json(), self.fingerprint, self.accelerator, keep=self.config.keep_checkpoints,
                               extra_tensors=best)

    def cleanup(self, failed: bool) -> None:
        """Close the logs (trackers mark a run that raised as failed) and hand the model back in eval mode."""
        self.log.close(failed=failed)
        if self.saved_attention is not None:
            self.model.set_attn_implementation(self.saved_attention)
        self.model.eval()

    def summary(self) -> TrainSummary:
        """The run's figures, for the weights handed back: the best check's when early stopping restored them.
        Raises NonFiniteStep rather than hand back weights that are not finite."""
        state, stopper, extra = self.state, self.stopper, self.extra
        history, val_loss = state.history, state.val_loss
        reported = history[-1] if history else {}
        if stopper is not None and stopper.best_weights is not None and stopper.best_step != self.step:
            _restore(self.model, stopper.best_weights)
            reported = next((row for row in history if row["step"] == stopper.best_step), reported)
            val_loss = reported.get("val_loss", val_loss)
            extra.update({"best_step": stopper.best_step, f"best_{stopper.metric}": stopper.best})
        if self.stopped_at is not None:
            extra["stopped_early_at"] = self.stopped_at
        if state.skipped_steps:
            extra["skipped_non_finite_steps"] = state.skipped_steps
        if len(self.threads_used) > 1:  # other processes took cores for part of the run (threads.py)
            extra["threads_used"] = sorted(self.threads_used)
        _check_finite_weights(self.model, self.step)
        extra.update({key: value for key, value in reported.items() if key == "val_rouge_l" or key.startswith("val.")})
        if self.private is not None:
            extra.update(self.private.report())
        extra["peak_mem_mb"] = round(peak_memory_mb(self.device), 1)
        # The last logged interval's mean is a steadier figure than the final step's loss alone.
        logged = [row["loss"] for row in history if row.get("loss") is not None]
        final_loss = logged[-1] if logged else state.last_loss
        summary = TrainSummary(
            steps=self.step, train_loss=final_loss, val_loss=val_loss, tokens=state.total_tokens,
            seconds=state.train_seconds, precision=self.precision, history=history, extra=extra,
            outputs=self.log.outputs(),
        )
        if summary.seconds:
            summary.extra["mfu"] = round(mfu(summary.tokens_per_s, self.flops_per_token, self.peak), 5)
        if self.is_main:
            shown_val = f"{val_loss:.4f}" if val_loss is not None else "n/a"
            world = self.accelerator.num_processes if self.accelerator is not None else 1
            privacy = (f", ε = {self.private.epsilon():.3f} at δ = {self.private.config.delta}"
                       if self.private is not None else "")
            console.print(
                f"{self.description}: {self.step} steps, loss {final_loss:.4f}, val loss {shown_val}, "
                f"{summary.tokens_per_s:,.0f} tok/s ({self.precision}, {torch.get_num_threads()} threads, {world} "
                f"process{'es' if world > 1 else ''}), peak memory {extra['peak_mem_mb']:,.0f} MB{privacy}"
            )
        return summary


def train(
    model,
    steps: Iterable,
    total_steps: int,
    config: TrainingSchedule,
    stage_dir: Path,
    **options,
) -> TrainSummary:
    """Run `total_steps` optimiser steps of `steps` (a `StepPlan`, or `private.batches()` under DP) with
    `TrainRecipe(model, config, stage_dir, **options)`: setup, train, cleanup, summary.

    Writes `metrics.jsonl`, `alerts.jsonl` and `tensorboard/` in `stage_dir`; checkpoints go to
    `checkpoint_dir` every `config.checkpoint_every` steps and stay until the pipeline has published the
    stage's output (a crash while saving or merging can still resume).
    Val loss is measured without autocast, so it is comparable across precisions; time spent on it,
    on generation and on checkpoints is left out of tokens_per_s.
    """
    recipe = TrainRecipe(model, config, stage_dir, **options)
    recipe.setup(total_steps)
    finished = False
    try:
        recipe.train(steps)
        finished = True
    finally:
        recipe.cleanup(failed=not finished)
    return recipe.summary()


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
