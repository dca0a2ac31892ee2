"""The numbers behind the 3C quality report — Consistency, Coverage, Cleanliness — computed from plain
rows with the standard library (`statistics`, `collections`, `re`, `decimal`).

Every function takes rows (`{"id", "text", ...}` corpus rows or `{"id", "task", "messages", "answer"}`
conversation rows, the data stage's formats) and returns JSON-ready dicts.
"""

from __future__ import annotations

import math
import re
import statistics
from collections import Counter
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Any, Iterable, Optional, Sequence

from lmsmith.data.steps.numbers import normalize_amounts
from lmsmith.data.record import row_kind, row_text

# Which detector confirms that a noise label is still there after cleaning. Duplicates and fragments
# have none: rewriting a text never makes it less of a copy or less of a fragment, only dropping does.
REPAIRABLE_LABELS = {"html": "html", "pii": "pii", "mixed_numbers": "mixed_numbers", "boilerplate": "boilerplate"}
LABEL_OF_DETECTOR = {
    "html": "html",
    "pii": "pii",
    "mixed_numbers": "mixed_numbers",
    "boilerplate": "boilerplate",
    "fragment": "fragment",
    "exact_dup": "exact_duplicate",
    "near_dup": "near_duplicate",
}


def rate(part: int, whole: int) -> float:
    return round(part / whole, 4) if whole else 0.0


def prf(tp: int, fp: int, fn: int) -> dict[str, Any]:
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"tp": tp, "fp": fp, "fn": fn, "precision": round(precision, 4), "recall": round(recall, 4),
            "f1": round(f1, 4)}


def by_kind(rows: Iterable[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row_kind(row), []).append(row)
    return dict(sorted(groups.items()))


# ------------------------------------------------------------------------------------------ consistency

_GROWTH_FORMULA = re.compile(
    r"\((?P<a>-?\d+(?:\.\d+)?)元?\s*[−-]\s*(?P<b>-?\d+(?:\.\d+)?)元?\)\s*/\s*(?P<c>-?\d+(?:\.\d+)?)元?\s*=\s*"
    r"(?P<g>-?\d+(?:\.\d+)?)%"
)


def growth_check(row: dict[str, Any]) -> Optional[bool]:
    """For a conversation whose reference answer shows `(A−B)/B = G%`: is G what A and B give (to the
    cent of a percent) and equal to `answer.value`? None when the row shows no such formula."""
    messages = row.get("messages") or []
    if not messages or not isinstance(messages[-1], dict):
        return None
    # Amounts are compared in one plain form, whatever way the text wrote them (12.35亿元 or 1235000000元).
    text = normalize_amounts(str(messages[-1].get("content", "")))
    match = _GROWTH_FORMULA.search(text)
    if not match:
        return None
    try:
        a, b, c, shown = (Decimal(match[k]) for k in ("a", "b", "c", "g"))
    except InvalidOperation:
        return False
    if c == 0 or b != c:
        return False
    expected = ((a - b) / c * 100).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)
    value = (row.get("answer") or {}).get("value")
    value_ok = value is None or (isinstance(value, (int, float)) and abs(Decimal(str(value)) - shown) < Decimal("0.005"))
    return expected == shown and value_ok


def consistency(rows: Sequence[dict[str, Any]], verdicts: Sequence[dict[str, str]]) -> dict[str, Any]:
    """Schema completeness, duplicate ids, number-format consistency and answer arithmetic, per kind."""
    result: dict[str, Any] = {}
    verdict_of = {id(row): verdict for row, verdict in zip(rows, verdicts)}
    for kind, group in by_kind(rows).items():
        ids = Counter(str(row.get("id")) for row in group)
        if kind == "corpus":
            complete = sum(1 for row in group if isinstance(row.get("text"), str) and row.get("id") is not None)
        else:
            complete = sum(1 for row in group if _conversation_complete(row))
        checks = [check for row in group if (check := growth_check(row)) is not None]
        mixed = sum(1 for row in group if "mixed_numbers" in verdict_of[id(row)])
        section: dict[str, Any] = {
            "records": len(group),
            "schema_complete_rate": rate(complete, len(group)),
            "duplicate_ids": sum(count - 1 for count in ids.values() if count > 1),
            "one_number_format_rate": rate(len(group) - mixed, len(group)),
        }
        if checks:
            section["growth_answers_checked"] = len(checks)
            section["growth_answers_consistent_rate"] = rate(sum(checks), len(checks))
        result[kind] = section
    return result


def _conversation_complete(row: dict[str, Any]) -> bool:
    messages = row.get("messages")
    return (
        row.get("id") is not None
        and isinstance(messages, list)
        and bool(messages)
        and all(isinstance(m, dict) and isinstance(m.get("content"), str) and m["content"].strip() for m in messages)
        and messages[-1].get("role") == "assistant"
        and isinstance(row.get("answer", {}), dict)
    )


