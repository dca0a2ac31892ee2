"""`lmsmith data clean`: stream records from files, run the operators on an executor, remove exact and
near duplicates, and account for every record read.

Two passes:
1. Records stream from `lmsmith.data.io` in batches; `clean_batch` (run by the local or the Ray
   executor, unchanged) applies the operators and returns each survivor with its exact-dedup key and
   MinHash signature. Survivors go to a work file, signatures to a spill file, drops to dropped.jsonl.
2. Exact keys (numpy `unique`) and the near-duplicate index (`lmsmith.data.minhash`) decide which
   survivors are duplicates, earliest kept; the work file is re-read to write kept.jsonl.

Every record read ends in kept.jsonl or in dropped.jsonl with `reason`, the step that dropped it:
`read` (malformed, with `--on-error skip`), `empty`, an operator's name (`#2` for its second use),
`exact_dedup` or `near_dedup`. The manifest's `steps` list shows in/dropped/out per step, and
read = kept + dropped holds in total and step by step.
"""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Optional

import numpy as np

from lmsmith.console import console, track
from lmsmith.data.config import PipelineConfig
from lmsmith.data.executor import ExecutorKind, make_executor
from lmsmith.data.io import (
    ReadError,
    check_record,
    is_empty,
    iter_file,
    list_input_files,
    rewrite_fields,
    text_fields,
)
from lmsmith.data.minhash import Bander, MinHasher, NearDupIndex, lsh_params
from lmsmith.data.ops import Mapper, Op, build_ops
from lmsmith.data.records import dedup_key

OnError = Literal["fail", "skip"]
READ, EMPTY, EXACT, NEAR = "read", "empty", "exact_dedup", "near_dedup"


@dataclass
class Item:
    """A record on its way to a worker; `error` is set for a malformed one (passed through so that
    drops come out in reading order whatever the executor)."""

    where: str
    fmt: str
    row: Optional[dict[str, Any]]
    error: Optional[str] = None


@dataclass
class Outcome:
    """What the operators made of one item: `reason` is None for a survivor."""

    item: Item
    reason: Optional[str] = None
    detail: str = ""
    modified: list[str] = field(default_factory=list)
    key: int = 0
    near: bool = False


@dataclass
class BatchResult:
    outcomes: list[Outcome]
    signatures: np.ndarray  # one row per outcome with `near` set, in order
    band_keys: np.ndarray


def step_names(specs: list[dict[str, Any]]) -> list[str]:
    """Operator names, made unique (`regex_filter`, `regex_filter#2`) so each step is accounted alone."""
    seen: Counter = Counter()
    names = []
    for spec in specs:
        seen[spec["op"]] += 1
        names.append(spec["op"] if seen[spec["op"]] == 1 else f"{spec['op']}#{seen[spec['op']]}")
    return names


def record_kind(fmt: str) -> Literal["corpus", "instructions"]:
    return "corpus" if fmt == "text" else "instructions"


def apply_ops(item: Item, ops: list[tuple[str, Op]]) -> tuple[Optional[tuple[str, str]], list[str]]:
    """Run the operators on one record in place: ((step, detail) if dropped, else None; steps that
    modified it)."""
    if is_empty(item.row, item.fmt):
        return (EMPTY, "no text to begin with"), []
    kind = record_kind(item.fmt)
    modified = []
    for step, op in ops:
        if not op.applies_to(kind):
            continue
        if isinstance(op, Mapper):
            if rewrite_fields(item.row, item.fmt, op.map):
                modified.append(step)
            if is_empty(item.row, item.fmt):
                return (step, "no text left after this operator"), modified
        else:
            detail = op.reject("\n".join(text_fields(item.row, item.fmt)))
            if detail is not None:
                return (step, detail), modified
    return None, modified


# Workers build the operators once per pipeline, not once per batch.
_PREPARED: dict[str, tuple[list[tuple[str, Op]], Optional[MinHasher], Optional[Bander]]] = {}


def _prepare(payload: dict[str, Any]):
    cache_key = json.dumps(payload, sort_keys=True)
    if cache_key not in _PREPARED:
        plan = PipelineConfig.model_validate(payload)
        ops = list(zip(step_names(plan.ops), build_ops(plan.ops)))
        hasher = bander = None
        near = plan.near_dedup
        if near.enabled:
            hasher = MinHasher(near.num_perm, near.unit, near.char_ngram, near.word_ngram)
            bander = Bander(*lsh_params(near.threshold, near.num_perm))
        _PREPARED.clear()
        _PREPARED[cache_key] = (ops, hasher, bander)
    return _PREPARED[cache_key]


