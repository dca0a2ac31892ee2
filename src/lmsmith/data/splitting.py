"""`lmsmith data split`: a cleaned jsonl (or any readable input) into train/val/test files by ratio,
deterministic, optionally stratified by a field and grouped by another, with near-duplicate leaks
between splits reported and removed (a val/test record close to an earlier split's is dropped).

Uses `lmsmith.data.split` for the assignment and `lmsmith.data.minhash` for the leak check. The rows
are held in memory: this runs after cleaning, on the kept records.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any, Optional

from lmsmith.console import console, track
from lmsmith.data.config import NearDedupConfig
from lmsmith.data.io import full_where, iter_records
from lmsmith.data.record import check_row, text_fields
from lmsmith.data.minhash import MinHasher, NearDupIndex
from lmsmith.data.split import SPLITS, split_rows
from lmsmith.errors import UserError


def run_split(
    input_path: str | Path,
    out_dir: str | Path,
    ratios: tuple[float, float, float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    stratify: Optional[str] = None,
    group: Optional[str] = None,
    near: Optional[NearDedupConfig] = None,
    examples: int = 5,
) -> dict[str, Any]:
    """Write `out_dir`/{train,val,test}.jsonl and split_report.json; returns the report."""
    if any(r < 0 for r in ratios) or abs(sum(ratios) - 1) > 1e-6:
        raise UserError(f"--ratios: must be non-negative and sum to 1, got {list(ratios)}")
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
