"""Several models on the same tasks: the comparison table, its plots and an HTML page.

One row per model: each task's headline metrics with their standard errors, then what it costs to run
it: size on disk, parameters, trainable parameters (what tuning changed), greedy tok/s at batch 1 and
batch 8, p50/p99 request latency at batch 1, and the time to generate one report (the first item of
the first generation task, at batch 1, stopping at end of sequence). Local models are timed through
`lmsmith.generation` (transformers), endpoints through their chat API. matplotlib draws the plots;
`lmsmith.report.document` renders the page.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from lmsmith.report.tables import Table, format_number

# Per task type: the metrics shown in the comparison table, in order (each with its stderr if it has one).
HEADLINES = {
    "multiple_choice": ("acc", "gen_acc", "extraction_failure_rate"),
    "numeric": ("numeric_acc",),
    "extraction": ("entity_f1",),
    "generate": ("rougeL", "chrf", "edit_rate"),
    "classification": ("acc", "macro_f1", "gen_acc"),
    "perplexity": ("perplexity",),
    "retrieval": ("recall_at_k", "mrr", "ndcg_at_k"),
}
MODEL_INDEPENDENT = {"retrieval"}  # task types scored without the model: the same for every row
LOWER_IS_BETTER = {"perplexity", "edit_rate", "extraction_failure_rate"}


def produced_headlines(task) -> tuple[str, ...]:
    """The headline metrics a task (`TaskConfig`) yields, given how it scores."""
    if task.type in ("multiple_choice", "classification"):
        by_likelihood = {"multiple_choice": ("acc",), "classification": ("acc", "macro_f1")}[task.type]
        by_generation = {"multiple_choice": ("gen_acc", "extraction_failure_rate"),
                         "classification": ("gen_acc",)}[task.type]
        return (by_likelihood if "loglikelihood" in task.scoring else ()) + (
            by_generation if "generate" in task.scoring else ())
    return HEADLINES[task.type]
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
STDERR_TARGET = 3.0  # points on a 0–100 scale: items enough that a score is this precise


@dataclass(frozen=True)
class SpeedConfig:
    requests: int = 8  # batch-1 requests timed for tok/s and latency; also the batch-8 batch size cap
    new_tokens: int = 32
    batch: int = 8


@dataclass
class ModelEntry:
    """A row of the comparison: its label, what it is, and what tuning trained (None: nothing to say)."""

    label: str
    describe: str
    path: Optional[Path] = None  # a local folder; None for an endpoint
    trainable_params: Optional[int] = None


def size_on_disk(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file() and path.suffix in WEIGHT_SUFFIXES)


def parameter_count(folder: Path) -> Optional[int]:
    """The architecture's parameters, counted on the meta device (quantization does not change it)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError):
        return None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(parameter.numel() for parameter in model.parameters())


def _percentile(values: Sequence[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(np.asarray(values, dtype=float), q))


def measure_local_speed(model, tokenizer, conversations: Sequence[list[dict]], report: Optional[list[dict]],
                        report_tokens: int, speed: SpeedConfig) -> dict[str, Any]:
    from lmsmith.generation import generate_chat

    asked = [list(c) for c in conversations[: speed.requests]]
    latencies, tokens = [], 0
    for conversation in asked:
        run = generate_chat(model, tokenizer, [conversation], max_new_tokens=speed.new_tokens, batch_size=1,
                            stop_at_eos=False)
        latencies.append(run.wall_s)
        tokens += sum(run.new_tokens)
    batched = generate_chat(model, tokenizer, asked[: speed.batch], max_new_tokens=speed.new_tokens,
                            batch_size=speed.batch, stop_at_eos=False)
    result = _speed_row(latencies, tokens, batched.tokens_per_s)
    if report is not None:
        result["report_s"] = generate_chat(model, tokenizer, [report], max_new_tokens=report_tokens,
                                           batch_size=1).wall_s
    return result


def measure_endpoint_speed(endpoint, conversations: Sequence[list[dict]], report: Optional[list[dict]],
                           report_tokens: int, speed: SpeedConfig) -> dict[str, Any]:
    asked = [list(c) for c in conversations[: speed.requests]]

    def timed(conversation: list[dict], max_tokens: int) -> tuple[float, int]:
        started = time.perf_counter()
        _, used = endpoint.chat_with_usage(conversation, max_tokens)
        return time.perf_counter() - started, used

    runs = [timed(conversation, speed.new_tokens) for conversation in asked]
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=speed.batch) as pool:
        concurrent = list(pool.map(lambda c: timed(c, speed.new_tokens), asked[: speed.batch]))
    wall = time.perf_counter() - started
    result = _speed_row([latency for latency, _ in runs], sum(used for _, used in runs),
                        sum(used for _, used in concurrent) / wall if wall else 0.0)
    if report is not None:
        result["report_s"] = timed(report, report_tokens)[0]
    return result


