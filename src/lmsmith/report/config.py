from __future__ import annotations

from lmsmith.schema import StrictModel


class ReportConfig(StrictModel):
    """Render report.md and a self-contained report.html from every stage's manifest."""

    title: str = "lmsmith run report"