# -------------------------------------------------------------------------------------------- coverage


def length_stats(lengths: Sequence[int]) -> dict[str, Any]:
    if not lengths:
        return {"count": 0}
    ordered = sorted(lengths)

    def percentile(p: float) -> int:
        return ordered[min(len(ordered) - 1, int(math.ceil(p * len(ordered))) - 1)]

    return {
        "count": len(ordered),
        "mean": round(statistics.fmean(ordered), 1),
        "min": ordered[0],
        "p50": percentile(0.5),
        "p90": percentile(0.9),
        "p99": percentile(0.99),
        "max": ordered[-1],
    }


def lengths(rows: Sequence[dict[str, Any]]) -> dict[str, list[int]]:
    """Characters per record (whitespace excluded), per kind."""
    return {
        kind: [sum(1 for c in row_text(row) if not c.isspace()) for row in group]
        for kind, group in by_kind(rows).items()
    }


def category_distribution(rows: Sequence[dict[str, Any]], field: str, head_share: float) -> Optional[dict[str, Any]]:
    """Counts of `field`'s values, the head (the most frequent values that together hold `head_share`
    of the records) and the long tail (the rest). None when no row has the field."""
    counts = Counter(str(row[field]) for row in rows if row.get(field) not in (None, ""))
    if not counts:
        return None
    total = sum(counts.values())
    ordered = counts.most_common()
    head, running = [], 0
    for value, count in ordered:
        if running >= head_share * total:
            break
        head.append(value)
        running += count
    tail = [value for value, _ in ordered if value not in head]
    entropy = -sum((c / total) * math.log(c / total) for c in counts.values())
    return {
        "records": total,
        "counts": dict(ordered),
        "head": head,
        "tail": tail,
        "tail_share": rate(total - running, total),
        "imbalance_ratio": round(ordered[0][1] / ordered[-1][1], 2),
        "normalised_entropy": round(entropy / math.log(len(counts)), 4) if len(counts) > 1 else 1.0,
    }


def term_coverage(rows: Sequence[dict[str, Any]], terms: Sequence[str], top: int = 10) -> dict[str, Any]:
    """How much of the domain vocabulary the records use: terms seen at least once, records holding at
    least one term, the most frequent terms and the missing ones."""
    folded = [row_text(row).casefold() for row in rows]
    frequency = {term: sum(1 for text in folded if term.casefold() in text) for term in terms}
    covered = [term for term in terms if frequency[term]]
    with_any = sum(1 for text in folded if any(term.casefold() in text for term in terms))
    return {
        "terms": len(terms),
        "covered": len(covered),
        "coverage": rate(len(covered), len(terms)),
        "records_with_a_term_rate": rate(with_any, len(rows)),
        "top_terms": dict(sorted(((t, f) for t, f in frequency.items() if f), key=lambda kv: -kv[1])[:top]),
        "missing_terms": [term for term in terms if not frequency[term]],
    }


# ----------------------------------------------------------------------------------------- cleanliness


def detector_rates(rows: Sequence[dict[str, Any]], verdicts: Sequence[dict[str, str]], names: Sequence[str]) -> dict[str, Any]:
    """Per kind: how many records each detector flags, and how many any detector flags."""
    result: dict[str, Any] = {}
    verdict_of = {id(row): verdict for row, verdict in zip(rows, verdicts)}
    for kind, group in by_kind(rows).items():
        flagged = [verdict_of[id(row)] for row in group]
        section = {
            name: {"count": sum(1 for v in flagged if name in v), "rate": rate(sum(1 for v in flagged if name in v), len(group))}
            for name in names
        }
        noisy = sum(1 for v in flagged if v)
        section["any"] = {"count": noisy, "rate": rate(noisy, len(group))}
        result[kind] = {"records": len(group), "detectors": section}
    return result


def detectors_vs_labels(rows: Sequence[dict[str, Any]], verdicts: Sequence[dict[str, str]]) -> dict[str, Any]:
    """Each detector scored against the noise label it looks for (rows carrying `noise` labels only)."""
    labelled = [(row, v) for row, v in zip(rows, verdicts) if isinstance(row.get("noise"), list)]
    result = {}
    for detector, label in LABEL_OF_DETECTOR.items():
        tp = sum(1 for row, v in labelled if detector in v and label in row["noise"])
        fp = sum(1 for row, v in labelled if detector in v and label not in row["noise"])
        fn = sum(1 for row, v in labelled if detector not in v and label in row["noise"])
        result[detector] = {"label": label, **prf(tp, fp, fn)}
    return result
