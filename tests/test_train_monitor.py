"""Training telemetry: each alert fires on its trigger and stays quiet otherwise; logs and MFU."""

from __future__ import annotations

import json
import math
import random

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


# ---- divergence and rising loss


def climb(shape: str, noise: float = 0.0, seed: int = 0, steps: int = 25, start: float = 4.4, end: float = 40.0):
    """A loss that climbs from `start` to `end`, geometrically or linearly, with multiplicative noise."""
    rng = random.Random(seed)
    fraction = [t / (steps - 1) for t in range(steps)]
    base = [start * (end / start) ** f if shape == "geometric" else start + (end - start) * f for f in fraction]
    return [value * math.exp(rng.gauss(0, noise)) for value in base]


def real_run(seed: int, steps: int = 1500, start: float = 10.4, floor: float = 2.0, noise: float = 0.1):
    """A healthy run: a fast exponential drop from `start`, then a noisy plateau at `floor`."""
    rng = random.Random(seed)
    return [(floor + (start - floor) * math.exp(-t / 40)) * math.exp(rng.gauss(0, noise)) for t in range(steps)]


def divergence_alerts(alerts: list[Alert]) -> list[Alert]:
    return [a for a in alerts if a.kind in ("loss_divergence", "loss_rising")]


@pytest.mark.parametrize("shape", ["geometric", "linear"])
@pytest.mark.parametrize("noise, within", [(0.0, 6), (0.1, 12)])
def test_a_steady_climb_from_the_first_step_is_caught_within_a_few_steps(shape, noise, within):
    for seed in range(5):
        alerts = divergence_alerts(feed(AlertMonitor(MonitorConfig()), climb(shape, noise, seed)))
        assert alerts and alerts[0].step <= within, (seed, [(a.kind, a.step) for a in alerts])
        # One alert per kind for the whole climb, however long it lasts.
        kinds = [a.kind for a in alerts]
        assert len(kinds) == len(set(kinds))


@pytest.mark.parametrize("noise, within", [(0.0, 7), (0.1, 10)])
def test_a_climb_after_a_normal_descent_is_caught(noise, within):
    descent = real_run(0, steps=60, noise=noise)
    rng = random.Random(1)
    rise = [descent[-1] * 1.1**k * math.exp(rng.gauss(0, noise)) for k in range(1, 30)]
    alerts = divergence_alerts(feed(AlertMonitor(MonitorConfig()), descent + rise))
    assert alerts and 60 < alerts[0].step <= 60 + within, [(a.kind, a.step) for a in alerts]


@pytest.mark.parametrize("floor", [2.0, 0.05])
@pytest.mark.parametrize("noise", [0.05, 0.15])
def test_a_healthy_noisy_run_raises_no_alert(floor, noise):
    for seed in range(3):
        alerts = feed(AlertMonitor(MonitorConfig()), real_run(seed, floor=floor, noise=noise))
        assert alerts == [], (seed, [a.message for a in alerts[:3]])


def test_a_blow_up_at_the_second_step_is_measured_against_the_first():
    # A learning rate far too high: the loss jumps at once and stays up (the failure, sped up).
    alerts = feed(AlertMonitor(MonitorConfig()), [3.9, 11.6, 15.4, 18.5, 16.4, 15.4, 9.8, 12.8])
    assert [(a.kind, a.step) for a in alerts] == [("loss_divergence", 3)]
    assert "lowest baseline 3.9 (median of up to 27 steps), reached at step 1" in alerts[0].message


def test_warmup_loosens_the_divergence_threshold_without_disarming_it():
    jump = [1.0] + [2.5] * 20  # 2.5x the first level: over the factor 2, under its doubled margin (3)
    settled = feed(AlertMonitor(MonitorConfig(warmup_steps=0)), jump)
    warming = feed(AlertMonitor(MonitorConfig(warmup_steps=10)), jump)
    assert [(a.kind, a.step) for a in divergence_alerts(settled)] == [("loss_divergence", 3)]
    # The margin 1 + 1 x (2 - (n - 1) / 10) drops under 2.5 after six steps: later, not never.
    assert [(a.kind, a.step) for a in divergence_alerts(warming)] == [("loss_divergence", 7)]


def test_divergence_needs_a_rise_in_nats_not_only_a_ratio():
    # A baseline of 0.05, then a level of 0.2: four times the baseline, but a rise of 0.15 nats.
    losses = [0.5 * 0.8**t for t in range(10)] + [0.05] * 30 + [0.2] * 20
    assert divergence_alerts(feed(AlertMonitor(MonitorConfig()), losses)) == []
    assert divergence_alerts(feed(AlertMonitor(MonitorConfig(divergence_min_rise=0.0)), losses))


