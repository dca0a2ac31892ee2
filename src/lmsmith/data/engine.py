"""The data pipeline, one for the recipe's data stage, `lmsmith data clean` and `lmsmith data split`: sources
→ operators (on a local or Ray executor) → exact and near dedup → split → writers, with every record
accounted for.

Two passes over one stream of `Record`s:
1. Sources stream records in batches; `clean_batch` (run by either executor, unchanged) applies the
   operators and returns each survivor with its exact-dedup key and MinHash signature. Survivors go to
   a work file, signatures to a spill file (`lmsmith.data.minhash`), drops to a second work file, and
   each record's group (the first of the `group_by` fields it has, else the record alone) and, when
   stratifying, its stratum to compact key arrays.
2. With every group seen, groups get their split (`lmsmith.data.split`: cut by the ratios, within each
   stratum when `stratify` names a field); exact keys (numpy `unique`, earliest kept) and the
   near-duplicate index (earliest kept, train before val before test) decide which survivors are
   duplicates; the work files are re-read and handed to the `Writer`.

A drop's `reason` names the step: `read` (malformed, when errors are skipped), `empty` (unless
`drop_empty` is off), an operator (`#2` for its second use), `exact_dedup`, `near_dedup` (a copy within
one split; with `near_leaks_only` it stays and is counted in `Stream.near_kept`), or `near_dedup_leak` (a
val/test record close to one in an earlier split). `Stream` holds the counters, per kind and split;
read = kept + dropped holds at every step. Memory holds the batches in flight and a few 8-byte keys per
record (group, stratum when stratifying, exact-dedup key, positions); signatures and band keys spill to
disk (docs/benchmarks.md has the measured peaks).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
import time
from array import array
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Optional, Protocol

import numpy as np

from lmsmith.console import track
from lmsmith.data.executor import make_executor
from lmsmith.data.io import ReadError, TextUnit, iter_file, list_input_files
from lmsmith.data.minhash import Bander, MinHasher, NearDupIndex, lsh_params
from lmsmith.data.steps import REGISTRY, Mapper, Op, build_op, build_ops, validate_op_spec
from lmsmith.data.record import Kind, Record, RecordFormat, check_row, dedup_key, is_empty, kind_of_format, rewrite_fields
from lmsmith.data.split import NO_STRATUM, SPLITS, group_key, split_of_units, stratum_key
from lmsmith.errors import UserError

OnError = Literal["fail", "skip"]
KINDS: tuple[Kind, ...] = ("corpus", "instructions")
READ, EMPTY, EXACT, NEAR, LEAK = "read", "empty", "exact_dedup", "near_dedup", "near_dedup_leak"


# --------------------------------------------------------------------------------------------- sources


@dataclass
class Source:
    """Records from a file or folder (every format `lmsmith.data.io` reads) or from rows made in memory.

    `kind` fixes what the records are (the recipe reads a corpus and instructions); None takes it from
    each row's format (`lmsmith data clean`)."""

    label: str
    kind: Optional[Kind] = None
    path: Optional[Path] = None
    rows: Optional[Callable[[], Iterable[tuple[str, dict[str, Any]]]]] = None  # (where, row) pairs
    fmt: RecordFormat = "auto"
    text_unit: TextUnit = "block"

    def records(self) -> Iterator[tuple[Record, str]]:
        """(record, where to point a message about it: `path/to/file:line`)."""
        if self.rows is not None:
            for where, row in self.rows():
                yield Record(where, row, source=self.label), where
            return
        assert self.path is not None
        for file, name in list_input_files(self.path):
            for record in iter_file(file, name, self.text_unit):
                yield record, f"{file}:{record.where.rpartition(':')[2]}"


# ------------------------------------------------------------------------------ the workers' unit of work


@dataclass
class Outcome:
    """What the operators made of one record: `reason` is None for a survivor."""

    record: Record
    reason: Optional[str] = None
    detail: str = ""
    modified: list[str] = field(default_factory=list)
    key: int = 0
    near: bool = False
    tags: list[tuple[str, str]] = field(default_factory=list)  # (step, tag): what the operators left but noted


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


