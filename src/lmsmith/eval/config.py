from __future__ import annotations

from typing import Optional

from pydantic import Field

from lmsmith.schema import StrictModel


class EvalConfig(StrictModel):
    """The base and the tuned model (and any compressed variants named) on the same eval tasks, one table."""

    variants: list[str] = Field(
        [], description="Compressed variants (compress.variants names) scored here too, beside base and tuned, on "
        "these tasks; the compress stage already scores every variant on its own tasks.")

    tasks: list[str] = Field(
        ["held-out", "finance-suite"],
        description="held-out: the run's own test split (answers scored against references, numeric truths, "
        "perplexity of the test corpus); finance-suite: the embedded finance tasks about companies held "
        "out of the embedded training data; or a task YAML path (`lmsmith eval`'s schema).")
    max_items: Optional[int] = Field(None, ge=1, description="Score at most this many items per task (quick runs).")
    max_new_tokens: Optional[int] = Field(None, ge=1, description="Cap on every task's answer length.")
    numeric_rel_tol: float = Field(0.01, ge=0, description="held-out numeric answers: relative tolerance.")
    batch_size: int = Field(16, ge=1, description="Sequences per forward pass.")
    speed_requests: int = Field(8, ge=0, description="Requests timed per model for tok/s and latency (0: no timing).")
