"""The 3C report reads what the stream counted: a bounded sample seen before and after cleaning, with the
steps that rewrote each kept record; nothing replays the operators."""

from __future__ import annotations

from lmsmith.data.quality import QualityConfig, QualitySample, cleaning_vs_labels
from lmsmith.data.record import Record


def _record(where: str, text: str) -> Record:
    return Record(where, {"text": text, "noise": []}, fmt="text", kind="corpus")


def test_the_sample_is_bounded_and_the_same_whatever_the_order():
    records = [_record(f"f.jsonl:{i}", f"文本{i}") for i in range(500)]
    forward, backward = QualitySample(50), QualitySample(50)
    for record in records:
        forward.observe(record)
    for record in reversed(records):
        backward.observe(record)
    assert len(forward.before()) == 50
    assert {row["id"] for row in forward.before()} == {row["id"] for row in backward.before()}
    assert sum(forward.holds(record) for record in records) == 50


def test_rows_cleaned_elsewhere_count_a_changed_text_as_unattributed():
    before = [{"id": "a", "text": "<p>营业收入</p>", "noise": ["html"]}, {"id": "b", "text": "干净", "noise": []}]
    after = [{"id": "a", "text": "营业收入", "noise": ["html"]}, {"id": "b", "text": "干净", "noise": []}]
    result = cleaning_vs_labels(before, after, [], [{}, {}], QualityConfig())
    assert result["by_op"]["unattributed"]["flagged"] == 1
    assert (result["repair"]["tp"], result["repair"]["tn"]) == (1, 1)
    counted = [dict(after[0], modified_by=["strip_html"]), dict(after[1], modified_by=[])]
    result = cleaning_vs_labels(before, counted, [], [{}, {}], QualityConfig())
    assert "unattributed" not in result["by_op"] and result["by_op"]["strip_html"]["flagged"] == 1
