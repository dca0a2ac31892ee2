"""Train/val/test: the grouped assignment both the data stage and `lmsmith data split` use (numpy's seeded
permutation over hashed group keys), and `lmsmith data split` itself (`run_split`: a cleaned input cut
into split files, optionally stratified, with near-duplicate leaks between splits removed by
`lmsmith.data.minhash`; it holds the rows in memory, since it runs after cleaning on the kept records).

Whole groups move together: every record of one company-year (a document, its instructions) lands in
the same split, so nothing a test question is about was seen in training.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Optional

import numpy as np

from lmsmith.console import console, track
from lmsmith.data.io import full_where, iter_records
from lmsmith.data.minhash import MinHasher, NearDupIndex
from lmsmith.data.record import check_row, text_fields
from lmsmith.errors import UserError

if TYPE_CHECKING:
    from lmsmith.data.config import NearDedupConfig

SPLITS = ("train", "val", "test")


def group_key(group: str) -> int:
    """A group's 64-bit key: what the assignment sorts and shuffles (8 bytes a group, however long the name)."""
    return int.from_bytes(hashlib.blake2b(group.encode("utf-8"), digest_size=8).digest(), "little")


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


def assign_groups(groups: Iterable[str], ratios: tuple[float, float, float], seed: int) -> dict[str, str]:
    """Group → split name (`split_of_keys` over the groups' keys)."""
    names = sorted(set(groups))
    keys = np.array([group_key(name) for name in names], dtype=np.uint64)
    distinct, index = split_of_keys(keys, ratios, seed)
    position = np.searchsorted(distinct, keys)
    return {name: SPLITS[int(index[at])] for name, at in zip(names, position)}


def assign_stratified(
    units: dict[str, str], ratios: tuple[float, float, float], seed: int
) -> dict[str, str]:
    """Unit (a record or group key) → split, cutting each stratum (unit → stratum value) by `ratios`
    on its own, so every category keeps its share in every split."""
    strata: dict[str, list[str]] = {}
    for unit, stratum in units.items():
        strata.setdefault(stratum, []).append(unit)
    assignment: dict[str, str] = {}
    for stratum in sorted(strata):
        assignment.update(assign_groups(strata[stratum], ratios, seed))
    return assignment


def split_rows(
    rows: list[dict],
    ratios: tuple[float, float, float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    stratify: Optional[str] = None,
    group: Optional[str] = None,
) -> list[str]:
    """The split of each row. Rows sharing the value of `group` stay together; with `stratify`, each
    value of that field is split by `ratios` separately. Deterministic for a given seed and row set."""
    units: dict[str, str] = {}
    unit_of = []
    for index, row in enumerate(rows):
        unit = f"g:{row.get(group)}" if group and row.get(group) is not None else f"r:{index}"
        unit_of.append(unit)
        units.setdefault(unit, str(row.get(stratify)) if stratify else "")
    assignment = assign_stratified(units, ratios, seed)
    return [assignment[unit] for unit in unit_of]


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

    near = near or NearDedupConfig(apply_to="both")
    out_dir = Path(out_dir)
    rows: list[dict[str, Any]] = []
    texts: list[str] = []
    for raw in iter_records(Path(input_path)):
        if raw.error is not None:
            raise UserError(f"{full_where(Path(input_path), raw.where)}: {raw.error}")
        problem, fmt = check_row(raw.row, "auto")
        if problem is not None:
            raise UserError(f"{full_where(Path(input_path), raw.where)}: {problem}")
        rows.append(raw.row)
        texts.append("\n".join(text_fields(raw.row, fmt)))
    if stratify and not any(stratify in row for row in rows):
        raise UserError(f"--stratify {stratify}: no record has this field")
    splits = split_rows(rows, ratios, seed, stratify, group)

    leaks: list[dict[str, Any]] = []
    within: Counter = Counter()
    removed = set()
    if near.enabled and rows:
        order = sorted(range(len(rows)), key=lambda i: (SPLITS.index(splits[i]), i))
        hasher = MinHasher(near.num_perm, near.unit, near.char_ngram, near.word_ngram)
        with NearDupIndex(near.threshold, near.num_perm) as index, track("leak check", total=len(order)) as bar:
            for start in range(0, len(order), 1024):
                chunk = order[start:start + 1024]
                index.add(hasher.signatures([texts[i] for i in chunk]))
                bar.advance(len(chunk))
            keeper = index.clusters().keeper
        for rank, first_rank in enumerate(keeper.tolist()):
            if first_rank == rank:
                continue
            record, first = order[rank], order[first_rank]
            if splits[record] == splits[first]:
                within[splits[record]] += 1
                continue
            removed.add(record)
            leaks.append({"split": splits[record], "index": record, "id": rows[record].get("id"),
                          "leaks_from": splits[first], "from_index": first, "from_id": rows[first].get("id")})

    out_dir.mkdir(parents=True, exist_ok=True)
    counts = {split: 0 for split in SPLITS}
    handles = {split: open(out_dir / f"{split}.jsonl", "w", encoding="utf-8") for split in SPLITS}
    try:
        for index, row in enumerate(rows):
            if index not in removed:
                handles[splits[index]].write(json.dumps(row, ensure_ascii=False) + "\n")
                counts[splits[index]] += 1
    finally:
        for handle in handles.values():
            handle.close()
    leak_counts = Counter(f"{leak['leaks_from']}->{leak['split']}" for leak in leaks)
    report = {
        "input": str(input_path),
        "ratios": list(ratios),
        "seed": seed,
        "stratify": stratify,
        "group": group,
        "read": len(rows),
        "written": counts,
        "leaks_removed": len(leaks),
        "leaks_by_pair": dict(sorted(leak_counts.items())),
        "near_duplicates_within_split": {split: within[split] for split in SPLITS},
        "leak_examples": leaks[:examples],
        "near_dedup": near.model_dump(mode="json"),
    }
    if stratify:
        report["strata"] = {
            split: dict(sorted(Counter(str(rows[i].get(stratify)) for i in range(len(rows))
                                       if splits[i] == split and i not in removed).items()))
            for split in SPLITS
        }
    (out_dir / "split_report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    console.print(f"split {len(rows)} records: " + ", ".join(f"{s} {counts[s]}" for s in SPLITS)
                  + f"; {len(leaks)} near-duplicate leaks removed")
    return report
