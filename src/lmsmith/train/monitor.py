"""Training telemetry: metrics.jsonl, TensorBoard scalars, throughput and MFU, and alerts.

TensorBoard files come from `torch.utils.tensorboard` (the `tensorboard` package); GPU utilisation and
memory come from NVIDIA's `pynvml` when it is installed; W&B and MLflow runs, when enabled, come from
their own libraries (`trackers.py`). Everything else is arithmetic on what the loop reports. Alerts are
printed and appended to `alerts.jsonl` beside the metrics, so a run that went wrong says so in its own
folder.
"""

from __future__ import annotations

import json
import math
import resource
import shutil
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from lmsmith.console import console
from lmsmith.train.trackers import open_trackers

# Dense bf16 peak of common accelerators (FLOP/s), for the MFU estimate when the config gives none.
GPU_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "4090": 165e12}


@dataclass(frozen=True)
class Alert:
    step: int
    kind: str  # loss_spike | loss_divergence | loss_rising | non_finite | grad_explosion | gpu_underused | gpu_memory
    message: str
    value: float | None = None


def training_flops_per_token(trainable_params: int, total_params: int) -> float:
    """Matmul FLOPs per trained token: 2N forward, 2N for activation gradients, 2N_trainable for weights.

    With every weight trained this is the familiar 6N; an adapter run skips most weight gradients.
    """
    return 4.0 * total_params + 2.0 * trainable_params


def peak_flops(device: torch.device, cpu_peak_flops: float) -> float:
    """The device's peak matmul rate: a table lookup on GPU, the configured figure on CPU."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in GPU_PEAK_FLOPS.items():
            if key in name:
                return flops
    return cpu_peak_flops


def mfu(tokens_per_s: float, flops_per_token: float, peak: float) -> float:
    """Model FLOPs utilisation: achieved training FLOP/s over the device's peak."""
    return tokens_per_s * flops_per_token / peak if peak > 0 else 0.0


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated by torch, or on CPU the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB on Linux


class _GpuProbe:
    """Utilisation and memory share of the current GPU via pynvml; inactive without CUDA or pynvml."""

    def __init__(self, device: torch.device):
        self.handle = None
        if device.type != "cuda":
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml = pynvml
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
        except Exception:  # pynvml missing or no driver access: the GPU alerts stay silent
            self.handle = None

    def read(self) -> tuple[float, float] | None:
        """(utilisation %, memory used %) or None."""
        if self.handle is None:
            return None
        util = self.nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu
        memory = self.nvml.nvmlDeviceGetMemoryInfo(self.handle)
        return float(util), 100.0 * memory.used / memory.total


# The divergence rule compares loss levels, each the median of this many step losses: a few odd
# batches cannot move a level, and a sustained rise moves it within five steps.
LEVEL_STEPS = 9
BASELINE_STEPS = 3 * LEVEL_STEPS  # the reference a level is compared with moves slower than the level
# The rising-loss rule wants the fitted slope this many standard errors above zero: a steady climb
# clears it easily, a noisy plateau's chance tilt almost never does.
STEADY_SLOPE_T = 7.0
# Fewest step losses a rising-loss fit uses: with fewer, the slope's standard error is too unsure for
# the test above, and a climb from step 1 is still caught by about step 6.
MIN_TREND_STEPS = 6


def _times(value: float, reference: float) -> str:
    return f"{value / reference:.2f}×" if reference > 0 else "infinitely many times"


