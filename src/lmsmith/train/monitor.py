"""Training telemetry: metrics.jsonl, TensorBoard scalars, throughput and MFU, and alerts.

TensorBoard files come from `torch.utils.tensorboard` (the `tensorboard` package); GPU utilisation and
memory come from NVIDIA's `pynvml` when it is installed. Everything else is arithmetic on what the loop
reports. Alerts are printed and appended to `alerts.jsonl` beside the metrics, so a run that went wrong
says so in its own folder.
"""

from __future__ import annotations

import json
import math
import resource
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from lmsmith.console import console

# Dense bf16 peak of common accelerators (FLOP/s), for the MFU estimate when the config gives none.
GPU_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "4090": 165e12}


@dataclass(frozen=True)
class Alert:
    step: int
    kind: str  # loss_spike | non_finite | grad_explosion | gpu_underused | gpu_memory
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


class AlertMonitor:
    """Watches each step's loss and gradient norm (and the GPU) and raises `Alert`s.

    - loss spike: the step loss exceeds `loss_spike_factor` × the exponential moving average of
      earlier losses (after `warmup_steps`, so the steep first descent is not compared to itself);
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
        return {"loss_ema": self.loss_ema, "grad_ema": self.grad_ema, "seen": self.seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loss_ema, self.grad_ema, self.seen = state["loss_ema"], state["grad_ema"], state["seen"]


class RunLog:
    """metrics.jsonl, alerts.jsonl and TensorBoard event files of one training run (main process only).

    A resumed run passes the rows and alerts its checkpoint recorded: the files are rewritten from
    them, so rows a killed run wrote after its checkpoint are dropped, and a stage folder the pipeline
    emptied before the rerun gets its full history back.
    """

    def __init__(
        self,
        metrics_path: Path,
        tensorboard_dir: Path | None,
        restored_rows: list[dict[str, Any]] = (),
        restored_alerts: list[dict[str, Any]] = (),
        enabled: bool = True,
    ):
        self.enabled = enabled
        self.metrics_path = metrics_path
        self.alerts_path = metrics_path.with_name("alerts.jsonl")
        self.tensorboard_dir = tensorboard_dir
        self.alerts: list[dict[str, Any]] = list(restored_alerts)  # kept for the next checkpoint
        self.writer = None
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

    def alert(self, alert: Alert) -> None:
        self.alerts.append(asdict(alert))
        if not self.enabled:
            return
        console.print(f"[bold red]alert[/] {alert.kind}: {alert.message}")
        with open(self.alerts_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(asdict(alert)) + "\n")
        if self.writer is not None:
            self.writer.add_text("alerts", f"{alert.kind}: {alert.message}", alert.step)

    def outputs(self) -> dict[str, str]:
        """The stage outputs these logs form (names → paths relative to the stage folder)."""
        found = {"metrics": self.metrics_path.name, "alerts": self.alerts_path.name}
        if self.tensorboard_dir is not None and self.tensorboard_dir.is_dir():
            found["tensorboard"] = self.tensorboard_dir.name
        return found

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
