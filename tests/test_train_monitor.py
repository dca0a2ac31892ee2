"""Training telemetry: each alert fires on its trigger and stays quiet otherwise; logs and MFU."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lmsmith.train.config import MonitorConfig
from lmsmith.train.monitor import Alert, AlertMonitor, RunLog, mfu, peak_memory_mb, training_flops_per_token


def feed(monitor: AlertMonitor, losses, grad_norms=None) -> list[Alert]:
    grad_norms = grad_norms or [1.0] * len(losses)
    alerts = []
    for step, (loss, norm) in enumerate(zip(losses, grad_norms), start=1):
        alerts += monitor.check_step(step, loss, norm)
    return alerts


def test_smooth_training_raises_no_alert():
    losses = [5.0 * 0.97**i for i in range(60)]
    assert feed(AlertMonitor(MonitorConfig()), losses) == []


def test_loss_spike_over_k_times_the_ema():
    config = MonitorConfig(loss_spike_factor=2.0, warmup_steps=5)
    losses = [2.0] * 20 + [4.5] + [2.0] * 5
    alerts = feed(AlertMonitor(config), losses)
    assert [(a.kind, a.step) for a in alerts] == [("loss_spike", 21)]
    assert alerts[0].value == 4.5
    # Just under the factor: quiet.
    assert feed(AlertMonitor(config), [2.0] * 20 + [3.9]) == []


def test_spike_during_warmup_is_ignored():
    config = MonitorConfig(loss_spike_factor=2.0, warmup_steps=10)
    assert feed(AlertMonitor(config), [2.0, 2.0, 9.0, 2.0]) == []


@pytest.mark.parametrize("loss, norm, what", [(float("nan"), 1.0, "loss"), (1.0, float("inf"), "gradient norm")])
def test_non_finite_loss_or_gradient(loss, norm, what):
    alerts = feed(AlertMonitor(MonitorConfig()), [1.0, 1.0, loss], [1.0, 1.0, norm])
    assert [(a.kind, a.step) for a in alerts] == [("non_finite", 3)]
    assert what in alerts[0].message


def test_gradient_norm_explosion():
    config = MonitorConfig(grad_norm_factor=10.0, warmup_steps=3)
    norms = [0.5] * 10 + [8.0] + [0.5] * 3 + [30.0]
    alerts = feed(AlertMonitor(config), [1.0] * len(norms), norms)
    # 8.0 is 16x the 0.5 average; after it the average is unchanged, so 30.0 fires too.
    assert [(a.kind, a.step) for a in alerts] == [("grad_explosion", 11), ("grad_explosion", 15)]


class FakeGpu:
    def __init__(self, util: float, memory: float):
        self.reading = (util, memory)

    def read(self):
        return self.reading


@pytest.mark.parametrize("util, memory, kinds", [
    (20.0, 50.0, ["gpu_underused"]),
    (90.0, 97.0, ["gpu_memory"]),
    (10.0, 99.0, ["gpu_underused", "gpu_memory"]),
    (80.0, 60.0, []),
])
def test_gpu_utilisation_and_memory_alerts(util, memory, kinds):
    monitor = AlertMonitor(MonitorConfig())
    monitor.gpu = FakeGpu(util, memory)
    assert [a.kind for a in monitor.check_device(7)] == kinds


def test_no_gpu_means_no_device_alerts():
    assert AlertMonitor(MonitorConfig(), torch.device("cpu")).check_device(1) == []


def test_monitor_state_round_trips():
    first = AlertMonitor(MonitorConfig())
    feed(first, [3.0, 2.5, 2.2], [1.0, 0.8, 0.9])
    second = AlertMonitor(MonitorConfig())
    second.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert second.check_step(4, 2.0, 0.7) == first.check_step(4, 2.0, 0.7)
    assert second.state_dict() == first.state_dict()


def test_run_log_writes_metrics_alerts_and_tensorboard(tmp_path):
    log = RunLog(tmp_path / "metrics.jsonl", tmp_path / "tb")
    for step in (1, 2, 3):
        log.metrics({"step": step, "loss": 1.0 / step, "lr": 0.1, "val_loss": 2.0})
    log.alert(Alert(2, "loss_spike", "step 2: boom", 9.0))
    log.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3]
    alert = json.loads((tmp_path / "alerts.jsonl").read_text())
    assert alert == {"step": 2, "kind": "loss_spike", "message": "step 2: boom", "value": 9.0}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx([1.0, 0.5, 1 / 3])
    assert "val/loss" in events.Tags()["scalars"]

    # A resumed run rewrites the files from its checkpoint's record: later rows of a killed run go.
    resumed = RunLog(tmp_path / "metrics.jsonl", tmp_path / "tb", restored_rows=rows[:2], restored_alerts=[alert])
    resumed.metrics({"step": 3, "loss": 0.25, "lr": 0.1})
    resumed.close()
    again = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in again] == [1, 2, 3] and again[2]["loss"] == 0.25
    assert [json.loads(l) for l in (tmp_path / "alerts.jsonl").read_text().splitlines()] == [alert]
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx([1.0, 0.5, 0.25])


def test_a_clean_run_leaves_an_empty_alerts_file(tmp_path):
    RunLog(tmp_path / "metrics.jsonl", None).close()
    assert (tmp_path / "alerts.jsonl").read_text() == ""


def test_mfu_is_six_n_per_token_over_peak_for_full_training():
    assert training_flops_per_token(100, 100) == 600
    assert training_flops_per_token(1, 100) == 402  # an adapter skips most weight gradients
    assert mfu(1000.0, 600.0, 1.2e6) == pytest.approx(0.5)
    assert math.isfinite(peak_memory_mb(torch.device("cpu"))) and peak_memory_mb(torch.device("cpu")) > 10