def _speed_row(latencies: list[float], tokens: int, batched_tok_s: float) -> dict[str, Any]:
    total = sum(latencies)
    return {
        "tok_s_b1": tokens / total if total else 0.0,
        "tok_s_b8": batched_tok_s,
        "latency_p50_ms": 1000 * _percentile(latencies, 50),
        "latency_p99_ms": 1000 * _percentile(latencies, 99),
        "requests": len(latencies),
    }


def headline_columns(results: dict[str, Any]) -> list[tuple[str, str]]:
    """(task, metric) pairs that some model has, in task order."""
    columns = []
    for task, info in results["tasks"].items():
        for metric in HEADLINES.get(info["type"], ()):
            if any(metric in scores for scores in info["scores"].values()):
                columns.append((task, metric))
    return columns


def _with_stderr(scores: dict[str, Any], metric: str) -> str:
    value, error = scores.get(metric), scores.get(f"{metric}_stderr")
    if value is None:
        return "–"
    return format_number(value) + (f" ± {format_number(error)}" if error is not None else "")


def comparison_table(results: dict[str, Any]) -> Table:
    columns = headline_columns(results)
    table = Table(["model"] + [f"{task} {metric}" for task, metric in columns]
                  + ["size MB", "params", "trainable", "tok/s b1", "tok/s b8", "p50 ms", "p99 ms", "report s"])
    for label, entry in results["models"].items():
        cells: list[Any] = [label]
        cells += [_with_stderr(results["tasks"][task]["scores"].get(label, {}), metric) for task, metric in columns]
        size = entry.get("size_bytes")
        cells.append(None if size is None else size / 1e6)
        for key in ("params", "trainable_params"):
            cells.append("–" if entry.get(key) is None else f"{entry[key]:,}")
        speed = entry.get("speed") or {}
        cells += [speed.get(key) for key in ("tok_s_b1", "tok_s_b8", "latency_p50_ms", "latency_p99_ms", "report_s")]
        table.add(*cells)
    return table


def imprecise_scores(results: dict[str, Any]) -> list[str]:
    """'task metric on model (± e)' for every headline score whose stderr exceeds the target."""
    found = []
    for task, metric in headline_columns(results):
        for label, scores in results["tasks"][task]["scores"].items():
            error = scores.get(f"{metric}_stderr")
            if metric != "perplexity" and error is not None and error > STDERR_TARGET:
                found.append(f"{task} {metric} on {label} (± {error:.2f})")
    return found


def beats(results: dict[str, Any], better: str, worse: str) -> dict[str, bool]:
    """Per headline column: is `better` ahead of `worse` by more than both standard errors together?"""
    verdict = {}
    for task, metric in headline_columns(results):
        if results["tasks"][task]["type"] in MODEL_INDEPENDENT:
            continue
        scores = results["tasks"][task]["scores"]
        a, b = scores.get(better, {}), scores.get(worse, {})
        if metric not in a or metric not in b:
            continue
        margin = (a.get(f"{metric}_stderr") or 0.0) + (b.get(f"{metric}_stderr") or 0.0)
        gap = a[metric] - b[metric]
        verdict[f"{task} {metric}"] = (-gap if metric in LOWER_IS_BETTER else gap) > margin
    return verdict


