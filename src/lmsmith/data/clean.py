"""`lmsmith data clean`: the data pipeline (`lmsmith.data.engine`) over one input, its rows written back
as read (only their text rewritten) to kept.jsonl, the drops to dropped.jsonl, the counters to
manifest.json.

Every record read ends in kept.jsonl or in dropped.jsonl with `reason`, the step that dropped it; the
manifest's `steps` list shows in/dropped/out per step, and read = kept + dropped holds step by step.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from lmsmith.console import console
from lmsmith.data.config import PipelineConfig
from lmsmith.data.engine import OnError, Original, Source, run_stream, stream_options
from lmsmith.data.executor import ExecutorKind
from lmsmith.data.record import Record


class _CleanWriter:
    def __init__(self, out_dir: Path):
        self.kept = open(out_dir / "kept.jsonl", "w", encoding="utf-8")
        self.dropped = open(out_dir / "dropped.jsonl", "w", encoding="utf-8")

    def keep(self, record: Record, split: str, modified: list[str], tags: list[str]) -> None:
        row = {**(record.row or {}), "tags": tags} if tags else record.row
        self.kept.write(json.dumps(row, ensure_ascii=False) + "\n")

    def drop(self, record: Record, split: str, reason: str, detail: str, modified: list[str],
             original: Optional[Original]) -> None:
        row = record.row if record.row is not None else record.raw
        self.dropped.write(json.dumps({"reason": reason, "detail": detail, "where": record.where, "id": record.id,
                                       "record": row}, ensure_ascii=False) + "\n")

    def close(self) -> None:
        self.kept.close()
        self.dropped.close()


def run_clean(
    input_path: str | Path,
    out_dir: str | Path,
    plan: Optional[PipelineConfig] = None,
    executor: Optional[ExecutorKind] = None,
    workers: Optional[int] = None,
    on_error: OnError = "fail",
) -> dict[str, Any]:
    """Clean `input_path` (a file or folder) into `out_dir`/kept.jsonl, dropped.jsonl and manifest.json;
    returns the manifest. `executor` and `workers` override the plan's."""
    plan = plan or PipelineConfig()
    updates = {key: value for key, value in (("executor", executor), ("workers", workers)) if value is not None}
    plan = plan.model_copy(update=updates)
    input_path, out_dir = Path(input_path), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    source = Source(str(input_path), path=input_path, fmt=plan.format, text_unit=plan.text_unit)
    writer = _CleanWriter(out_dir)
    try:
        stream = run_stream([source], stream_options(plan, on_error), writer, out_dir / ".work")
    finally:
        writer.close()
    read, kept = stream.total(stream.read), stream.total(stream.kept)
    dropped_by = stream.dropped_by()
    manifest = {
        "input": str(input_path),
        "executor": {"kind": plan.executor, "workers": plan.workers},
        "pipeline": plan.model_dump(mode="json"),
        "counts": {"read": read, "kept": kept, "dropped": read - kept},
        "dropped_by": dropped_by,
        "steps": stream.step_table(),
        "tags": {f"{step}:{tag}": count for (_, step, tag), count in sorted(stream.tags.items())},
        "shards": stream.shards,
        "near_dedup": stream.near_dedup or None,
        "fitted": stream.fitted or None,
        "wall_time_s": stream.wall_time_s,
        "records_per_s": round(read / stream.wall_time_s, 1) if stream.wall_time_s > 0 else None,
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False), encoding="utf-8")
    console.print(f"read {read}, kept {kept}, dropped {read - kept} "
                  f"({', '.join(f'{k} {v}' for k, v in dropped_by.items()) or 'none'})")
    return manifest