def apply_ops(record: Record, ops: list[tuple[str, Op]],
              tags: Optional[list[tuple[str, str]]] = None) -> tuple[Optional[tuple[str, str]], list[str]]:
    """Run the operators on one record in place: ((step, detail) if dropped, else None; steps that
    modified it). Each operator's `tags` on the text it kept are appended to `tags`."""
    row, fmt = record.row, record.fmt
    assert row is not None
    modified = []
    for step, op in ops:
        if not op.applies_to(record.kind):
            continue
        if isinstance(op, Mapper):
            if rewrite_fields(row, fmt, op.map):
                modified.append(step)
            if is_empty(row, fmt):
                return (step, "no text left after this operator"), modified
        else:
            detail = op.reject(record.content())
            if detail is not None:
                return (step, detail), modified
        if tags is not None and type(op).tags is not Op.tags:  # most operators note nothing: skip the join
            tags.extend((step, tag) for tag in op.tags(record.content()))
    return None, modified


# Workers build the operators once per pipeline, not once per batch.
_PREPARED: dict[str, tuple[list[tuple[str, Op]], Optional[MinHasher], Optional[Bander]]] = {}


def _prepare(payload: dict[str, Any]):
    cache_key = json.dumps(payload, sort_keys=True)
    if cache_key not in _PREPARED:
        ops = list(zip(step_names(payload["ops"]), build_ops(payload["ops"])))
        hasher = bander = None
        near = payload["near_dedup"]
        if near["enabled"]:
            hasher = MinHasher(near["num_perm"], near["unit"], near["char_ngram"], near["word_ngram"])
            bander = Bander(*lsh_params(near["threshold"], near["num_perm"]))
        _PREPARED.clear()
        _PREPARED[cache_key] = (ops, hasher, bander)
    return _PREPARED[cache_key]


def clean_batch(payload: dict[str, Any], records: list[Record]) -> BatchResult:
    """The unit of work both executors run: operators, exact keys and signatures for one batch."""
    ops, hasher, bander = _prepare(payload)
    near_target = payload["near_dedup"]["apply_to"]
    outcomes, signatures = [], []
    for record in records:
        if record.error is not None:
            outcomes.append(Outcome(record, READ, record.error))
            continue
        if payload["drop_empty"] and is_empty(record.row, record.fmt):
            outcomes.append(Outcome(record, EMPTY, "no text to begin with"))
            continue
        tags: list[tuple[str, str]] = []
        verdict, modified = apply_ops(record, ops, tags)
        if verdict is not None:
            outcomes.append(Outcome(record, verdict[0], verdict[1], modified))
            continue
        text = record.content()
        outcome = Outcome(record, None, "", modified, key=int(dedup_key(text)[:16], 16), tags=tags)
        if hasher is not None and near_target in ("both", record.kind):
            outcome.near = True
            signatures.append(hasher.signature(text))
        outcomes.append(outcome)
    num_perm = payload["near_dedup"]["num_perm"]
    stacked = np.stack(signatures) if signatures else np.empty((0, num_perm), dtype=np.uint32)
    keys = bander.keys(stacked) if bander is not None else np.empty((0, 0), dtype=np.uint64)
    return BatchResult(outcomes, stacked, keys)


# ------------------------------------------------------------------------------------------- the stream


@dataclass(frozen=True)
class Original:
    """The record a duplicate was dropped for: its id, where it was read and its split."""

    id: str
    where: str
    split: str


class Writer(Protocol):
    """Where pass 2 sends each record: kept (with its split, the steps that rewrote it and the tags the
    operators gave it) or dropped (with the step and why, and for a duplicate the record it duplicates)."""

    def keep(self, record: Record, split: str, modified: list[str], tags: list[str]) -> None: ...

    def drop(self, record: Record, split: str, reason: str, detail: str, modified: list[str],
             original: Optional[Original]) -> None: ...


