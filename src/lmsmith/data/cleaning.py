"""The cleaning loop: run the operators over each record, drop exact duplicates, and account for every
record read — kept, or dropped with a reason naming the operator.

Reasons are operator names (`min_length`, or a mapper such as `remove_boilerplate` when it leaves nothing)
plus built-in checks: `empty` (nothing to clean in the first place), `exact_dedup`, and `near_dedup` /
`near_dedup_leak` (MinHash near duplicates within a split / across splits).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Optional, Sequence, Union

import numpy as np

from lmsmith.console import track
from lmsmith.data.minhash import MinHasher, NearDupIndex
from lmsmith.data.ops import Filter, Mapper, Op
from lmsmith.data.records import Conversation, Document, dedup_key
from lmsmith.data.split import SPLITS

if TYPE_CHECKING:
    from lmsmith.data.config import NearDedupConfig

Kind = Literal["corpus", "instructions"]
Record = Union[Document, Conversation]


@dataclass
class Ledger:
    """Where each record of one kind went, per split; `rows` are the dropped records for dropped.jsonl."""

    kind: Kind
    read: Counter = field(default_factory=Counter)
    kept: Counter = field(default_factory=Counter)
    dropped: dict[str, Counter] = field(default_factory=dict)
    modified_by: Counter = field(default_factory=Counter)
    rows: list[dict[str, Any]] = field(default_factory=list)

    def drop(self, record: Record, split: str, reason: str, detail: str) -> None:
        self.dropped.setdefault(reason, Counter())[split] += 1
        row = {"kind": self.kind, "id": record.id, "split": split, "reason": reason, "detail": detail}
        if isinstance(record, Document):
            row.update(text=record.text, noise=record.noise)
        else:
            row.update(task=record.task, messages=record.messages)
        self.rows.append(row)

    def summary(self) -> dict[str, Any]:
        """Totals and per-split counts; read == kept + dropped holds for each and overall."""
        splits = {}
        for split in SPLITS:
            dropped_by = {reason: counts[split] for reason, counts in sorted(self.dropped.items()) if counts[split]}
            splits[split] = {
                "read": self.read[split],
                "kept": self.kept[split],
                "dropped": sum(dropped_by.values()),
                "dropped_by": dropped_by,
            }
        return {
            "read": sum(self.read.values()),
            "kept": sum(self.kept.values()),
            "dropped": sum(sum(counts.values()) for counts in self.dropped.values()),
            "dropped_by": {reason: sum(counts.values()) for reason, counts in sorted(self.dropped.items())},
            "modified_by": dict(sorted(self.modified_by.items())),
            "splits": splits,
        }


def _apply_ops(record: Record, ops: Sequence[Op], ledger: Ledger) -> Optional[tuple[str, str]]:
    """Run the operators in order; (reason, detail) as soon as one drops the record, else None."""
    if record.is_empty():
        return "empty", "no text to begin with"
    for op in ops:
        if isinstance(op, Mapper):
            if record.rewrite(op.map):
                ledger.modified_by[op.name] += 1
                if isinstance(record, Document):
                    record.repaired.update(label for label in op.resolves if label in record.noise)
            if record.is_empty():
                return op.name, "no text left after this operator"
        elif isinstance(op, Filter):
            detail = op.reject(record.content())
            if detail is not None:
                return op.name, detail
    return None


def clean(
    records: Sequence[Record],
    ops: Sequence[Op],
    kind: Kind,
    split_of: dict[str, str],
    exact_dedup: bool,
    ledger: Ledger,
) -> dict[str, list[Record]]:
    """Clean `records` in order (the first of two duplicates is kept) and sort the survivors by split."""
    active = [op for op in ops if op.applies_to(kind)]
    kept: dict[str, list[Record]] = {split: [] for split in SPLITS}
    first_seen: dict[str, str] = {}
    with track(f"cleaning {kind}", total=len(records)) as bar:
        for record in records:
            split = split_of[record.group]
            ledger.read[split] += 1
            verdict = _apply_ops(record, active, ledger)
            if verdict is None and exact_dedup:
                key = dedup_key(record.content())
                if key in first_seen:
                    verdict = ("exact_dedup", f"same normalised text as {first_seen[key]}")
                else:
                    first_seen[key] = record.id
            if verdict is None:
                ledger.kept[split] += 1
                kept[split].append(record)
            else:
                ledger.drop(record, split, *verdict)
            bar.advance()
    return kept


def noise_report(read: Sequence[Document], kept: Sequence[Document]) -> dict[str, Any]:
    """Noise before and after cleaning, from the embedded labels.

    - `rate_before`: labelled documents / documents read;
    - `rate_after`: labelled documents kept / documents kept;
    - `residual_rate_after`: kept documents still carrying a label no operator repaired / kept
      (an HTML page whose tags were stripped is no longer noisy; a near duplicate that survived is).
    """
    kept_ids = {id(doc) for doc in kept}
    labels: dict[str, Counter] = {}
    for doc in read:
        for label in doc.noise:
            counts = labels.setdefault(label, Counter())
            counts["read"] += 1
            if id(doc) not in kept_ids:
                counts["dropped"] += 1
            elif label in doc.repaired:
                counts["repaired"] += 1
            else:
                counts["remaining"] += 1
    return {
        "rate_before": _rate(sum(1 for doc in read if doc.noise), len(read)),
        "rate_after": _rate(sum(1 for doc in kept if doc.noise), len(kept)),
        "residual_rate_after": _rate(sum(1 for doc in kept if doc.unrepaired_noise), len(kept)),
        "labels": {
            label: {key: counts[key] for key in ("read", "dropped", "repaired", "remaining")}
            for label, counts in sorted(labels.items())
        },
    }


def _rate(part: int, whole: int) -> float:
    return round(part / whole, 4) if whole else 0.0


def near_dedup(
    kept: dict[str, list[Record]],
    config: "NearDedupConfig",
    kind: Kind,
    ledger: Ledger,
) -> dict[str, list[Record]]:
    """Remove near duplicates (MinHash LSH, `lmsmith.data.minhash`) across all splits at once.

    Records are ranked train, then val, then test, so the earliest of a cluster is kept: a near copy
    inside one split is dropped as `near_dedup`; a val/test record close to one in an earlier split is
    a leak between splits, dropped as `near_dedup_leak`.
    """
    if not config.enabled or config.apply_to not in ("both", kind):
        return kept
    ranked = [(split, record) for split in SPLITS for record in kept[split]]
    if not ranked:
        return kept
    hasher = MinHasher(config.num_perm, config.unit, config.char_ngram, config.word_ngram)
    with track(f"near-duplicates {kind}", total=len(ranked)) as bar, \
            NearDupIndex(config.threshold, config.num_perm) as index:
        signatures = np.empty((len(ranked), config.num_perm), dtype=np.uint32)
        for position, (_, record) in enumerate(ranked):
            signatures[position] = hasher.signature(record.content())
            bar.advance()
        index.add(signatures)
        keeper = index.clusters().keeper
    survivors: dict[str, list[Record]] = {split: [] for split in SPLITS}
    for position, (split, record) in enumerate(ranked):
        first = int(keeper[position])
        if first == position:
            survivors[split].append(record)
            continue
        first_split, original = ranked[first]
        reason = "near_dedup" if first_split == split else "near_dedup_leak"
        ledger.kept[split] -= 1
        ledger.drop(record, split, reason, f"near duplicate of {original.id} ({first_split})")
    return survivors
