"""One rich console for the whole process, and the progress bars every long step shows."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(highlight=False)


class Tracker:
    """A handle on one progress bar: `advance()` it and optionally show a live metric."""

    def __init__(self, progress: Progress, task_id: int):
        self._progress = progress
        self._task_id = task_id

    def advance(self, steps: int = 1, **fields: object) -> None:
        status = "  ".join(f"{k}={_fmt(v)}" for k, v in fields.items())
        self._progress.update(self._task_id, advance=steps, status=status)


def _fmt(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


@contextmanager
def track(description: str, total: int | None) -> Iterator[Tracker]:
    """Show a progress bar for `total` steps; yields a Tracker."""
    progress = Progress(
        TextColumn("[bold blue]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
        console=console,
        transient=False,
    )
    with progress:
        task_id = progress.add_task(description, total=total, status="")
        yield Tracker(progress, task_id)