@dataclass
class Stream:
    """The counters of one run, by kind: what each step read, dropped and modified, per split."""

    steps: list[str]
    read: Counter = field(default_factory=Counter)  # (kind, split)
    kept: Counter = field(default_factory=Counter)  # (kind, split)
    dropped: Counter = field(default_factory=Counter)  # (kind, split, reason)
    modified: Counter = field(default_factory=Counter)  # (kind, step)
    tags: Counter = field(default_factory=Counter)  # (kind, step, tag), over the records kept
    near_kept: Counter = field(default_factory=Counter)  # (kind, split): near duplicates left in (leaks only)
    shards: list[dict[str, int]] = field(default_factory=list)
    near_dedup: dict[str, Any] = field(default_factory=dict)
    groups: dict[str, int] = field(default_factory=dict)  # distinct groups per split
    wall_time_s: float = 0.0
    fitted: dict[str, dict[str, Any]] = field(default_factory=dict)  # step → the spec fields its fit set

    def kinds(self) -> list[Kind]:
        return [kind for kind in KINDS if any(k == kind for k, _ in self.read)]

    def total(self, counter: Counter, kind: Optional[Kind] = None) -> int:
        return sum(count for key, count in counter.items() if kind is None or key[0] == kind)

    def dropped_by(self, kind: Optional[Kind] = None, split: Optional[str] = None) -> dict[str, int]:
        counts: Counter = Counter()
        for (k, s, reason), count in self.dropped.items():
            if (kind is None or k == kind) and (split is None or s == split):
                counts[reason] += count
        return {reason: counts[reason] for reason in self.steps if counts[reason]}

    def step_table(self, kind: Optional[Kind] = None) -> list[dict[str, Any]]:
        """in / dropped / out / modified per step, in pipeline order."""
        entering = self.total(self.read, kind)
        dropped = self.dropped_by(kind)
        table = []
        for step in self.steps:
            out = entering - dropped.get(step, 0)
            modified = sum(count for (k, name), count in self.modified.items()
                           if name == step and (kind is None or k == kind))
            table.append({"step": step, "in": entering, "dropped": dropped.get(step, 0), "out": out,
                          "modified": modified})
            entering = out
        return table

    def check(self) -> None:
        for kind in [None, *self.kinds()]:
            table = self.step_table(kind)
            kept = self.total(self.kept, kind)
            if table and table[-1]["out"] != kept:
                raise AssertionError(f"accounting does not reconcile for {kind or 'all'}: "
                                     f"{self.total(self.read, kind)} read, {kept} kept")


@dataclass
class StreamOptions:
    """How the stream runs: the operators, dedup, batching, executor, what happens to a bad record, and
    how records are split (the defaults are the data stage's; `lmsmith data split` sets the last four)."""

    ops: list[dict[str, Any]]
    exact_dedup: bool
    near_dedup: dict[str, Any]
    batch_size: int = 256
    shard_bytes: int = 1 << 30
    executor: str = "local"
    workers: int = 1
    ray_address: Optional[str] = None
    on_error: OnError = "fail"
    ratios: tuple[float, float, float] = (1.0, 0.0, 0.0)
    split_seed: int = 0
    fit_sample: int = 2000  # records read from each source to fit the fitted operators on
    group_by: tuple[str, ...] = ("group", "id")  # a record's split follows the first of these fields it has
    stratify: Optional[str] = None  # each value of this field is cut by `ratios` on its own
    near_leaks_only: bool = False  # near dedup drops copies across splits only; those within one stay, counted
    drop_empty: bool = True  # False: a record with no text to begin with goes on like any other


