"""The report stage: one markdown file and one self-contained HTML file describing the whole run.

Everything comes from the upstream manifests and artifacts: wall times and metrics, the loss curves
(matplotlib), the eval and compress tables (`lmsmith.report.tables`) and the serve transcript. A missing
optional piece (a stage that did not run, an output it did not write) is listed, never fatal.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmsmith.artifacts import Manifest
from lmsmith.errors import UserError
from lmsmith.pipeline import StageContext, StageResult
from lmsmith.report.config import ReportConfig
from lmsmith.report.document import Bullets, Document, Image, Paragraph
from lmsmith.report.plots import LossHistory, loss_curve_png, read_loss_history
from lmsmith.report.tables import Table, format_number
from lmsmith.stages import STAGE_NAMES

UPSTREAM = tuple(name for name in STAGE_NAMES if name != "report")
# Metrics shown first in the summary when a stage has them; other stages show their first few.
KEY_METRICS = {
    "eval": ("tuned_beats_base", "tuned_beats_base_of"),
    "compress": ("variants", "gate_failed"),
}
SUMMARY_METRICS = 4
TEXT_CELL_LIMIT = 300


def flatten(metrics: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested metrics as dotted keys; lists of scalars joined, other lists summarised by length."""
    flat: dict[str, Any] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, list):
            if all(isinstance(v, (str, int, float, bool)) or v is None for v in value) and len(value) <= 12:
                flat[name] = ", ".join(str(v) for v in value)
            else:
                flat[name] = f"{len(value)} items"
        else:
            flat[name] = value
    return flat


def _cell(value: Any) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return format_number(value)
    text = "–" if value is None else str(value)
    return text if len(text) <= TEXT_CELL_LIMIT else text[: TEXT_CELL_LIMIT - 1] + "…"


def metrics_table(metrics: dict[str, Any]) -> Table:
    table = Table(["metric", "value"], numeric=False)
    for key, value in flatten(metrics).items():
        table.add(key, _cell(value))
    return table


class Upstream:
    """Reads upstream manifests and artifacts, remembering what is missing instead of failing."""

    def __init__(self, ctx: StageContext):
        self.ctx = ctx
        self.missing: list[str] = []
        self.manifests: dict[str, Manifest] = {}
        # Only the recipe's stages: a folder left by an earlier recipe is not part of this run.
        self.stages = [stage for stage in ctx.recipe.stages() if stage in UPSTREAM]
        for stage in self.stages:
            try:
                self.manifests[stage] = ctx.manifest(stage)
            except UserError:
                self.missing.append(f"stage {stage} has not run")

    def artifact(self, stage: str, name: str, what: str) -> Path | None:
        if stage not in self.manifests:
            return None
        try:
            path = self.ctx.artifact(stage, name)
        except KeyError:
            self.missing.append(f"{what} ({stage} wrote no {name!r} output)")
            return None
        if not path.exists():
            self.missing.append(f"{what} ({path} is gone)")
            return None
        return path

    def json(self, stage: str, name: str, what: str) -> Any | None:
        path = self.artifact(stage, name, what)
        if path is None:
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}") from None


def summary_table(upstream: Upstream) -> Table:
    table = Table(["stage", "status", "wall time (s)", "key metrics"], numeric=False)
    for stage in upstream.stages:
        manifest = upstream.manifests.get(stage)
        if manifest is None:
            table.add(stage, "missing", "–", "")
            continue
        flat = {k: v for k, v in flatten(manifest.metrics).items() if isinstance(v, (int, float, str))}
        preferred = [k for k in KEY_METRICS.get(stage, ()) if k in flat]
        keys = (preferred + [k for k in flat if k not in preferred])[:SUMMARY_METRICS]
        shown = ", ".join(f"{k}={_cell(flat[k])}" for k in keys)
        table.add(stage, "done", manifest.wall_time_s, shown)
    return table


def training_section(doc: Document, upstream: Upstream, stage_dir: Path) -> None:
    section = doc.section("Training")
    table = Table(["stage", "logged steps", "final loss", "final val loss", "best val loss", "mean tokens/s"])
    for stage in ("pretrain", "sft"):
        path = upstream.artifact(stage, "metrics", f"{stage} loss curve")
        if path is None:
            continue
        history: LossHistory = read_loss_history(path)
        if history.empty:
            upstream.missing.append(f"{stage} loss curve ({path} has no loss rows)")
            continue
        png = loss_curve_png(history, f"{stage} loss")
        filename = f"loss_{stage}.png"
        (stage_dir / filename).write_bytes(png)
        section.blocks.append(Image(filename, f"{stage}: train and validation loss by step", png))
        speeds = history.tokens_per_s
        table.add(
            stage,
            len(history.train),
            history.train[-1][1] if history.train else None,
            history.val[-1][1] if history.val else None,
            min(v for _, v in history.val) if history.val else None,
            sum(speeds) / len(speeds) if speeds else None,
        )
    if table.rows:
        section.blocks.insert(0, table)
    else:
        section.blocks.append(Paragraph("No training metrics were found."))


