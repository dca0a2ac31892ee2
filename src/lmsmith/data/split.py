"""Deterministic, grouped train/val/test assignment (numpy's seeded permutation over hashed group keys).

Whole groups move together: every record of one company-year (a document, its instructions) lands in
the same split, so nothing a test question is about was seen in training.
"""

from __future__ import annotations

import hashlib
from typing import Iterable, Optional

import numpy as np

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