def headline_plot(results: dict[str, Any]) -> bytes:
    """Grouped bars: each 0–100 headline metric per model, with standard-error bars."""
    import io

    from matplotlib.figure import Figure

    columns = [(task, metric) for task, metric in headline_columns(results) if metric != "perplexity"]
    labels = list(results["models"])
    figure = Figure(figsize=(max(6.0, 1.1 * len(columns) + 2), 4), dpi=100)
    axes = figure.subplots()
    width = 0.8 / max(1, len(labels))
    for index, label in enumerate(labels):
        values, errors = [], []
        for task, metric in columns:
            scores = results["tasks"][task]["scores"].get(label, {})
            values.append(scores.get(metric) or 0.0)
            errors.append(scores.get(f"{metric}_stderr") or 0.0)
        axes.bar([c + index * width for c in range(len(columns))], values, width, yerr=errors, capsize=3, label=label)
    axes.set_xticks([c + width * (len(labels) - 1) / 2 for c in range(len(columns))])
    axes.set_xticklabels([f"{task}\n{metric}" for task, metric in columns], fontsize=7)
    axes.set_ylabel("score (0–100)")
    axes.grid(axis="y", alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _drawable(label: str) -> bool:
    # matplotlib's bundled DejaVu Sans has no CJK glyphs, and the machines carry no CJK font.
    return all(ord(char) < 0x2E80 for char in label)


def confusion_labels(matrices: dict[str, dict[str, dict[str, int]]]) -> dict[str, str]:
    """What each label is called in the plot: itself, or #N when the font cannot draw it (the caption maps it)."""
    labels = list(dict.fromkeys(label for matrix in matrices.values() for row, counts in matrix.items()
                                for label in (row, *counts)))
    return {label: label if _drawable(label) else f"#{index}" for index, label in enumerate(labels, start=1)}


def confusion_plot(task: str, matrices: dict[str, dict[str, dict[str, int]]]) -> bytes:
    """One confusion matrix `{gold: {predicted: count}}` per model, side by side (rows: truth)."""
    import io

    from matplotlib.figure import Figure

    shown = confusion_labels(matrices)
    figure = Figure(figsize=(3.4 * len(matrices), 3.4), dpi=100)
    axes_list = figure.subplots(1, len(matrices), squeeze=False)[0]
    for axes, (model, matrix) in zip(axes_list, matrices.items()):
        rows = list(matrix)
        columns = list(dict.fromkeys(label for counts in matrix.values() for label in counts))
        values = [[matrix[row].get(column, 0) for column in columns] for row in rows]
        axes.imshow(values, cmap="Blues")
        for r, line in enumerate(values):
            for c, value in enumerate(line):
                axes.text(c, r, str(value), ha="center", va="center", fontsize=8)
        axes.set_xticks(range(len(columns)), [shown[column] for column in columns], fontsize=7)
        axes.set_yticks(range(len(rows)), [shown[row] for row in rows], fontsize=7)
        axes.set_title(model, fontsize=9)
        axes.set_xlabel("predicted", fontsize=8)
    figure.suptitle(task, fontsize=10)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def build_document(results: dict[str, Any], title: str, extra_images: Sequence[Any] = ()):
    """The comparison as a `Document`: table, notes, plots (rendered to markdown and HTML)."""
    from lmsmith.report.document import Bullets, Document, Image, Paragraph

    doc = Document(title, subtitle=f"{len(results['models'])} models, {len(results['tasks'])} tasks")
    section = doc.section("Comparison")
    section.blocks.append(comparison_table(results))
    notes = [f"{label}: {entry['describe']}" for label, entry in results["models"].items()]
    notes += [f"{task}: {info['items']} items ({info['type']})" for task, info in results["tasks"].items()]
    section.blocks.append(Bullets(notes))
    imprecise = imprecise_scores(results)
    section.blocks.append(Paragraph(
        "Scores are 0–100 with a bootstrap standard error; every headline score is within ± "
        f"{STDERR_TARGET:g} points." if not imprecise else
        f"Standard errors above {STDERR_TARGET:g} points (more items would tighten them): " + "; ".join(imprecise)))
    section.blocks.extend(extra_images)
    section.blocks.append(Image("plots/scores.png", "headline scores (± standard error)", headline_plot(results)))
    for task, info in results["tasks"].items():
        matrices = {label: scores.get("confusion") or scores["gen_confusion"]
                    for label, scores in info["scores"].items() if "confusion" in scores or "gen_confusion" in scores}
        if matrices:
            renamed = [f"{short} = {label}" for label, short in confusion_labels(matrices).items() if short != label]
            caption = f"{task}: confusion matrices (rows: truth)" + (f"; {', '.join(renamed)}" if renamed else "")
            section.blocks.append(Image(f"plots/{task}-confusion.png", caption, confusion_plot(task, matrices)))
    return doc


def write_outputs(results: dict[str, Any], out: Path, title: str, extra_images: Sequence[Any] = ()) -> Table:
    """results.json, table.md, report.html and plots/*.png in `out`; returns the comparison table."""
    out.mkdir(parents=True, exist_ok=True)
    doc = build_document(results, title, extra_images)
    (out / "plots").mkdir(exist_ok=True)
    for image in doc.images:
        (out / image.filename).write_bytes(image.png)
    table = comparison_table(results)
    results["table"] = table.to_json()
    (out / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False), encoding="utf-8")
    (out / "table.md").write_text(doc.to_markdown(), encoding="utf-8")
    (out / "report.html").write_text(doc.to_html(), encoding="utf-8")
    return table