def _checked(source: Source, on_error: OnError,
             observe: Optional[Callable[[Record], None]]) -> Iterator[tuple[Record, int]]:
    """The source's records, each checked against its kind; a bad one raises (fail) or carries `error`."""
    for record, location in source.records():
        if record.error is None:
            assert record.row is not None
            problem, record.fmt = check_row(record.row, source.fmt, source.kind)
            record.error = problem
            record.kind = source.kind or kind_of_format(record.fmt)
        else:
            record.kind = source.kind or "corpus"
        if record.error is not None:
            record.error = f"{location}: {record.error}"
            if on_error == "fail":
                raise ReadError(record.error)
        if observe is not None:
            observe(record)
        yield record, record.size


def _shards(records: Iterator[tuple[Record, int]], batch_size: int,
            shard_bytes: int) -> Iterator[tuple[Iterator[list[Record]], dict[str, int]]]:
    """(batches, stats) per shard of about `shard_bytes` input; `stats` fills as it streams."""
    pending: Optional[tuple[Record, int]] = next(records, None)
    index = 0
    while pending is not None:
        stats = {"index": index, "records": 0, "bytes": 0}

        def batches(first: tuple[Record, int], stats: dict[str, int] = stats) -> Iterator[list[Record]]:
            nonlocal pending
            batch: list[Record] = []
            current: Optional[tuple[Record, int]] = first
            while current is not None:
                record, size = current
                batch.append(record)
                stats["records"] += 1
                stats["bytes"] += size
                current = next(records, None)
                if len(batch) >= batch_size or current is None or stats["bytes"] >= shard_bytes:
                    yield batch
                    batch = []
                if stats["bytes"] >= shard_bytes:
                    break
            pending = current

        first, pending = pending, None
        yield batches(first), stats
        index += 1


def _dump(handle: Any, record: Record, position: int, extra: dict[str, Any]) -> None:
    handle.write(json.dumps({"at": position, "where": record.where, "kind": record.kind, "fmt": record.fmt,
                             "source": record.source, "row": record.row, "raw": record.raw, **extra},
                            ensure_ascii=False) + "\n")


def _load(line: str) -> tuple[Record, dict[str, Any]]:
    data = json.loads(line)
    record = Record(data["where"], data["row"], raw=data["raw"], kind=data["kind"], fmt=data["fmt"],
                    source=data["source"])
    return record, data


def run_stream(sources: list[Source], options: StreamOptions, writer: Writer, work: Path,
               label: str = "cleaning", observe: Optional[Callable[[Record], None]] = None) -> Stream:
    """Run the pipeline over `sources` in order; every record ends in `writer.keep` or `writer.drop`.
    `observe` sees each record as read, before any operator touches it (the quality report's sample)."""
    work.mkdir(parents=True, exist_ok=True)
    names = step_names(options.ops)
    splits = options.ratios[0] < 1
    stream = Stream(steps=[READ, EMPTY, *names, EXACT, NEAR, *([LEAK] if splits else [])])
    options, stream.fitted = fit_ops(sources, options, work.parent / "fitted")
    payload = {"ops": options.ops, "near_dedup": options.near_dedup, "drop_empty": options.drop_empty}
    near = options.near_dedup
    started = time.perf_counter()
    groups = array("Q")  # per record read
    strata = array("Q") if options.stratify else None  # per record read, when stratifying
    survivor_at = {kind: array("q") for kind in KINDS}  # read position of each survivor, by kind
    exact_keys = {kind: array("Q") for kind in KINDS}
    near_at = {kind: array("q") for kind in KINDS}  # survivor index (in its kind) of each signature
    indexes = {kind: NearDupIndex(near["threshold"], near["num_perm"], workdir=work) for kind in KINDS} \
        if near["enabled"] else {}
    try:
        with open(work / "survivors.jsonl", "w", encoding="utf-8") as survivors, \
                open(work / "drops.jsonl", "w", encoding="utf-8") as drops, \
                make_executor(options.executor, options.workers, options.ray_address) as pool, \
                track(f"{label} ({options.executor}, {options.workers} worker{'s' * (options.workers > 1)})",
                      total=None) as bar:
            for source in sources:
                checked = _checked(source, options.on_error, observe)
                for batches, stats in _shards(checked, options.batch_size, options.shard_bytes):
                    for result in pool.map_batches(clean_batch, payload, batches):
                        for outcome in result.outcomes:
                            record = outcome.record
                            position = len(groups)
                            groups.append(group_key(record.group_by(options.group_by)))
                            if strata is not None:
                                strata.append(stratum_key(record.value_of(options.stratify)))
                            if outcome.reason is not None:
                                _dump(drops, record, position, {"reason": outcome.reason, "detail": outcome.detail,
                                                                "modified": outcome.modified})
                                continue
                            kind = record.kind
                            if outcome.near:
                                near_at[kind].append(len(survivor_at[kind]))
                            survivor_at[kind].append(position)
                            exact_keys[kind].append(outcome.key)
                            _dump(survivors, record, position, {"modified": outcome.modified, "tags": outcome.tags})
                        near_kinds = np.array([o.record.kind for o in result.outcomes if o.near])
                        for kind, index in indexes.items():
                            rows = near_kinds == kind
                            if rows.any():
                                index.add(result.signatures[rows], result.band_keys[rows])
                        bar.advance(len(result.outcomes))
                    stream.shards.append(dict(stats))
        split_index = _split_index(_keys(groups), None if strata is None else _keys(strata), options, stream)
        duplicates = {kind: _duplicates(survivor_at[kind], exact_keys[kind], near_at[kind], indexes.get(kind),
                                        split_index, options) for kind in KINDS}
        _write(work, stream, writer, split_index, duplicates)
        if indexes:
            stream.near_dedup = {"bands": indexes["corpus"].bands, "rows": indexes["corpus"].rows,
                                 "threshold": near["threshold"], "apply_to": near["apply_to"]}
    finally:
        for index in indexes.values():
            index.close()
        shutil.rmtree(work, ignore_errors=True)
    stream.wall_time_s = round(time.perf_counter() - started, 3)
    stream.check()
    return stream


