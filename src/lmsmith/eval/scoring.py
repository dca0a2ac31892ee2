"""Scoring one model's answers to held-out instructions, overall and per task.

The metrics themselves live in `lmsmith.eval.metrics` (sacrebleu, rouge-score); this module groups
them the way the eval and compress stages report them.
"""

from __future__ import annotations

from collections import defaultdict
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


def score_answers(rows: Sequence[Instruction], answers: Sequence[str], rel_tol: float) -> dict[str, Any]:
    """`{"overall": scores, "per_task": {task: scores}}` for one model's answers."""
    if len(rows) != len(answers):
        raise ValueError(f"{len(rows)} instructions but {len(answers)} answers")
    by_task: dict[str, list[int]] = defaultdict(list)
    for index, row in enumerate(rows):
        by_task[row.task].append(index)
    per_task = {
        task: score_group([rows[i] for i in indices], [answers[i] for i in indices], rel_tol)
        for task, indices in sorted(by_task.items())
    }
    return {"overall": score_group(rows, answers, rel_tol), "per_task": per_task}