def clean_batch(payload: dict[str, Any], items: list[Item]) -> BatchResult:
    """The unit of work both executors run: operators, exact keys and signatures for one batch."""
    ops, hasher, bander = _prepare(payload)
    near_target = payload["near_dedup"]["apply_to"]
    outcomes, signatures = [], []
    for item in items:
        if item.error is not None:
            outcomes.append(Outcome(item, READ, item.error))
            continue
        verdict, modified = apply_ops(item, ops)
        if verdict is not None:
            outcomes.append(Outcome(item, verdict[0], verdict[1], modified))
            continue
        text = "\n".join(text_fields(item.row, item.fmt))
        outcome = Outcome(item, None, "", modified, key=int(dedup_key(text)[:16], 16))
        if hasher is not None and near_target in ("both", record_kind(item.fmt)):
            outcome.near = True
            signatures.append(hasher.signature(text))
        outcomes.append(outcome)
    num_perm = payload["near_dedup"]["num_perm"]
    stacked = np.stack(signatures) if signatures else np.empty((0, num_perm), dtype=np.uint32)
    keys = bander.keys(stacked) if bander is not None else np.empty((0, 0), dtype=np.uint64)
    return BatchResult(outcomes, stacked, keys)


def _record_id(row: Any, where: str) -> str:
    value = row.get("id") if isinstance(row, dict) else None
    return str(value) if isinstance(value, (str, int)) and not isinstance(value, bool) else where


class _Reader:
    """Streams well-formed items in batches; malformed ones raise (fail) or are written as drops (skip)."""

    def __init__(self, path: Path, plan: PipelineConfig, on_error: OnError):
        self.path, self.plan, self.on_error = path, plan, on_error
        self.read = 0

    def _malformed(self, file: Path, where: str, problem: str, raw: Any) -> Item:
        line = where.rsplit(":", 1)[1]
        if self.on_error == "fail":
            raise ReadError(f"{file}:{line}: {problem}")
        return Item(where, "", raw, error=f"{file}:{line}: {problem}")

    def items(self) -> Iterator[tuple[Item, int]]:
        for file, name in list_input_files(self.path):
            for raw in iter_file(file, name, self.plan.text_unit):
                self.read += 1
                if raw.error is not None:
                    yield self._malformed(file, raw.where, raw.error, raw.raw), raw.size
                    continue
                problem, fmt = check_record(raw.row, self.plan.format)
                if problem is not None:
                    yield self._malformed(file, raw.where, problem, raw.row), raw.size
                    continue
                yield Item(raw.where, fmt, raw.row), raw.size

    def shards(self) -> Iterator[tuple[int, Iterator[list[Item]], dict[str, int]]]:
        """(index, batches, stats) per shard of about `shard_bytes` input; `stats` fills as it streams."""
        stream = self.items()
        pending: Optional[tuple[Item, int]] = next(stream, None)
        index = 0
        while pending is not None:
            stats = {"index": index, "records": 0, "bytes": 0}

            def batches(first: tuple[Item, int], stats: dict[str, int] = stats) -> Iterator[list[Item]]:
                nonlocal pending
                batch: list[Item] = []
                current: Optional[tuple[Item, int]] = first
                while current is not None:
                    item, size = current
                    batch.append(item)
                    stats["records"] += 1
                    stats["bytes"] += size
                    current = next(stream, None)
                    if len(batch) >= self.plan.batch_size or current is None or stats["bytes"] >= self.plan.shard_bytes:
                        yield batch
                        batch = []
                    if stats["bytes"] >= self.plan.shard_bytes:
                        break
                pending = current

            first, pending = pending, None
            yield index, batches(first), stats
            index += 1


