"""The compression comparison: what each variant costs and keeps against its source, as a table, a
size-against-quality plot (matplotlib) and a page (`lmsmith.report.document`)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Sequence

from lmsmith.eval.compare import LOWER_IS_BETTER, headline_columns, produced_headlines
from lmsmith.report.tables import Table, format_number

BUILT_IN_KEYS = ("agreement", "perplexity")


def gate_keys(tasks: Sequence[Any]) -> list[str]:
    """Every key `max_drop` may name: agreement, perplexity and TASK.METRIC of the scored tasks."""
    return list(BUILT_IN_KEYS) + [f"{task.name}.{metric}" for task in tasks for metric in produced_headlines(task)]


def drops(results: dict[str, Any], label: str, source: str) -> dict[str, float | None]:
    """How much `label` lost against `source` on each gate key (positive: worse)."""
    mine, theirs = results["models"][label], results["models"][source]
    lost: dict[str, float | None] = {"agreement": 100.0 - mine["agreement"]}
    ppl, source_ppl = mine.get("perplexity"), theirs.get("perplexity")
    lost["perplexity"] = 100.0 * (ppl / source_ppl - 1) if ppl and source_ppl else None
    for task, metric in headline_columns(results):
        scores = results["tasks"][task]["scores"]
        new, old = scores.get(label, {}).get(metric), scores.get(source, {}).get(metric)
        if new is None or old is None:
            lost[f"{task}.{metric}"] = None
        else:
            lost[f"{task}.{metric}"] = (new - old) if metric in LOWER_IS_BETTER else (old - new)
    return lost


def _ratio(value, reference) -> str:
    return "" if not value or not reference else f" ({value / reference:.2f}×)"


def _with_change(value, old) -> str:
    if value is None:
        return "–"
    return format_number(value) + ("" if old is None else f" ({format_number(value - old, signed=True)})")


def comparison_table(results: dict[str, Any]) -> Table:
    columns = headline_columns(results)
    table = Table(["model", "method", "size MB", "params", "peak MB", "tok/s b1", "tok/s b8", "p50 ms",
                   "agreement %", "perplexity"] + [f"{task} {metric}" for task, metric in columns] + ["gate"])
    models = results["models"]
    for label, entry in models.items():
        source = models.get(entry.get("source", label), entry)
        speed, source_speed = entry.get("speed") or {}, source.get("speed") or {}
        size = entry.get("size_bytes")
        lost = entry.get("drops", {})
        perplexity = entry.get("perplexity")
        cells: list[Any] = [
            label, entry.get("method", "tuned"),
            "–" if size is None else f"{size / 1e6:.2f}" + ("" if label == "source" else
                                                           f" ({source['size_bytes'] / size:.2f}× smaller)"),
            "–" if entry.get("params") is None else f"{entry['params']:,}",
            entry.get("peak_memory_mb"),
            format_number(speed.get("tok_s_b1")) + _ratio(speed.get("tok_s_b1"), source_speed.get("tok_s_b1")
                                                          if label != "source" else None),
            format_number(speed.get("tok_s_b8")) + _ratio(speed.get("tok_s_b8"), source_speed.get("tok_s_b8")
                                                          if label != "source" else None),
            speed.get("latency_p50_ms"),
            entry.get("agreement"),
            "–" if perplexity is None else format_number(perplexity) + (
                "" if lost.get("perplexity") is None else f" ({lost['perplexity']:+.1f}%)"),
        ]
        for task, metric in columns:
            scores = results["tasks"][task]["scores"]
            old = scores.get(entry["source"], {}).get(metric) if "source" in entry else None
            cells.append(_with_change(scores.get(label, {}).get(metric), old))
        gate = entry.get("gate")
        cells.append("–" if gate is None else "passed" if gate["passed"] else
                     "FAILED: " + ", ".join(f"{key} −{value:.2f}" for key, value in gate["over"].items()))
        table.add(*cells)
    return table


def size_quality_plot(results: dict[str, Any]) -> bytes:
    """Each model at (size on disk, argmax agreement with its source), and the first task metric if any."""
    from matplotlib.figure import Figure

    columns = [column for column in headline_columns(results) if column[1] != "perplexity"]
    figure = Figure(figsize=(6, 4), dpi=100)
    axes = figure.subplots()
    for label, entry in results["models"].items():
        if entry.get("size_bytes") is None:
            continue
        size = entry["size_bytes"] / 1e6
        axes.scatter(size, entry.get("agreement", 0.0), color="tab:blue")
        axes.annotate(label, (size, entry.get("agreement", 0.0)), fontsize=8, xytext=(3, 3),
                      textcoords="offset points")
        if columns:
            task, metric = columns[0]
            value = results["tasks"][task]["scores"].get(label, {}).get(metric)
            if value is not None:
                axes.scatter(size, value, color="tab:orange", marker="s")
    axes.set_xlabel("size on disk (MB)")
    axes.set_ylabel("score (0–100)")
    legend = ["argmax agreement with source"] + ([f"{columns[0][0]} {columns[0][1]}"] if columns else [])
    axes.legend(legend, fontsize=8)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def compress_document(results: dict[str, Any], out: Path, title: str) -> Table:
    """results.json, table.md, report.html and plots/size_quality.png in `out`; returns the table."""
    from lmsmith.report.document import Bullets, Document, Image, Paragraph

    table = comparison_table(results)
    results["table"] = table.to_json()
    doc = Document(title, subtitle=f"{len(results['models']) - 1} variants of the tuned model")
    section = doc.section("Variants against their source")
    section.blocks.append(table)
    notes = [f"{label}: {entry['describe']}; kernels: {entry.get('kernels', 'fp32 (transformers)')}"
             for label, entry in results["models"].items()]
    notes += [f"{task}: {info['items']} items ({info['type']})" for task, info in results["tasks"].items()]
    section.blocks.append(Bullets(notes))
    section.blocks.append(Paragraph(
        f"Agreement: the share of next-token argmaxes equal to the source model's, over every position of "
        f"{results.get('agreement_texts', '?')} held-out conversations; perplexity on the same; peak memory: "
        "resident memory above the imports of a fresh process that loads the model and decodes a batch; "
        f"speed on {results.get('threads', '?')} CPU threads. Brackets: change against the source."))
    image = Image("plots/size_quality.png", "size against quality", size_quality_plot(results))
    section.blocks.append(image)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    (out / image.filename).write_bytes(image.png)
    (out / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False), encoding="utf-8")
    (out / "table.md").write_text(doc.to_markdown(), encoding="utf-8")
    (out / "report.html").write_text(doc.to_html(), encoding="utf-8")
    return table
