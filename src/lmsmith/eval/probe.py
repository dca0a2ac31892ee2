"""Eval tasks as a training-time probe: a capped sample of each task, scored at every val check.

The sft stage builds a `TaskProbe` from `sft.val_tasks`; the training loop calls `scores(model)` at each
val check and writes the result to metrics.jsonl and TensorBoard as `val.TASK.METRIC`, where early
stopping can watch it. The scoring is `lmsmith.eval.suite`'s, so a probe's number is the eval stage's
number on the same items.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lmsmith.eval.compare import produced_headlines
from lmsmith.eval.tasks import TaskConfig


@dataclass
class TaskProbe:
    tasks: list[TaskConfig]  # each already capped (`limit`)
    tokenizer: Any
    batch_size: int = 16

    def metric_names(self) -> list[str]:
        return [f"val.{task.name}.{metric}" for task in self.tasks for metric in produced_headlines(task)]

    def scores(self, model) -> dict[str, float]:
        from lmsmith.eval.suite import LocalModel, evaluate_task

        was_training = model.training
        model.eval()
        row: dict[str, float] = {}
        try:
            backend = LocalModel(model, self.tokenizer, self.batch_size, quiet=True)
            for task in self.tasks:
                result = evaluate_task(task, backend)
                for metric in produced_headlines(task):
                    value = result.get(metric)
                    if isinstance(value, (int, float)) and not isinstance(value, bool):
                        row[f"val.{task.name}.{metric}"] = round(float(value), 3)
        finally:
            model.train(was_training)
        return row