def eval_section(doc: Document, upstream: Upstream) -> None:
    section = doc.section("Evaluation: every model of the run on the same tasks")
    results = upstream.json("eval", "results", "eval results")
    if results is None:
        section.blocks.append(Paragraph("The eval results are missing."))
        return
    tasks = results.get("tasks", {})
    section.blocks.append(Paragraph(
        "One row per model; each task's headline scores are 0–100 with a bootstrap standard error, then size, "
        "parameters, trainable parameters, greedy tok/s at batch 1 and 8, request latency and the time to "
        "write one report. Tasks: " + ", ".join(f"{name} ({info.get('items', '?')} items)"
                                               for name, info in tasks.items()) + "."
    ))
    section.blocks.append(Table.from_json(results["table"]))
    verdict = results.get("tuned_beats_base")
    if verdict:
        ahead = [name for name, won in verdict.items() if won]
        behind = [name for name, won in verdict.items() if not won]
        section.blocks.append(Bullets([
            f"tuned ahead of base beyond both standard errors on {len(ahead)} of {len(verdict)}: "
            + (", ".join(ahead) or "none"),
            "not ahead beyond the standard errors: " + (", ".join(behind) or "none"),
        ]))
    plots = upstream.artifact("eval", "plots", "eval plots")
    if plots is not None:
        for png in sorted(plots.glob("*.png")):
            section.blocks.append(Image(f"eval-{png.name}", png.stem, png.read_bytes()))


def compress_section(doc: Document, upstream: Upstream) -> None:
    """The seed's table: each compressed variant's size, speed and every metric, against the tuned model."""
    section = doc.section("Compression: the tuned model and its variants")
    results = upstream.json("compress", "results", "compress results")
    if results is None:
        section.blocks.append(Paragraph("The compress results are missing."))
        return
    failed = results.get("gate", {}).get("failed", [])
    section.blocks.append(Paragraph(
        f"Every variant scored on {', '.join(results.get('tasks', {}))} and timed on {results.get('threads', '?')} "
        f"CPU threads; agreement is next-token argmax agreement with the variant's source. "
        + (f"Over their max_drop: {', '.join(failed)}." if failed else "Every variant passed its quality gate.")))
    section.blocks.append(Table.from_json(results["table"]))
    plot = upstream.artifact("compress", "plots", "compress plots")
    if plot is not None and (plot / "size_quality.png").is_file():
        section.blocks.append(Image("compress-size_quality.png", "size against quality",
                                    (plot / "size_quality.png").read_bytes()))


def serve_section(doc: Document, upstream: Upstream) -> None:
    section = doc.section("Serving transcript")
    transcript = upstream.json("serve", "transcript", "serve transcript")
    if transcript is None:
        section.blocks.append(Paragraph("No serve transcript."))
        return
    exchanges = transcript.get("entries") if isinstance(transcript, dict) else None
    if not isinstance(exchanges, list):
        raise UserError(f"{upstream.ctx.artifact('serve', 'transcript')}: expected {{'entries': [...]}}")
    table = Table(["question", "answer", "latency (s)"], numeric=False)
    for exchange in exchanges:
        if isinstance(exchange, dict):
            table.add(_cell(exchange.get("question")), _cell(exchange.get("answer")), _cell(exchange.get("latency_s")))
    asked = len(table.rows)
    section.blocks.append(Paragraph(
        f"{asked} question{'s' if asked != 1 else ''} asked through the OpenAI-compatible API."
    ))
    if table.rows:
        section.blocks.append(table)


def metrics_section(doc: Document, upstream: Upstream, stage: str, title: str) -> None:
    section = doc.section(title)
    manifest = upstream.manifests.get(stage)
    if manifest is None:
        section.blocks.append(Paragraph(f"The {stage} stage has not run."))
    elif not manifest.metrics:
        section.blocks.append(Paragraph(f"The {stage} stage recorded no metrics."))
    else:
        section.blocks.append(metrics_table(manifest.metrics))


def build_report(config: ReportConfig, ctx: StageContext) -> tuple[Document, list[str]]:
    upstream = Upstream(ctx)
    doc = Document(
        title=config.title,
        subtitle=f"Recipe {ctx.recipe.name!r}, seed {ctx.seed}, run folder {ctx.run_dir.name}.",
    )
    doc.section("Stages").blocks.append(summary_table(upstream))
    metrics_section(doc, upstream, "data", "Data")
    if "tokenizer" in upstream.stages:
        metrics_section(doc, upstream, "tokenizer", "Tokenizer")
    training_section(doc, upstream, ctx.stage_dir)
    eval_section(doc, upstream)
    compress_section(doc, upstream)
    serve_section(doc, upstream)
    versions = next((m.versions for m in upstream.manifests.values() if m.versions), {})
    if versions:
        doc.section("Versions").blocks.append(Paragraph(", ".join(f"{k} {v}" for k, v in versions.items())))
    missing = doc.section("Missing pieces")
    missing.blocks.append(Bullets(upstream.missing) if upstream.missing else Paragraph("Nothing is missing."))
    return doc, upstream.missing


def run(config: ReportConfig, ctx: StageContext) -> StageResult:
    doc, missing = build_report(config, ctx)
    (ctx.stage_dir / "report.md").write_text(doc.to_markdown(), encoding="utf-8")
    (ctx.stage_dir / "report.html").write_text(doc.to_html(), encoding="utf-8")
    return StageResult(
        outputs={"md": "report.md", "html": "report.html"},
        metrics={"sections": len(doc.sections), "images": len(doc.images), "missing": len(missing),
                 "missing_pieces": "; ".join(missing)},
    )
