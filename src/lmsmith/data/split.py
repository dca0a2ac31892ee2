"""Deterministic, grouped train/val/test assignment (standard-library `random` only).

Whole groups move together: every record of one company-year (a document, its instructions) lands in
the same split, so nothing a test question is about was seen in training.
"""

from __future__ import annotations

import random
from typing import Iterable, Optional

SPLITS = ("train", "val", "test")


def assign_groups(groups: Iterable[str], ratios: tuple[float, float, float], seed: int) -> dict[str, str]:
    """Group → split name. The groups are sorted, shuffled with `seed`, then cut by `ratios`.

    Depending only on the set of groups (not on record order or on what cleaning later drops) keeps a
    group's split stable when the cleaning operators change.
    """
    ordered = sorted(set(groups))
    random.Random(seed).shuffle(ordered)
    total = len(ordered)
    n_train = min(total, int(ratios[0] * total + 0.5))
    n_val = min(total - n_train, int(ratios[1] * total + 0.5))
    assignment = {}
    for index, group in enumerate(ordered):
        if index < n_train:
            assignment[group] = "train"
        elif index < n_train + n_val:
            assignment[group] = "val"
        else:
            assignment[group] = "test"
    return assignment


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
