"""The eval stage: the model sft started from (the pretrained base, or the recipe's checkpoint) against
the fine-tuned model on held-out data.

Perplexity on held-out documents, then greedy answers to held-out instructions scored with BLEU-4,
character ROUGE-L and numeric accuracy (`lmsmith.eval.metrics`). Generation is `lmsmith.generation`'s
batched decode over transformers models.
"""

from __future__ import annotations

import gc
import json
import math
from pathlib import Path
from typing import Any

from lmsmith.console import console
from lmsmith.errors import UserError
from lmsmith.eval.config import EvalConfig
from lmsmith.eval.data import Instruction, read_documents, read_instructions, spread_over_tasks
from lmsmith.eval.metrics import numeric_match, rouge_l_scores
from lmsmith.eval.scoring import score_answers
from lmsmith.models import ModelRef, start_model
from lmsmith.pipeline import StageContext, StageResult
from lmsmith.report.tables import Table, format_number


# (key in the scores, row label); every score is "higher is better" except perplexity.
SCORE_ROWS = (
    ("bleu4", "BLEU-4"),
    ("rougeL", "ROUGE-L F (char)"),
    ("numeric_acc", "numeric accuracy %"),
)


def _finite(value: float) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def evaluate_model(
    path: Path,
    tokenizer_path: Path,
    role: str,
    config: EvalConfig,
    instructions: list[Instruction],
    documents: list[str],
) -> tuple[dict[str, Any], list[str]]:
    """Perplexity and answer scores of the model in `path`; returns (scores, answers)."""
    from lmsmith.eval.metrics import perplexity
    from lmsmith.generation import generate_chat, load_causal_lm, load_tokenizer

    model = load_causal_lm(path)
    tokenizer = load_tokenizer(tokenizer_path)
    ppl = perplexity(model, tokenizer, documents, batch_size=config.batch_size, progress=f"{role}: perplexity")
    generation = generate_chat(
        model,
        tokenizer,
        [row.prompt for row in instructions],
        max_new_tokens=config.max_new_tokens,
        batch_size=config.batch_size,
        progress=f"{role}: answers",
    )
    scores = score_answers(instructions, generation.texts, config.numeric_rel_tol)
    scores["perplexity"] = _finite(ppl.perplexity)
    scores["ppl_tokens"] = ppl.tokens
    scores["generation"] = {
        "new_tokens": sum(generation.new_tokens),
        "mean_new_tokens": sum(generation.new_tokens) / len(generation.new_tokens),
        "tokens_per_s": generation.tokens_per_s,
    }
    del model
    gc.collect()
    return scores, generation.texts


def _delta(base: float | None, tuned: float | None) -> float | None:
    return None if base is None or tuned is None else tuned - base


def build_table(base: dict[str, Any], tuned: dict[str, Any]) -> Table:
    """Base vs tuned vs delta: perplexity, overall scores, then the same scores per task."""
    table = Table(["metric", "base", "tuned", "Δ (tuned − base)"])
    table.add(
        "perplexity, held-out corpus (lower is better)",
        base["perplexity"],
        tuned["perplexity"],
        format_number(_delta(base["perplexity"], tuned["perplexity"]), signed=True),
    )
    for key, label in SCORE_ROWS:
        b, t = base["overall"][key], tuned["overall"][key]
        if b is None and t is None:
            continue
        table.add(label, b, t, format_number(_delta(b, t), signed=True))
    for task in sorted(tuned["per_task"]):
        b_scores, t_scores = base["per_task"][task], tuned["per_task"][task]
        for key, label in SCORE_ROWS:
            b, t = b_scores[key], t_scores[key]
            if b is None and t is None:
                continue
            table.add(f"{task} · {label} (n={t_scores['samples']})", b, t, format_number(_delta(b, t), signed=True))
    return table


