"""A non-finite step stops the run before its update (or, with skip_step, is skipped and counted), the
weights handed back are always finite, and the run resumes from its last checkpoint with a lower lr."""

from __future__ import annotations

import pytest
import torch

from lmsmith.train.data import StepPlan
from lmsmith.train.forward import loss_sum
from lmsmith.train.loop import NonFiniteStep, train
from test_train_loop import conflicting_data, schedule, tiny


def poisoned(at_steps: set[int]):
    """An objective whose loss is NaN on the given training calls (one call a step here)."""
    calls = [0]

    def objective(model, batch):
        calls[0] += 1
        loss, count = loss_sum(model, batch)
        return (loss * float("nan") if calls[0] in at_steps else loss), count

    return objective


def _plan(steps: int = 8) -> StepPlan:
    rows, _ = conflicting_data()
    return StepPlan(rows, pad_id=0, batch_size=4, epochs=4, max_steps=steps)


def _finite(model) -> bool:
    return all(torch.isfinite(p).all() for p in model.parameters())


def test_a_nan_step_stops_the_run_before_its_update(tmp_path):
    model = tiny()
    plan = _plan()
    with pytest.raises(NonFiniteStep, match=r"step 3: loss nan, first non-finite tensor: the gradient of model\."):
        train(model, plan, plan.total_steps, schedule(max_steps=8), tmp_path, objective=poisoned({3}))
    assert _finite(model)
    alerts = (tmp_path / "alerts.jsonl").read_text()
    assert "non_finite" in alerts


def test_skip_step_drops_the_update_counts_it_and_finishes(tmp_path):
    model = tiny()
    plan = _plan()
    summary = train(model, plan, plan.total_steps, schedule(max_steps=8, on_non_finite="skip_step"), tmp_path,
                    objective=poisoned({3, 6}))
    assert summary.steps == 8 and summary.extra["skipped_non_finite_steps"] == 2
    assert _finite(model) and all(row["loss"] == row["loss"] for row in summary.history)  # no NaN row


def test_skip_step_still_stops_after_too_many_in_a_row(tmp_path):
    plan = _plan()
    with pytest.raises(NonFiniteStep, match="step 5: loss nan after 3 skipped steps in a row"):
        train(tiny(), plan, plan.total_steps, schedule(max_steps=8, on_non_finite="skip_step"), tmp_path,
              objective=poisoned({3, 4, 5, 6, 7, 8}))


def test_the_stopped_run_resumes_from_its_last_checkpoint_with_a_lower_lr(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    plan = _plan()
    with pytest.raises(NonFiniteStep, match=rf"last finite checkpoint is {checkpoints}/step-0*4.*--resume"):
        train(tiny(), plan, plan.total_steps, schedule(max_steps=8, checkpoint_every=2), tmp_path / "first",
              checkpoint_dir=checkpoints, objective=poisoned({5}))
    model = tiny()
    lower = schedule(max_steps=8, checkpoint_every=2, resume=True)
    lower.optim = lower.optim.model_copy(update={"lr": 3e-3})  # the first run used 3e-2
    summary = train(model, plan, plan.total_steps, lower, tmp_path / "second", checkpoint_dir=checkpoints)
    assert summary.steps == 8 and _finite(model)
    resumed = [row for row in summary.history if row["step"] > 4]
    assert [row["step"] for row in summary.history[:4]] == [1, 2, 3, 4]  # restored from the checkpoint
    assert resumed[0]["step"] == 5 and all(row["lr"] <= 3e-3 for row in resumed)
    assert all(row["lr"] > 3e-3 for row in summary.history[:4])
