"""Train/val/test: the grouped assignment the data pipeline (`lmsmith.data.engine`) splits by (numpy's
seeded permutation over hashed group keys, cut by the ratios, optionally within each stratum), and
`lmsmith data split`: that pipeline with no operators and other ends (`run_split`: each row written
back as read to OUT/{train,val,test}.jsonl, the counts to split_report.json).

Whole groups move together: every record of one company-year (a document, its instructions) lands in
the same split, so nothing a test question is about was seen in training. `data split` groups by the
field it is given (a record without it stands alone), may cut each value of a `--stratify` field by the
ratios on its own, and removes only near duplicates across splits (the copy in the later split goes:
train before val before test); near duplicates within one split stay and are counted. Nothing else is
dropped, so read = written + leaks_removed.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, IO, Any, Optional

import numpy as np

from lmsmith.console import console
from lmsmith.errors import UserError

if TYPE_CHECKING:
    from lmsmith.data.config import NearDedupConfig
    from lmsmith.data.engine import Original
    from lmsmith.data.record import Record

SPLITS = ("train", "val", "test")
NO_STRATUM = 0  # the stratum key of a record without the field (a value's hash is 0 once in 2^64)


def group_key(group: str) -> int:
    """A group's 64-bit key: what the assignment sorts and shuffles (8 bytes a group, however long the name)."""
    return int.from_bytes(hashlib.blake2b(group.encode("utf-8"), digest_size=8).digest(), "little")


def stratum_key(value: Optional[str]) -> int:
    return NO_STRATUM if value is None else group_key(value)


