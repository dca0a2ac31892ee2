"""The eval stage: every model the run produced on the same tasks, in one comparison.

The rows are what sft started from (`base`: the pretrained model or the recipe's checkpoint), the
fine-tuned model (`tuned`) and the compressed variants `eval.variants` names (the compress stage scores
every variant against `tuned` on its own tasks, with the same library). Every local
model is prompted through the tuned model's tokenizer, whose chat template the comparison shares. The
tasks are `lmsmith eval` tasks (`lmsmith.eval.suite`): the run's own held-out split, the embedded
finance suite, or task files. The comparison (results.json, table.md, report.html, plots) comes from
`lmsmith.eval.compare`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from lmsmith.errors import UserError
from lmsmith.eval.compare import ModelEntry, SpeedConfig, beats
from lmsmith.eval.config import EvalConfig
from lmsmith.models import ModelRef, start_model
from lmsmith.pipeline import StageContext, StageResult

HELD_OUT = "held-out"


def held_out_tasks(ctx: StageContext, folder: Path, numeric_rel_tol: float) -> list[Path]:
    """Task files over the run's test split: answers, numeric truths (records that carry one), perplexity."""
    import yaml

    from lmsmith.jsonl import iter_jsonl

    folder.mkdir(parents=True, exist_ok=True)
    sft_test = ctx.artifact("data", "sft_test")

    def beside(path: Path) -> str:  # a task file names its data relative to itself
        return os.path.relpath(path.resolve(), folder.resolve())

    numeric = [row for _, row in iter_jsonl(sft_test)
               if isinstance(row.get("answer"), dict) and isinstance(row["answer"].get("value"), (int, float))]
    specs = [{"name": "held-out-answers", "type": "generate", "dataset": beside(sft_test), "format": "messages",
              "max_new_tokens": 96}]
    if numeric:
        path = folder / "held-out-numeric.jsonl"
        path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in numeric), encoding="utf-8")
        specs.append({"name": "held-out-numeric", "type": "numeric", "dataset": path.name, "format": "messages",
                      "rel_tol": numeric_rel_tol, "max_new_tokens": 96})
    specs.append({"name": "held-out-perplexity", "type": "perplexity",
                  "dataset": beside(ctx.artifact("data", "corpus_test")), "format": "documents"})
    paths = []
    for spec in specs:
        path = folder / f"{spec['name']}.yaml"
        path.write_text(yaml.safe_dump(spec, allow_unicode=True, sort_keys=False), encoding="utf-8")
        paths.append(path)
    return paths


def task_files(names: list[str], ctx: StageContext, folder: Path, max_items: int | None = None,
               max_new_tokens: int | None = None, numeric_rel_tol: float = 0.01) -> list[Path]:
    """Task files for `names` (held-out, finance-suite, or task YAML paths), capped when asked; the
    sft stage's val tasks come from here too."""
    from lmsmith.eval.suite import expand_tasks
    from lmsmith.eval.tasks import load_task

    data = ctx.recipe.data
    embedded = data is not None and "embedded:" in f"{data.corpus} {data.instructions}"
    # The suite's companies are held out of the embedded dataset this run trained on (all of them, when
    # the run trained on the user's own data).
    train = data.embedded if data is not None else None
    paths: list[Path] = []
    for name in names:
        if name == HELD_OUT:
            paths += held_out_tasks(ctx, folder / HELD_OUT, numeric_rel_tol)
        else:
            paths += expand_tasks([name], folder, seed=train.seed if train else 0,
                                  train_companies=train.companies if embedded and train else None,
                                  years=train.years if train else 5, ops=data.ops if data is not None else None)
    if max_items is None and max_new_tokens is None:
        return paths
    import yaml

    capped = []
    for path in paths:  # a capped copy beside each task file: the run's tasks stay inspectable
        task = load_task(path)
        update: dict[str, Any] = {"dataset": os.path.relpath(Path(task.dataset).resolve(), path.parent.resolve())}
        if max_items is not None:
            update["limit"] = min(task.limit or max_items, max_items)
        if max_new_tokens is not None:
            update["max_new_tokens"] = min(task.max_new_tokens, max_new_tokens)
        capped_path = path.with_name(path.stem + ".capped.yaml")
        data_out = task.model_dump(mode="json", exclude_defaults=True) | update
        capped_path.write_text(yaml.safe_dump(data_out, allow_unicode=True, sort_keys=False), encoding="utf-8")
        capped.append(capped_path)
    return capped


def run_models(ctx: StageContext, variants: list[str] = ()) -> list[ModelEntry]:
    """base, tuned and the compressed `variants` named, as the comparison's rows."""
    trainable = ctx.manifest("sft").metrics.get("trainable_params")
    entries = []
    base = start_model(ctx.recipe, "sft")
    if base is not None:
        entries.append(ModelEntry("base", base.describe(), base.resolve(ctx)))
    tuned = ModelRef(stage="sft")
    entries.append(ModelEntry("tuned", tuned.describe(), tuned.resolve(ctx), trainable))
    if variants:
        from lmsmith.compress.stage import variant_output

        methods = {variant.name: variant.method for variant in ctx.recipe.compress.variants}
        for name in variants:
            entries.append(ModelEntry(name, f"compress/{name} ({methods[name]} of tuned)",
                                      ctx.artifact("compress", variant_output(name)), trainable))
    return entries


def run(config: EvalConfig, ctx: StageContext) -> StageResult:
    from lmsmith.eval.suite import evaluate_models

    if not config.tasks:
        raise UserError("eval.tasks: name at least one task (held-out, finance-suite or a task file)")
    out = ctx.stage_dir
    entries = run_models(ctx, config.variants)
    tasks = task_files(config.tasks, ctx, out / "tasks", config.max_items, config.max_new_tokens,
                       config.numeric_rel_tol)
    speed = SpeedConfig(requests=config.speed_requests) if config.speed_requests else None
    tuned = next(entry for entry in entries if entry.label == "tuned")
    results = evaluate_models(entries, tasks, out, config.batch_size, speed, tokenizer_path=tuned.path,
                              title=f"{ctx.recipe.name}: evaluation")
    metrics: dict[str, Any] = {}
    for task, info in results["tasks"].items():
        for label, scores in info["scores"].items():
            for key, value in scores.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and not key.endswith("_stderr"):
                    metrics[f"{label}.{task}.{key}"] = round(float(value), 4)
    labels = list(results["models"])
    if "base" in labels and "tuned" in labels:
        verdict = beats(results, "tuned", "base")
        metrics["tuned_beats_base"] = sum(verdict.values())
        metrics["tuned_beats_base_of"] = len(verdict)
        results["tuned_beats_base"] = verdict
        (out / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False), encoding="utf-8")
    return StageResult(
        outputs={"results": "results.json", "table": "table.md", "html": "report.html", "plots": "plots",
                 "tasks": "tasks"},
        metrics=metrics,
    )