def test_each_kind_alerts_once_per_episode_and_rearms_after_a_quiet_spell():
    plateau = [2.0] * 30
    up = [2.0 * 1.15**k for k in range(1, 21)]
    losses = plateau + up + plateau + up
    alerts = divergence_alerts(feed(AlertMonitor(MonitorConfig()), losses))
    kinds_and_steps = [(a.kind, a.step) for a in alerts]
    assert sorted(kind for kind, _ in kinds_and_steps) == ["loss_divergence"] * 2 + ["loss_rising"] * 2
    first, second = [step for _, step in kinds_and_steps[:2]], [step for _, step in kinds_and_steps[2:]]
    assert all(30 < step <= 42 for step in first) and all(80 < step <= 92 for step in second), kinds_and_steps


def test_alert_messages_carry_the_numbers():
    alerts = divergence_alerts(feed(AlertMonitor(MonitorConfig()), [2.0] * 20 + [2.0 + 1.5 * k for k in range(1, 16)]))
    by_kind = {a.kind: a for a in alerts}
    rising, diverging = by_kind["loss_rising"], by_kind["loss_divergence"]
    assert rising.message.startswith(f"step {rising.step}: loss ")
    window = f"over steps {rising.step - 11}-{rising.step}"
    assert f"{window}: least-squares slope {rising.value:+.4g} per step" in rising.message
    assert 0 < rising.value <= 1.5 and "lowest baseline so far 2 at step 9" in rising.message
    assert diverging.message.startswith(f"step {diverging.step}: loss ")
    assert "lowest baseline 2 (median of up to 27 steps), reached at step 9" in diverging.message
    assert "median of the last 9 steps" in diverging.message
    assert diverging.value == pytest.approx(2.0 + 1.5 * (diverging.step - 20))


def test_divergence_state_round_trips_mid_episode():
    losses = climb("geometric", noise=0.1, seed=3, steps=40)
    first = AlertMonitor(MonitorConfig())
    early = feed(first, losses[:15])
    assert divergence_alerts(early)  # the split falls inside an open episode
    second = AlertMonitor(MonitorConfig())
    second.load_state_dict(json.loads(json.dumps(first.state_dict())))
    later = list(enumerate(losses[15:] + real_run(0, steps=30), start=16))
    assert [second.check_step(s, l, 1.0) for s, l in later] == [first.check_step(s, l, 1.0) for s, l in later]
    assert second.state_dict() == first.state_dict()


def test_a_learning_rate_far_too_high_leaves_a_divergence_alert_in_the_stage_folder(tmp_path):
    from test_train_loop import schedule, tiny

    from lmsmith.train.config import OptimConfig
    from lmsmith.train.data import Example, StepPlan
    from lmsmith.train.loop import train

    rng = random.Random(0)
    rows = [[rng.randrange(3, 50) for _ in range(12)] for _ in range(16)]
    plan = StepPlan([Example(input_ids=r, labels=r) for r in rows], pad_id=0, batch_size=4, epochs=10, max_steps=6)
    config = schedule(max_steps=6, val_every=None, optim=OptimConfig(lr=3.0, warmup_ratio=0.0))
    train(tiny(), plan, plan.total_steps, config, tmp_path)
    alerts = [json.loads(line) for line in (tmp_path / "alerts.jsonl").read_text().splitlines()]
    assert "loss_divergence" in [a["kind"] for a in alerts]


def test_length_grouped_batches_with_an_easy_first_batch_raise_no_divergence():
    """The demo's sft (its 5-step means: 2.9, 6.2, 2.4, 1.9, 3.8, 3.8, 1.8, ...): one task per batch, the
    first one easy (1.9), a bump while the lr warms up, then a falling curve whose steps still differ by
    task (0.35-0.9 at the end)."""
    import random

    rng = random.Random(0)
    tasks = [1.0, 0.45, 1.6, 0.8, 1.25]  # relative difficulty of each task's batches
    losses = [1.9] + [rng.uniform(2.2, 3.8) for _ in range(4)] + [rng.uniform(4.5, 7.5) for _ in range(5)]
    losses += [rng.uniform(1.5, 4.0) for _ in range(20)]
    losses += [3.0 * 0.985**k * rng.choice(tasks) for k in range(215)]
    assert divergence_alerts(feed(AlertMonitor(MonitorConfig()), losses)) == []