class DivergenceWatch:
    """Catches a loss that climbs away instead of falling; armed from the first step.

    - loss_divergence: the loss level (median of the last `LEVEL_STEPS` step losses) exceeds
      `divergence_factor` × the lowest baseline so far, and by at least `divergence_min_rise` nats. The
      baseline is the median of the last `BASELINE_STEPS` (fewer at the start, the first step alone at
      step 1): length-grouped batches give step losses that differ by task, and the lowest of short
      medians would be a run of easy batches, not where the run got to;
    - loss_rising: the least-squares line through the last `trend_window` step losses (from
      `MIN_TREND_STEPS` on) climbs by more than `trend_rise` × the window's lowest loss, with a slope
      over `STEADY_SLOPE_T` standard errors.
    The first steps are noisy and the lr is still warming up, so both margins (the factor's excess over
    1, and the rise) start doubled and tighten linearly to their set values by `warmup_steps`. Each
    kind alerts once per episode: it re-arms after `trend_window` steps in a row without its condition.
    Plain arithmetic on the step losses (statistics.median and a least-squares line).
    """

    def __init__(self, config):
        self.config = config
        self.recent: list[float] = []
        self.seen = 0
        self.lowest: float | None = None
        self.lowest_step = 0
        self.lowest_mature = False  # whether `lowest` is a median of at least LEVEL_STEPS steps
        self.quiet: dict[str, int] = {}  # open episodes: kind -> steps since its condition last held

    def _looseness(self) -> float:
        """2 at the first step, falling linearly to 1 at `warmup_steps`."""
        warmup = self.config.warmup_steps
        return 2.0 - min(1.0, (self.seen - 1) / warmup) if warmup else 1.0

    def _opens_episode(self, kind: str, condition: bool) -> bool:
        quiet = self.quiet.get(kind)
        if condition:
            self.quiet[kind] = 0
            return quiet is None
        if quiet is not None:
            if quiet + 1 >= self.config.trend_window:
                del self.quiet[kind]
            else:
                self.quiet[kind] = quiet + 1
        return False

    def _rising_fit(self) -> tuple[float, float, float] | None:
        """(slope per step, fitted rise over the window, the window's lowest loss) of a steady climb."""
        window = self.recent[-self.config.trend_window:]
        n = len(window)
        if n < MIN_TREND_STEPS:
            return None
        mean_x, mean_y = (n - 1) / 2, sum(window) / n
        sxx = sum((x - mean_x) ** 2 for x in range(n))
        slope = sum((x - mean_x) * (y - mean_y) for x, y in enumerate(window)) / sxx
        if slope <= 0:
            return None
        residual = sum((y - mean_y - slope * (x - mean_x)) ** 2 for x, y in enumerate(window))
        standard_error = math.sqrt(residual / (n - 2) / sxx)
        if standard_error > 0 and slope / standard_error < STEADY_SLOPE_T:
            return None
        return slope, slope * (n - 1), min(window)

    def check(self, step: int, loss: float) -> list[Alert]:
        self.seen += 1
        self.recent = (self.recent + [loss])[-max(BASELINE_STEPS, self.config.trend_window):]
        loose = self._looseness()
        alerts = []
        level = statistics.median(self.recent[-LEVEL_STEPS:])
        baseline = statistics.median(self.recent[-BASELINE_STEPS:])
        # Until LEVEL_STEPS losses exist the baseline is where the run started (the first step alone, or
        # lower as the loss falls): a learning rate that blows the model up at once must be measured
        # against that. It is one batch, though, and with length-grouped batches one task's: from then on
        # only baselines over at least LEVEL_STEPS steps count, starting with the first of them.
        mature = self.seen >= LEVEL_STEPS
        if self.lowest is None or baseline < self.lowest or (mature and not self.lowest_mature):
            self.lowest, self.lowest_step, self.lowest_mature = baseline, step, mature
        factor = 1 + (self.config.divergence_factor - 1) * loose
        diverged = level > factor * self.lowest and level - self.lowest >= self.config.divergence_min_rise
        if self._opens_episode("loss_divergence", diverged):
            alerts.append(Alert(step, "loss_divergence",
                                f"step {step}: loss {loss:.4g}, level {level:.4g} (median of the last "
                                f"{min(LEVEL_STEPS, self.seen)} steps) is {_times(level, self.lowest)} the lowest "
                                f"baseline {self.lowest:.4g} (median of up to {BASELINE_STEPS} steps), reached at step "
                                f"{self.lowest_step} (alert over "
                                f"{factor:.2f}×)", loss))
        fit = self._rising_fit()
        limit = self.config.trend_rise * loose
        rising = fit is not None and fit[1] > limit * fit[2]
        if self._opens_episode("loss_rising", rising):
            slope, rise, low = fit
            first = step - min(self.seen, self.config.trend_window) + 1
            alerts.append(Alert(step, "loss_rising",
                                f"step {step}: loss {loss:.4g} rose steadily over steps {first}-{step}: least-squares "
                                f"slope {slope:+.4g} per step, a rise of {rise:.4g} = {_times(rise, low)} the "
                                f"window's lowest loss {low:.4g} (alert over {limit:.2f}×); lowest baseline so far "
                                f"{self.lowest:.4g} at step {self.lowest_step}", slope))
        return alerts

    def state_dict(self) -> dict[str, Any]:
        return {"recent": list(self.recent), "seen": self.seen, "lowest": self.lowest,
                "lowest_step": self.lowest_step, "lowest_mature": self.lowest_mature, "quiet": dict(self.quiet)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.recent, self.seen, self.lowest = list(state["recent"]), state["seen"], state["lowest"]
        self.lowest_step, self.quiet = state["lowest_step"], dict(state["quiet"])
        self.lowest_mature = state.get("lowest_mature", self.seen >= LEVEL_STEPS)


class AlertMonitor:
    """Watches each step's loss and gradient norm (and the GPU) and raises `Alert`s.

    - loss spike: the step loss exceeds `loss_spike_factor` × the exponential moving average of
      earlier losses (after `warmup_steps`, so the steep first descent is not compared to itself);
    - divergence and rising loss, from the first step: see `DivergenceWatch`;
    - non-finite: the loss or the gradient norm is NaN or infinite;
    - gradient explosion: the norm exceeds `grad_norm_factor` × its own moving average;
    - on GPU: utilisation under `gpu_util_min` % or memory over `gpu_memory_max` %.
    The moving averages skip alerting steps, so one spike does not hide the next.
    """

    def __init__(self, config, device: torch.device | None = None):
        self.config = config
        self.loss_ema: float | None = None
        self.grad_ema: float | None = None
        self.seen = 0
        self.divergence = DivergenceWatch(config)
        self.gpu = _GpuProbe(device or torch.device("cpu"))

    def _ema(self, previous: float | None, value: float) -> float:
        beta = self.config.ema_beta
        return value if previous is None else beta * previous + (1 - beta) * value

    def check_step(self, step: int, loss: float, grad_norm: float) -> list[Alert]:
        alerts: list[Alert] = []
        if not math.isfinite(loss) or not math.isfinite(grad_norm):
            bad = "loss" if not math.isfinite(loss) else "gradient norm"
            value = loss if not math.isfinite(loss) else grad_norm
            return [Alert(step, "non_finite", f"step {step}: {bad} is {value}", None)]
        armed = self.seen >= self.config.warmup_steps
        spike = armed and self.loss_ema is not None and loss > self.config.loss_spike_factor * self.loss_ema
        explosion = armed and self.grad_ema is not None and grad_norm > self.config.grad_norm_factor * self.grad_ema
        if spike:
            alerts.append(Alert(step, "loss_spike",
                                f"step {step}: loss {loss:.4g} is {loss / self.loss_ema:.1f}× its moving average "
                                f"{self.loss_ema:.4g}", loss))
        alerts += self.divergence.check(step, loss)
        if explosion:
            alerts.append(Alert(step, "grad_explosion",
                                f"step {step}: gradient norm {grad_norm:.4g} is {grad_norm / self.grad_ema:.1f}× its "
                                f"moving average {self.grad_ema:.4g}", grad_norm))
        if not spike:
            self.loss_ema = self._ema(self.loss_ema, loss)
        if not explosion:
            self.grad_ema = self._ema(self.grad_ema, grad_norm)
        self.seen += 1
        return alerts

    def check_device(self, step: int) -> list[Alert]:
        reading = self.gpu.read()
        if reading is None:
            return []
        util, memory = reading
        alerts = []
        if util < self.config.gpu_util_min:
            alerts.append(Alert(step, "gpu_underused", f"step {step}: GPU utilisation {util:.0f}% is under "
                                f"{self.config.gpu_util_min:.0f}% (input pipeline or launch overhead?)", util))
        if memory > self.config.gpu_memory_max:
            alerts.append(Alert(step, "gpu_memory", f"step {step}: GPU memory at {memory:.1f}% (over "
                                f"{self.config.gpu_memory_max:.0f}%); out-of-memory is close", memory))
        return alerts

    def state_dict(self) -> dict[str, Any]:
        return {"loss_ema": self.loss_ema, "grad_ema": self.grad_ema, "seen": self.seen,
                "divergence": self.divergence.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loss_ema, self.grad_ema, self.seen = state["loss_ema"], state["grad_ema"], state["seen"]
        if "divergence" in state:  # checkpoints written before the divergence alerts existed lack it
            self.divergence.load_state_dict(state["divergence"])


class RunLog:
    """metrics.jsonl, alerts.jsonl, TensorBoard event files and the W&B / MLflow runs `monitor` enables,
    of one training run (main process only).

    A resumed run passes the rows and alerts its checkpoint recorded: the files are rewritten from
    them, so rows a killed run wrote after its checkpoint are dropped, and a stage folder the pipeline
    emptied before the rerun gets its full history back. `tracker_state` is what `tracker_state()`
    returned when that checkpoint was written: the trackers' run ids (see `trackers.py` for resume).
    """

    def __init__(
        self,
        metrics_path: Path,
        tensorboard_dir: Path | None,
        restored_rows: list[dict[str, Any]] = (),
        restored_alerts: list[dict[str, Any]] = (),
        enabled: bool = True,
        monitor=None,
        params: dict[str, Any] | None = None,
        tracker_state: dict[str, Any] | None = None,
    ):
        self.enabled = enabled
        self.metrics_path = metrics_path
        self.alerts_path = metrics_path.with_name("alerts.jsonl")
        self.tensorboard_dir = tensorboard_dir
        self.alerts: list[dict[str, Any]] = list(restored_alerts)  # kept for the next checkpoint
        self.writer = None
        self.trackers: dict[str, Any] = {}
        if not enabled:
            return
        metrics_path.parent.mkdir(parents=True, exist_ok=True)
        self.metrics_path.write_text("".join(json.dumps(row) + "\n" for row in restored_rows), encoding="utf-8")
        self.alerts_path.write_text("".join(json.dumps(a) + "\n" for a in restored_alerts), encoding="utf-8")
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                console.print("[yellow]tensorboard is not installed: no TensorBoard logs[/]")
            else:
                if tensorboard_dir.exists():
                    shutil.rmtree(tensorboard_dir)  # events of a killed run would duplicate the restored ones
                self.writer = SummaryWriter(str(tensorboard_dir))
                for row in restored_rows:
                    self._scalars(row)
        if monitor is not None:
            self.trackers = open_trackers(monitor, params or {}, tracker_state or {}, metrics_path.parent,
                                          list(restored_rows), list(restored_alerts))

    def _to_trackers(self, method: str, *args) -> None:
        for name, tracker in list(self.trackers.items()):
            try:
                getattr(tracker, method)(*args)
            except Exception as error:  # an unreachable tracking server must not end the training run
                console.print(f"[yellow]{name} logging stopped[/] ({error}); metrics.jsonl keeps the record")
                del self.trackers[name]

    def _scalars(self, row: dict[str, Any]) -> None:
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)):
                tag = f"val/{key[4:]}" if key.startswith("val_") else f"train/{key}"
                self.writer.add_scalar(tag, value, row["step"])

    def metrics(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.metrics_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")
        if self.writer is not None:
            self._scalars(row)
            self.writer.flush()
        self._to_trackers("log_row", row)

    def alert(self, alert: Alert) -> None:
        self.alerts.append(asdict(alert))
        if not self.enabled:
            return
        console.print(f"[bold red]alert[/] {alert.kind}: {alert.message}")
        with open(self.alerts_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(asdict(alert)) + "\n")
        if self.writer is not None:
            self.writer.add_text("alerts", f"{alert.kind}: {alert.message}", alert.step)
        self._to_trackers("log_alert", asdict(alert), True)

    def tracker_state(self) -> dict[str, Any]:
        """The trackers' run ids, for the checkpoint: a resume continues those runs."""
        return {name: tracker.state() for name, tracker in self.trackers.items()}

    def outputs(self) -> dict[str, str]:
        """The stage outputs these logs form (names → paths relative to the stage folder)."""
        found = {"metrics": self.metrics_path.name, "alerts": self.alerts_path.name}
        if self.tensorboard_dir is not None and self.tensorboard_dir.is_dir():
            found["tensorboard"] = self.tensorboard_dir.name
        return found

    def close(self, failed: bool = False) -> None:
        """Finish the logs; `failed` marks the trackers' runs as failed rather than finished."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        self._to_trackers("close", self.alerts, failed)
        self.trackers = {}