def _keys(keys: array) -> np.ndarray:
    return np.frombuffer(keys, dtype=np.uint64) if len(keys) else np.empty(0, dtype=np.uint64)


class NoRecordHasField(UserError):
    """`stratify` names a field no record has; raised after reading, before anything is written."""

    def __init__(self, name: str):
        super().__init__(f"{name}: no record has this field")


def _split_index(groups: np.ndarray, strata: Optional[np.ndarray], options: StreamOptions,
                 stream: Stream) -> np.ndarray:
    """The split (0 train, 1 val, 2 test) of every record read, from its group (and its stratum)."""
    if strata is not None and not (strata != NO_STRATUM).any():
        assert options.stratify is not None
        raise NoRecordHasField(options.stratify)
    distinct, index = split_of_units(groups, strata, options.ratios, options.split_seed)
    stream.groups = {split: int(count) for split, count in zip(SPLITS, np.bincount(index, minlength=3))}
    return index[np.searchsorted(distinct, groups)] if len(groups) else np.empty(0, dtype=np.int8)


@dataclass
class _Duplicates:
    """Per survivor of one kind: why it goes (an index into `REASONS`, 0 when kept) and the survivor it
    duplicates (or -1). One byte and eight a survivor: the arrays span the whole input."""

    NEAR_KEPT = 4  # a near duplicate within its split, kept and counted (near_leaks_only)
    REASONS = ("", EXACT, NEAR, LEAK, "")
    code: np.ndarray
    of: np.ndarray

    def reason(self, at: int) -> str:
        return self.REASONS[int(self.code[at])]

    def near_kept(self, at: int) -> bool:
        return int(self.code[at]) == self.NEAR_KEPT


