"""Label metrics: entity spans (precision, recall, F1 per type; seqeval under CoNLL rules) and
classification (accuracy, macro-F1, per-class figures and a confusion matrix; plain counting).

Rates are fractions in 0–1 here, as seqeval reports them; task reports scale them for display.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Sequence


def entity_scores(gold: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]]) -> dict[str, Any]:
    """Span-level precision, recall and F1 of BIO tag sequences: overall (micro) and per entity type.

    A predicted entity counts only when its type and both ends equal a gold entity's (CoNLL rules).
    """
    from seqeval.metrics import classification_report, f1_score, precision_score, recall_score

    if len(gold) != len(predicted):
        raise ValueError(f"{len(gold)} gold sequences but {len(predicted)} predicted")
    for index, (g, p) in enumerate(zip(gold, predicted)):
        if len(g) != len(p):
            raise ValueError(f"sequence {index}: {len(g)} gold tags but {len(p)} predicted")
    report = classification_report(gold, predicted, output_dict=True, zero_division=0)
    per_type = {
        name: {"precision": round(float(v["precision"]), 4), "recall": round(float(v["recall"]), 4),
               "f1": round(float(v["f1-score"]), 4), "support": int(v["support"])}
        for name, v in report.items() if not name.endswith(" avg")
    }
    return {
        "precision": round(float(precision_score(gold, predicted, zero_division=0)), 4),
        "recall": round(float(recall_score(gold, predicted, zero_division=0)), 4),
        "f1": round(float(f1_score(gold, predicted, zero_division=0)), 4),
        "per_type": per_type,
    }


def span_counts(gold: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]]):
    """Per sentence [true positives, predicted spans, gold spans] under the same CoNLL rules (seqeval's
    span reader): micro F1 = 2·TP / (predicted + gold) over any set of sentences, for the bootstrap."""
    import numpy as np
    from seqeval.metrics.sequence_labeling import get_entities

    rows = []
    for g, p in zip(gold, predicted):
        gold_spans, predicted_spans = set(get_entities(list(g))), set(get_entities(list(p)))
        rows.append([len(gold_spans & predicted_spans), len(predicted_spans), len(gold_spans)])
    return np.asarray(rows, dtype=np.float64).reshape(-1, 3)


def classification_scores(gold: Sequence[str], predicted: Sequence[str | None],
                          labels: Sequence[str] | None = None) -> dict[str, Any]:
    """Accuracy, macro-F1 over the labels, per-label precision/recall/F1/support and the confusion matrix
    `{gold label: {predicted label: count}}`. A prediction outside `labels` (or None: no label found in
    the answer) is wrong and appears in the matrix as `"<other>"`."""
    if len(gold) != len(predicted):
        raise ValueError(f"{len(gold)} gold labels but {len(predicted)} predictions")
    labels = list(labels) if labels is not None else sorted(set(gold))
    known = set(labels)
    shown = [p if p in known else "<other>" for p in predicted]
    pairs = Counter(zip(gold, shown))
    per_label = {}
    for label in labels:
        true_positive = pairs[(label, label)]
        predicted_count = sum(count for (_, p), count in pairs.items() if p == label)
        support = sum(count for (g, _), count in pairs.items() if g == label)
        precision = true_positive / predicted_count if predicted_count else 0.0
        recall = true_positive / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_label[label] = {"precision": round(precision, 4), "recall": round(recall, 4), "f1": round(f1, 4),
                            "support": support}
    columns = labels + (["<other>"] if "<other>" in shown else [])
    matrix = {g: {p: pairs[(g, p)] for p in columns} for g in labels}
    n = len(gold)
    return {
        "accuracy": round(sum(pairs[(label, label)] for label in labels) / n, 4) if n else 0.0,
        "macro_f1": round(sum(v["f1"] for v in per_label.values()) / len(labels), 4) if labels else 0.0,
        "per_label": per_label,
        "confusion": matrix,
    }
