"""Deterministic, grouped train/val/test assignment (standard-library `random` only).

Whole groups move together: every record of one company-year (a document, its instructions) lands in
the same split, so nothing a test question is about was seen in training.
"""

from __future__ import annotations

import random
from typing import Iterable

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