def _duplicates(survivor_at: array, keys: array, near_at: array, index: Optional[NearDupIndex],
                split_index: np.ndarray, options: StreamOptions) -> _Duplicates:
    """Exact keys (the first read is kept), then near-duplicate clusters: in each, the survivor that ranks
    first is kept (train before val before test when splitting, then reading order), so a near copy across
    splits leaves val/test (and, with `near_leaks_only`, a copy within the keeper's split stays); an exact
    duplicate never keeps a cluster."""
    n = len(survivor_at)
    positions = np.frombuffer(survivor_at, dtype=np.int64) if n else np.empty(0, dtype=np.int64)
    split = split_index[positions].astype(np.int64)
    rank = split * max(n, 1) + np.arange(n, dtype=np.int64)
    duplicate_of = np.full(n, -1, dtype=np.int64)
    exact_dup = np.zeros(n, dtype=bool)
    if options.exact_dedup and n:
        _, first, inverse = np.unique(np.frombuffer(keys, dtype=np.uint64), return_index=True, return_inverse=True)
        first_of = first[inverse]
        exact_dup = first_of != np.arange(n)
        duplicate_of[exact_dup] = first_of[exact_dup]
    code = exact_dup.astype(np.int8)  # 1: EXACT
    if index is not None and index.size:
        rows = np.frombuffer(near_at, dtype=np.int64)
        near_rank = rank[rows] + exact_dup[rows] * (3 * max(n, 1) * max(n, 1))
        keeper = rows[index.clusters(near_rank).keeper]
        candidates = (keeper != rows) & ~exact_dup[rows]
        dropped, kept_by = rows[candidates], keeper[candidates]
        within = split[dropped] == split[kept_by]
        if options.near_leaks_only:
            code[dropped[within]] = _Duplicates.NEAR_KEPT
            dropped, kept_by, within = dropped[~within], kept_by[~within], within[~within]
        duplicate_of[dropped] = kept_by
        code[dropped] = np.where(within, 2, 3)  # NEAR, LEAK
    return _Duplicates(code, duplicate_of)


def _write(work: Path, stream: Stream, writer: Writer, split_index: np.ndarray,
           duplicates: dict[Kind, _Duplicates]) -> None:
    """Pass 2: the drops of pass 1 in reading order, then every survivor, kept or dropped as a duplicate."""
    with open(work / "drops.jsonl", encoding="utf-8") as drops:
        for line in drops:
            record, data = _load(line)
            split = SPLITS[int(split_index[data["at"]])]
            stream.read[(record.kind, split)] += 1
            stream.dropped[(record.kind, split, data["reason"])] += 1
            stream.modified.update((record.kind, step) for step in data["modified"])
            writer.drop(record, split, data["reason"], data["detail"], data["modified"], None)
    referenced = {kind: set(dups.of[dups.of >= 0].tolist()) for kind, dups in duplicates.items()}
    originals: dict[tuple[str, int], Original] = {}
    with open(work / "survivors.jsonl", encoding="utf-8") as survivors:
        seen: Counter = Counter()
        for line in survivors:
            record, data = _load(line)
            if seen[record.kind] in referenced[record.kind]:
                originals[(record.kind, seen[record.kind])] = Original(record.id, record.where,
                                                                       SPLITS[int(split_index[data["at"]])])
            seen[record.kind] += 1
    with open(work / "survivors.jsonl", encoding="utf-8") as survivors:
        seen = Counter()
        for line in survivors:
            record, data = _load(line)
            kind, at = record.kind, seen[record.kind]
            seen[kind] += 1
            split = SPLITS[int(split_index[data["at"]])]
            stream.read[(kind, split)] += 1
            stream.modified.update((kind, step) for step in data["modified"])
            reason = duplicates[kind].reason(at)
            if not reason:
                stream.kept[(kind, split)] += 1
                if duplicates[kind].near_kept(at):
                    stream.near_kept[(kind, split)] += 1
                stream.tags.update((kind, step, tag) for step, tag in data["tags"])
                writer.keep(record, split, data["modified"], sorted({tag for _, tag in data["tags"]}))
                continue
            original = originals[(kind, int(duplicates[kind].of[at]))]
            detail = (f"same normalised text as {original.id}" if reason == EXACT else
                      f"near duplicate of {original.id} (MinHash cluster, earliest kept)" if reason == NEAR else
                      f"near duplicate of {original.id}, which is in an earlier split")
            stream.dropped[(kind, split, reason)] += 1
            writer.drop(record, split, reason, detail, data["modified"], original)