def _write(handle: Any, row: dict[str, Any]) -> None:
    handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def run_clean(
    input_path: str | Path,
    out_dir: str | Path,
    plan: Optional[PipelineConfig] = None,
    executor: ExecutorKind = "local",
    workers: int = 1,
    on_error: OnError = "fail",
) -> dict[str, Any]:
    """Clean `input_path` (a file or folder) into `out_dir`/kept.jsonl, dropped.jsonl and
    manifest.json; returns the manifest."""
    plan = plan or PipelineConfig()
    input_path, out_dir = Path(input_path), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = out_dir / ".work"
    work.mkdir(exist_ok=True)
    payload = plan.model_dump(mode="json")
    names = step_names(plan.ops)
    started = time.perf_counter()
    dropped_by: Counter = Counter()
    modified_by: Counter = Counter()
    keys: list[int] = []
    near_positions: list[int] = []
    shards: list[dict[str, int]] = []
    near = plan.near_dedup
    index = NearDupIndex(near.threshold, near.num_perm, workdir=work) if near.enabled else None
    try:
        with open(out_dir / "dropped.jsonl", "w", encoding="utf-8") as dropped, \
                open(work / "survivors.jsonl", "w", encoding="utf-8") as survivors, \
                make_executor(executor, workers) as pool, \
                track(f"cleaning ({executor}, {workers} worker{'s' * (workers > 1)})", total=None) as bar:
            reader = _Reader(input_path, plan, on_error)
            for _, batches, stats in reader.shards():
                for result in pool.map_batches(clean_batch, payload, batches):
                    for outcome in result.outcomes:
                        modified_by.update(outcome.modified)
                        item = outcome.item
                        if outcome.reason is not None:
                            dropped_by[outcome.reason] += 1
                            _write(dropped, {"reason": outcome.reason, "detail": outcome.detail, "where": item.where,
                                             "id": _record_id(item.row, item.where), "record": item.row})
                            continue
                        if outcome.near:
                            near_positions.append(len(keys))
                        keys.append(outcome.key)
                        _write(survivors, {"where": item.where, "row": item.row})
                    if index is not None:
                        index.add(result.signatures, result.band_keys)
                    bar.advance(len(result.outcomes))
                shards.append(dict(stats))
            read = reader.read
        duplicate_of = _find_duplicates(np.array(keys, dtype=np.uint64), np.array(near_positions, dtype=np.int64),
                                        index, plan.exact_dedup)
        kept = _write_kept(out_dir, work / "survivors.jsonl", duplicate_of, dropped_by)
    finally:
        if index is not None:
            index.close()
        shutil.rmtree(work, ignore_errors=True)

    wall = time.perf_counter() - started
    steps = _steps(read, [READ, EMPTY, *names, EXACT, NEAR], dropped_by, modified_by)
    dropped_total = sum(dropped_by.values())
    if read != kept + dropped_total or steps[-1]["out"] != kept:
        raise AssertionError(f"accounting does not reconcile: read {read}, kept {kept}, dropped {dropped_total}")
    manifest = {
        "input": str(input_path),
        "executor": {"kind": executor, "workers": workers},
        "pipeline": payload,
        "counts": {"read": read, "kept": kept, "dropped": dropped_total},
        "dropped_by": {reason: count for reason, count in dropped_by.items() if count},
        "steps": steps,
        "shards": shards,
        "near_dedup": ({"bands": index.bands, "rows": index.rows, "threshold": near.threshold} if index else None),
        "wall_time_s": round(wall, 3),
        "records_per_s": round(read / wall, 1) if wall > 0 else None,
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False), encoding="utf-8")
    console.print(f"read {read}, kept {kept}, dropped {dropped_total} "
                  f"({', '.join(f'{k} {v}' for k, v in manifest['dropped_by'].items()) or 'none'})")
    return manifest


@dataclass
class _Duplicates:
    """Per survivor position: the earlier position it duplicates (or -1), and by which step."""

    of: np.ndarray
    reason: list[str]


def _find_duplicates(keys: np.ndarray, near_positions: np.ndarray, index: Optional[NearDupIndex],
                     exact: bool) -> _Duplicates:
    n = len(keys)
    duplicate_of = np.full(n, -1, dtype=np.int64)
    exact_dup = np.zeros(n, dtype=bool)
    if exact and n:
        _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
        first_of = first[inverse]
        exact_dup = first_of != np.arange(n)
        duplicate_of[exact_dup] = first_of[exact_dup]
    near_dup = np.zeros(n, dtype=bool)
    if index is not None and index.size:
        keeper = index.clusters().keeper
        positions_keeper = near_positions[keeper]
        candidates = (positions_keeper != near_positions) & ~exact_dup[near_positions]
        near_dup[near_positions[candidates]] = True
        duplicate_of[near_positions[candidates]] = positions_keeper[candidates]
    reasons = np.where(exact_dup, EXACT, np.where(near_dup, NEAR, "")).tolist()
    return _Duplicates(duplicate_of, reasons)


def _write_kept(out_dir: Path, survivors: Path, duplicates: _Duplicates, dropped_by: Counter) -> int:
    """Second pass: survivors that are not duplicates go to kept.jsonl, the others to dropped.jsonl."""
    referenced = set(duplicates.of[duplicates.of >= 0].tolist())
    ids: dict[int, str] = {}
    kept = 0
    with open(survivors, encoding="utf-8") as source, \
            open(out_dir / "kept.jsonl", "w", encoding="utf-8") as kept_file, \
            open(out_dir / "dropped.jsonl", "a", encoding="utf-8") as dropped:
        for position, line in enumerate(source):
            survivor = json.loads(line)
            record_id = _record_id(survivor["row"], survivor["where"])
            if position in referenced:
                ids[position] = record_id
            reason = duplicates.reason[position]
            if reason:
                dropped_by[reason] += 1
                original = ids[int(duplicates.of[position])]
                detail = (f"same normalised text as {original}" if reason == EXACT
                          else f"near duplicate of {original} (MinHash cluster, earliest kept)")
                _write(dropped, {"reason": reason, "detail": detail, "where": survivor["where"], "id": record_id,
                                 "record": survivor["row"]})
            else:
                kept += 1
                _write(kept_file, survivor["row"])
    return kept


def _steps(read: int, names: list[str], dropped_by: Counter, modified_by: Counter) -> list[dict[str, Any]]:
    steps = []
    entering = read
    for name in names:
        dropped = dropped_by.get(name, 0)
        steps.append({"step": name, "in": entering, "dropped": dropped, "out": entering - dropped,
                      "modified": modified_by.get(name, 0)})
        entering -= dropped
    return steps