def _sample_rows(
    instructions: list[Instruction], answers: dict[str, list[str]], rel_tol: float
) -> list[dict[str, Any]]:
    references = [row.reference for row in instructions]
    rouge = {role: rouge_l_scores(texts, references) for role, texts in answers.items()}
    samples = []
    for index, row in enumerate(instructions):
        sample: dict[str, Any] = {
            "id": row.id,
            "task": row.task,
            "question": row.question,
            "reference": row.reference,
        }
        for role, texts in answers.items():
            sample[role] = texts[index]
        for role in answers:
            sample[f"{role}_rougeL"] = round(rouge[role][index], 2)
        if row.numeric_value is not None:
            sample["expected_value"] = row.numeric_value
            for role, texts in answers.items():
                sample[f"{role}_correct"] = numeric_match(texts[index], row.numeric_value, rel_tol)
        samples.append(sample)
    return samples


def flat_metrics(base: dict[str, Any], tuned: dict[str, Any]) -> dict[str, Any]:
    metrics: dict[str, Any] = {"samples": tuned["overall"]["samples"]}
    for key in ("perplexity", "bleu4", "rougeL", "numeric_acc"):
        b = base[key] if key == "perplexity" else base["overall"][key]
        t = tuned[key] if key == "perplexity" else tuned["overall"][key]
        metrics[f"base_{key}"] = None if b is None else round(b, 4)
        metrics[f"tuned_{key}"] = None if t is None else round(t, 4)
        delta = _delta(b, t)
        metrics[f"delta_{key}"] = None if delta is None else round(delta, 4)
    return metrics


def run(config: EvalConfig, ctx: StageContext) -> StageResult:
    sft_test = ctx.artifact("data", "sft_test")
    instructions = spread_over_tasks(read_instructions(sft_test), config.max_samples)
    if not instructions:
        raise UserError(f"{sft_test}: no held-out instructions to evaluate")
    documents = read_documents(ctx.artifact("data", "corpus_test"), config.ppl_max_docs)
    console.print(
        f"eval: {len(instructions)} instructions over {len({r.task for r in instructions})} tasks, "
        f"{len(documents)} documents for perplexity"
    )

    scores: dict[str, dict[str, Any]] = {}
    answers: dict[str, list[str]] = {}
    model_paths: dict[str, str] = {}
    models = {"base": start_model(ctx.recipe, "sft"), "tuned": ModelRef(stage="sft")}
    # Both are prompted through the tuned model's tokenizer: sft keeps the base's vocabulary and may
    # have given it the chat template (a checkpoint without one) that the comparison should share.
    tokenizer_path = models["tuned"].resolve(ctx)
    for role, ref in models.items():
        model_paths[role] = ref.describe()
        scores[role], answers[role] = evaluate_model(ref.resolve(ctx), tokenizer_path, role, config, instructions,
                                                     documents)

    table = build_table(scores["base"], scores["tuned"])
    metrics = flat_metrics(scores["base"], scores["tuned"])
    metrics["ppl_documents"] = len(documents)
    results = {
        "models": model_paths,
        "samples": len(instructions),
        "ppl_documents": len(documents),
        "numeric_rel_tol": config.numeric_rel_tol,
        "scale": "BLEU-4, ROUGE-L and accuracy are 0–100",
        "base": scores["base"],
        "tuned": scores["tuned"],
        "table": table.to_json(),
    }
    out = ctx.stage_dir
    (out / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False))
    (out / "table.md").write_text(
        "# Base vs tuned\n\n"
        f"{len(instructions)} held-out instructions (greedy, at most {config.max_new_tokens} new tokens), "
        f"{len(documents)} held-out documents. Scores are 0–100; numeric accuracy allows a relative "
        f"error of {config.numeric_rel_tol:g}.\n\n" + table.to_markdown() + "\n",
        encoding="utf-8",
    )
    with open(out / "samples.jsonl", "w", encoding="utf-8") as handle:
        for sample in _sample_rows(instructions, answers, config.numeric_rel_tol):
            handle.write(json.dumps(sample, ensure_ascii=False) + "\n")
    console.print(table.to_markdown(), markup=False)
    return StageResult(
        outputs={"results": "results.json", "table": "table.md", "samples": "samples.jsonl"},
        metrics=metrics,
    )
