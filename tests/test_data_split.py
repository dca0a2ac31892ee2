"""`lmsmith data split` as the data pipeline's stream with other ends: stratified shares per stratum,
groups kept whole, near-duplicate leaks removed while copies within a split stay, and read = written +
leaks_removed. (The CLI wiring and a leak-heavy input are in test_data_clean.py.)"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from lmsmith.data.split import SPLITS, group_key, run_split, split_of_keys, split_of_units, stratum_key
from lmsmith.errors import UserError

WORDS = [f"w{i}" for i in range(5000)]


def text(seed: int, words: int = 40) -> str:
    """English-like text, unrelated to any other seed's (word 3-gram MinHash)."""
    return " ".join(random.Random(seed).sample(WORDS, words))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def read_split(out: Path) -> dict[str, list[dict]]:
    return {split: [json.loads(line) for line in (out / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]
            for split in SPLITS}


def shares(size: int, ratios: tuple[float, float, float]) -> list[int]:
    """How `split_of_keys` cuts `size` units."""
    train = min(size, int(ratios[0] * size + 0.5))
    val = min(size - train, int(ratios[1] * size + 0.5))
    return [train, val, size - train - val]


def check_accounting(report: dict, written: dict[str, list[dict]]) -> None:
    assert report["read"] == sum(report["written"].values()) + report["leaks_removed"]
    assert report["written"] == {split: len(rows) for split, rows in written.items()}
    assert report["leaks_removed"] == sum(report["leaks_by_pair"].values())


def test_split_of_units_cuts_each_stratum_by_the_ratios():
    rng = np.random.default_rng(0)
    units = rng.integers(0, 2**63, size=300, dtype=np.uint64)
    sizes = {"a": 170, "b": 90, "c": 33, "d": 7}
    strata = np.array([stratum_key(name) for name, size in sizes.items() for _ in range(size)], dtype=np.uint64)
    distinct, index = split_of_units(units, strata, (0.8, 0.1, 0.1), seed=3)
    assert np.array_equal(distinct, np.unique(units))
    at = np.searchsorted(distinct, units)
    for name, size in sizes.items():
        counts = np.bincount(index[at[strata == stratum_key(name)]], minlength=3).tolist()
        assert counts == shares(size, (0.8, 0.1, 0.1))
    # Without strata it is the one assignment the data stage uses.
    plain = split_of_units(units, None, (0.8, 0.1, 0.1), seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(plain, split_of_keys(units, (0.8, 0.1, 0.1), 3)))


def test_stratified_split_keeps_each_stratum_share_in_every_split(tmp_path):
    sizes = {"bank": 61, "tech": 27, "energy": 10, "retail": 4}
    rows = [{"id": f"{sector}{i}", "sector": sector, "text": text(1000 * at + i)}
            for at, (sector, size) in enumerate(sizes.items()) for i in range(size)]
    rows += [{"id": "nosector0", "text": text(9001)}, {"id": "nosector1", "text": text(9002)}]
    random.Random(0).shuffle(rows)
    report = run_split(write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out", (0.6, 0.2, 0.2), seed=7,
                       stratify="sector")
    written = read_split(tmp_path / "out")
    check_accounting(report, written)
    assert report["leaks_removed"] == 0
    for sector, size in sizes.items():
        assert [report["strata"][split][sector] for split in SPLITS] == shares(size, (0.6, 0.2, 0.2))
        assert [sum(row.get("sector") == sector for row in written[split]) for split in SPLITS] == \
            shares(size, (0.6, 0.2, 0.2))
    # Records without the field are a stratum of their own, reported as "None".
    assert sum(report["strata"][split].get("None", 0) for split in SPLITS) == 2
    again = run_split(tmp_path / "in.jsonl", tmp_path / "again", (0.6, 0.2, 0.2), seed=7, stratify="sector")
    assert again["written"] == report["written"]
    assert (tmp_path / "again" / "val.jsonl").read_bytes() == (tmp_path / "out" / "val.jsonl").read_bytes()


def test_groups_stay_whole_under_stratify_and_rows_without_one_stand_alone(tmp_path):
    rows = []
    for company in range(40):
        sector = "bank" if company < 30 else "tech"
        for year in range(3):
            rows.append({"id": f"c{company}-{year}", "company": f"c{company}", "sector": sector,
                         "text": text(company * 10 + year)})
    # One company's records disagree on the sector: it moves whole, with its first record's stratum.
    rows.append({"id": "c0-extra", "company": "c0", "sector": "tech", "text": text(999)})
    # Forty records without the group field (sharing an id, which does not group them): each alone.
    rows += [{"id": "same", "sector": "loose", "text": text(5000 + i)} for i in range(40)]
    report = run_split(write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out", (0.5, 0.25, 0.25), seed=1,
                       stratify="sector", group="company")
    written = read_split(tmp_path / "out")
    check_accounting(report, written)
    split_of = {row["id"]: split for split, rows_ in written.items() for row in rows_ if row["id"] != "same"}
    for company in range(40):
        assert len({split_of[f"c{company}-{year}"] for year in range(3)}) == 1
    assert split_of["c0-extra"] == split_of["c0-0"]
    companies = {sector: [Counter(split_of[f"c{c}-0"] for c in members)[split] for split in SPLITS]
                 for sector, members in (("bank", range(30)), ("tech", range(30, 40)))}
    assert companies == {"bank": shares(30, (0.5, 0.25, 0.25)), "tech": shares(10, (0.5, 0.25, 0.25))}
    assert [report["strata"][split]["loose"] for split in SPLITS] == shares(40, (0.5, 0.25, 0.25))


def test_a_near_duplicate_across_splits_goes_and_one_within_a_split_stays(tmp_path):
    rows = []
    for i in range(24):
        # Each group shows its split through an anchor; the copy lands wherever its own group does.
        rows.append({"id": f"ax{i}", "g": f"x{i}", "text": text(100 + i)})
        rows.append({"id": f"ay{i}", "g": f"y{i}", "text": text(200 + i)})
        rows.append({"id": f"orig{i}", "g": f"x{i}", "text": text(300 + i)})
        rows.append({"id": f"copy{i}", "g": f"y{i}", "text": text(300 + i) + " w1 w2"})
    for i in range(5):  # copies inside one group: always in one split
        rows.append({"id": f"z{i}", "g": f"z{i}", "text": text(400 + i)})
        rows.append({"id": f"zcopy{i}", "g": f"z{i}", "text": text(400 + i) + " w3"})
    rows.append({"id": "empty", "text": ""})  # kept: a split drops nothing but leaks
    report = run_split(write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out", (0.5, 0.25, 0.25), seed=0,
                       group="g")
    written = read_split(tmp_path / "out")
    check_accounting(report, written)
    assert report["read"] == len(rows)
    split_of = {row["id"]: split for split, rows_ in written.items() for row in rows_}
    assert "empty" in split_of
    rank = {split: at for at, split in enumerate(SPLITS)}
    crossing, within = Counter(), Counter()
    for i in range(24):
        x, y = split_of[f"ax{i}"], split_of[f"ay{i}"]
        if x == y:
            within[x] += 1
            assert split_of[f"orig{i}"] == split_of[f"copy{i}"] == x
            continue
        earlier, later = sorted((x, y), key=rank.get)
        crossing[f"{earlier}->{later}"] += 1
        kept, removed = (f"orig{i}", f"copy{i}") if x == earlier else (f"copy{i}", f"orig{i}")
        assert split_of[kept] == earlier and removed not in split_of
    for i in range(5):
        within[split_of[f"z{i}"]] += 1
        assert split_of[f"zcopy{i}"] == split_of[f"z{i}"]
    assert sum(crossing.values()) > 0 and sum(within.values()) > 5
    assert report["leaks_by_pair"] == dict(sorted(crossing.items()))
    assert report["near_duplicates_within_split"] == {split: within[split] for split in SPLITS}
    example = report["leak_examples"][0]
    assert set(example) == {"split", "where", "id", "leaks_from", "from_where", "from_id"}
    assert rank[example["leaks_from"]] < rank[example["split"]] and example["where"].startswith("in.jsonl:")
    # Without the leak check every record is written.
    from lmsmith.data.config import NearDedupConfig

    unchecked = run_split(tmp_path / "in.jsonl", tmp_path / "unchecked", (0.5, 0.25, 0.25), seed=0, group="g",
                          near=NearDedupConfig(enabled=False))
    assert sum(unchecked["written"].values()) == len(rows) and unchecked["leaks_removed"] == 0


def test_split_errors_name_the_option_or_the_line(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": text(1)}, {"text": text(2)}])
    with pytest.raises(UserError, match=r"^--stratify sector: no record has this field$"):
        run_split(good, tmp_path / "out", stratify="sector")
    assert not list((tmp_path / "out").glob("*.jsonl"))  # nothing written
    with pytest.raises(UserError, match=r"--ratios: must be non-negative and sum to 1"):
        run_split(good, tmp_path / "out", ratios=(0.5, 0.6, 0.1))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": text(1)}) + "\n" + json.dumps({"text": 3}) + "\n", encoding="utf-8")
    with pytest.raises(UserError, match=rf"^{bad}:2: a text record needs a string field 'text'$"):
        run_split(bad, tmp_path / "out")


def test_group_keys_of_the_stream_are_the_group_field_values():
    from lmsmith.data.record import Record

    record = Record("in.jsonl:3", {"id": 7, "group": "ACME:2023", "company": "ACME"})
    assert record.group == "ACME:2023" and record.group_by(("company",)) == "ACME"
    assert record.group_by(("missing",)) == "in.jsonl:3" and record.group_by(()) == "in.jsonl:3"
    assert Record("in.jsonl:4", {"id": 7}).group == "7"  # the data stage: a record without a group goes by its id
    assert group_key("ACME") == group_key(record.group_by(("company",)))