def stream_options(config: Any, on_error: OnError = "fail", ratios: tuple[float, float, float] = (1.0, 0.0, 0.0),
                   split_seed: int = 0) -> StreamOptions:
    """The options of a `StreamConfig` (the recipe's `data` block or a `data clean` pipeline)."""
    return StreamOptions(
        ops=config.ops, exact_dedup=config.exact_dedup, near_dedup=config.near_dedup.model_dump(mode="json"),
        batch_size=config.batch_size, shard_bytes=config.shard_bytes, executor=config.executor,
        workers=config.workers, ray_address=config.ray_address, on_error=on_error, ratios=ratios,
        split_seed=split_seed, fit_sample=config.fit_sample,
    )


# ------------------------------------------------------------------------------------ fitted operators


def _copy(record: Record) -> Record:
    return dataclasses.replace(record, row=copy.deepcopy(record.row))


def fit_sample(sources: list[Source], options: StreamOptions) -> list[Record]:
    """The first `fit_sample` records of each source, checked as the stream checks them (a bad one stops
    the run under `on_error: fail`, is left out under `skip`), without those empty to begin with: the same
    records whatever the executor."""
    sample: list[Record] = []
    for source in sources:
        for taken, (record, _) in enumerate(_checked(source, options.on_error, None)):
            if taken >= options.fit_sample:
                break
            if record.error is None and record.row is not None and not is_empty(record.row, record.fmt):
                sample.append(record)
    return sample


def fit_ops(sources: list[Source], options: StreamOptions,
            fit_dir: Path) -> tuple[StreamOptions, dict[str, dict[str, Any]]]:
    """Fit the operators that learn part of their spec (`Op.fits`, and `needs_fit` for this spec), in
    pipeline order, on `fit_sample` copies: each sees the texts as they reach it in the stream (a record a
    rule drops earlier, as it was when dropped) and `rule_noisy`, whether the rule chain (every operator
    that does not fit: the rules) drops or empties it. Returns the options with the fitted specs (what
    the workers build) and {step: fields set}; files a fit writes go to `fit_dir`."""
    if not any(REGISTRY[spec["op"]].fits for spec in options.ops):  # no operator built for nothing
        return options, {}
    specs = [validate_op_spec(spec) for spec in options.ops]
    ops = [build_op(spec) for spec in specs]
    if not any(op.fits and op.needs_fit() for op in ops):
        return options, {}
    names = step_names(specs)
    sample = fit_sample(sources, options)
    rules = [(name, op) for name, op in zip(names, ops) if not op.fits]
    rule_noisy = [apply_ops(_copy(record), rules)[0] is not None for record in sample]
    fitted: dict[str, dict[str, Any]] = {}
    for i, op in enumerate(ops):
        if not (op.fits and op.needs_fit()):
            continue
        # Filters rewrite nothing, so only the mappers and the rules decide the text (a model filter
        # before this one is not run twice).
        before = [(name, earlier) for name, earlier in zip(names[:i], ops[:i]) if not earlier.fits]
        texts, noisy = [], []
        for record, flagged in zip(sample, rule_noisy):
            if not op.applies_to(record.kind):
                continue
            seen = _copy(record)
            apply_ops(seen, before)
            text = seen.content()
            if text.strip():
                texts.append(text)
                noisy.append(flagged)
        fit_dir.mkdir(parents=True, exist_ok=True)
        fields = op.fit(texts, noisy, fit_dir.resolve())
        specs[i] = validate_op_spec({**specs[i], **fields})
        ops[i] = build_op(specs[i])
        fitted[names[i]] = {key: value for key, value in fields.items() if value is not None} | {
            "sample": len(texts), "rule_noisy": sum(noisy)}
    return dataclasses.replace(options, ops=specs), fitted
