"""Loss curves from a training stage's metrics.jsonl, drawn with matplotlib's Agg canvas.

`matplotlib.figure.Figure` is used directly (no pyplot), so no global backend or window state is
touched and the report can run in any process.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

from lmsmith.eval.data import read_jsonl


@dataclass
class LossHistory:
    train: list[tuple[float, float]] = field(default_factory=list)  # (step, loss)
    val: list[tuple[float, float]] = field(default_factory=list)  # (step, val_loss)
    tokens_per_s: list[float] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.train and not self.val


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def read_loss_history(path: Path) -> LossHistory:
    """Train and validation loss by step; rows without a step or a loss are skipped."""
    history = LossHistory()
    for _, row in read_jsonl(path):
        step = _number(row.get("step"))
        if step is None:
            continue
        loss, val_loss, speed = _number(row.get("loss")), _number(row.get("val_loss")), _number(row.get("tokens_per_s"))
        if loss is not None:
            history.train.append((step, loss))
        if val_loss is not None:
            history.val.append((step, val_loss))
        if speed is not None:
            history.tokens_per_s.append(speed)
    return history


def loss_curve_png(history: LossHistory, title: str) -> bytes:
    """A PNG of train (line) and validation (markers) loss against the optimiser step."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 3.6), dpi=100)
    axes = figure.subplots()
    if history.train:
        steps, losses = zip(*history.train)
        axes.plot(steps, losses, label="train", color="#0969da", linewidth=1.5)
    if history.val:
        steps, losses = zip(*history.val)
        axes.plot(steps, losses, label="val", color="#cf222e", marker="o", linewidth=1.2)
    axes.set_title(title)
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
