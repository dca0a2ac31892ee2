"""Scoring one model's answers to held-out instructions, overall and per task.

The metrics themselves live in `lmsmith.eval.metrics` (sacrebleu, rouge-score); this module groups
them the way the compress stage reports them.
"""

from __future__ import annotations

from typing import Any, Sequence

from lmsmith.eval.data import Instruction
from lmsmith.eval.metrics import bleu4, numeric_match, rouge_l_scores


def score_group(rows: Sequence[Instruction], answers: Sequence[str], rel_tol: float) -> dict[str, Any]:
    """BLEU-4, mean character ROUGE-L and, over rows with a numeric truth, accuracy (all 0–100)."""
    references = [row.reference for row in rows]
    rouge = rouge_l_scores(answers, references)
    numeric = [
        numeric_match(answer, row.numeric_value, rel_tol)
        for row, answer in zip(rows, answers)
        if row.numeric_value is not None
    ]
    return {
        "samples": len(rows),
        "bleu4": bleu4(answers, references),
        "rougeL": sum(rouge) / len(rouge) if rouge else 0.0,
        "numeric_acc": 100.0 * sum(numeric) / len(numeric) if numeric else None,
        "numeric_samples": len(numeric),
    }