def split_of_keys(keys: np.ndarray, ratios: tuple[float, float, float], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(the distinct group keys sorted, the split index of each: 0 train, 1 val, 2 test).

    The distinct keys are shuffled with `seed` and cut by `ratios`, so the split sizes are exact and
    depend only on the set of groups (not on record order or on what cleaning later drops): a group's
    split stays put when the cleaning operators change."""
    distinct = np.unique(np.asarray(keys, dtype=np.uint64))
    total = len(distinct)
    order = np.random.default_rng(seed).permutation(total)
    n_train = min(total, int(ratios[0] * total + 0.5))
    n_val = min(total - n_train, int(ratios[1] * total + 0.5))
    index = np.full(total, 2, dtype=np.int8)
    index[order[:n_train]] = 0
    index[order[n_train:n_train + n_val]] = 1
    return distinct, index


def split_of_units(units: np.ndarray, strata: Optional[np.ndarray], ratios: tuple[float, float, float],
                   seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`split_of_keys` over the units (group keys, one per record), or with `strata` (a stratum key per
    record) over each stratum's units on its own, so that every stratum keeps its share in every split.

    A unit takes the stratum of its first record: a group whose records disagree still moves whole."""
    if strata is None:
        return split_of_keys(units, ratios, seed)
    distinct, first = np.unique(units, return_index=True)
    unit_strata = strata[first]
    order = np.lexsort((distinct, unit_strata))  # by stratum, then by unit key
    index = np.empty(len(distinct), dtype=np.int8)
    for members in np.split(order, np.flatnonzero(np.diff(unit_strata[order])) + 1):
        index[members] = split_of_keys(distinct[members], ratios, seed)[1]
    return distinct, index


# ------------------------------------------------------------------------------------- lmsmith data split


class _SplitWriter:
    """The stream's end for `data split`: OUT/{split}.jsonl, each row as read, and what the report counts
    (the strata kept per split, the leaks by pair). The files open at the first record handed over, after
    the stream has read everything, so a run stopped by a bad row or an unknown field writes nothing."""

    def __init__(self, out_dir: Path, stratify: Optional[str], examples: int):
        self.out_dir, self.stratify, self.examples = out_dir, stratify, examples
        self.files: dict[str, IO[str]] = {}
        self.strata: dict[str, Counter] = {split: Counter() for split in SPLITS}  # a record without it: "None"
        self.leaks: Counter = Counter()  # "train->val": the copy kept in train, the one in val removed
        self.leak_examples: list[dict[str, Any]] = []

    def open(self) -> None:
        if not self.files:
            self.files = {split: open(self.out_dir / f"{split}.jsonl", "w", encoding="utf-8") for split in SPLITS}

    def keep(self, record: "Record", split: str, modified: list[str], tags: list[str]) -> None:
        self.open()
        self.files[split].write(json.dumps(record.row, ensure_ascii=False) + "\n")
        if self.stratify:
            self.strata[split][str(record.value_of(self.stratify))] += 1

    def drop(self, record: "Record", split: str, reason: str, detail: str, modified: list[str],
             original: Optional["Original"]) -> None:
        # No operators, no exact dedup, empty records kept, a bad row stops the run: a leak is all that goes.
        if original is None or original.split == split:
            raise AssertionError(f"data split drops only near-duplicate leaks, got {reason}: {detail}")
        self.leaks[f"{original.split}->{split}"] += 1
        if len(self.leak_examples) < self.examples:
            self.leak_examples.append({"split": split, "where": record.where, "id": record.id,
                                       "leaks_from": original.split, "from_where": original.where,
                                       "from_id": original.id})

    def close(self) -> None:
        for handle in self.files.values():
            handle.close()


def run_split(
    input_path: str | Path,
    out_dir: str | Path,
    ratios: tuple[float, float, float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    stratify: Optional[str] = None,
    group: Optional[str] = None,
    near: Optional["NearDedupConfig"] = None,
    examples: int = 5,
) -> dict[str, Any]:
    """Write `out_dir`/{train,val,test}.jsonl and split_report.json; returns the report."""
    if any(r < 0 for r in ratios) or abs(sum(ratios) - 1) > 1e-6:
        raise UserError(f"--ratios: must be non-negative and sum to 1, got {list(ratios)}")
    from lmsmith.data.config import NearDedupConfig
    from lmsmith.data.engine import KINDS, LEAK, NoRecordHasField, Source, StreamOptions, run_stream  # it imports us

    near = near or NearDedupConfig(apply_to="both")
    input_path, out_dir = Path(input_path), Path(out_dir)
    options = StreamOptions(ops=[], exact_dedup=False, near_dedup=near.model_dump(mode="json"), ratios=ratios,
                            split_seed=seed, group_by=(group,) if group else (), stratify=stratify,
                            near_leaks_only=True, drop_empty=False)
    writer = _SplitWriter(out_dir, stratify, examples)
    try:
        stream = run_stream([Source(str(input_path), path=input_path)], options, writer, out_dir / ".work",
                            label="splitting")
        writer.open()  # an input with no records still gets its three (empty) files
    except NoRecordHasField as exc:
        raise UserError(f"--stratify {exc}") from None
    finally:
        writer.close()
    written = {split: sum(stream.kept[(kind, split)] for kind in KINDS) for split in SPLITS}
    leaks = stream.dropped_by().get(LEAK, 0)
    report = {
        "input": str(input_path),
        "ratios": list(ratios),
        "seed": seed,
        "stratify": stratify,
        "group": group,
        "read": stream.total(stream.read),
        "written": written,
        "leaks_removed": leaks,
        "leaks_by_pair": dict(sorted(writer.leaks.items())),
        "near_duplicates_within_split": {split: sum(stream.near_kept[(kind, split)] for kind in KINDS)
                                         for split in SPLITS},
        "leak_examples": writer.leak_examples,
        "near_dedup": near.model_dump(mode="json"),
    }
    if stratify:
        report["strata"] = {split: dict(sorted(writer.strata[split].items())) for split in SPLITS}
    (out_dir / "split_report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    console.print(f"split {report['read']} records: " + ", ".join(f"{s} {written[s]}" for s in SPLITS)
                  + f"; {leaks} near-duplicate leaks removed")
    return report
