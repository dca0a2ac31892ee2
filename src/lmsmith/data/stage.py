"""The data stage: the data pipeline (`lmsmith.data.engine`) over the recipe's corpus and instructions,
split by group, then the optional steps on its outputs (augmentation, annotation) and the 3C report.

Outputs (names for `ctx.artifact("data", NAME)`):
- `corpus_{train,val,test}` → `corpus/{split}.jsonl`: `{"id", "text", "source", "noise"}` per line;
- `sft_{train,val,test}` → `sft/{split}.jsonl`: `{"id", "task", "messages", "answer"}` per line;
- `stats` → `stats.json`: read / kept / dropped per step and per split, the noise rates, and `fitted`
  (the fields each fitted operator learnt on the first records);
- `dropped` → `dropped.jsonl`: every dropped record with its `reason` (the step) and `detail`.

Files of any format `lmsmith.data.io` reads stream through in constant memory, on local processes or
Ray (`data.executor`); the train split's augmentation and the annotation work on the written files.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any, Optional

from lmsmith.console import console, track
from lmsmith.data.annotate import Annotator, annotate_rows, score, write_conll
from lmsmith.data.augment import augment
from lmsmith.data.config import EMBEDDED, EMBEDDED_MODERATION, DataConfig
from lmsmith.data.engine import READ, Original, Source, Stream, run_stream, step_names, stream_options
from lmsmith.data.steps import build_ops
from lmsmith.data.quality import QualitySample, build_quality_report, summarise_for_manifest
from lmsmith.data.record import Record, check_row, corpus_row, instruction_row
from lmsmith.data.split import SPLITS
from lmsmith.data.synth import synthesize_table
from lmsmith.datasets.finance import FinanceDataset, generate
from lmsmith.errors import UserError
from lmsmith.jsonl import iter_jsonl, write_jsonl
from lmsmith.pipeline import StageContext, StageResult


# --------------------------------------------------------------------------------------------- sources


def embedded_sources(dataset: FinanceDataset) -> list[Source]:
    def documents():
        for doc in dataset.documents:
            yield doc.id, {"id": doc.id, "text": doc.text, "source": doc.source, "group": doc.group,
                           "noise": list(doc.noise)}

    return [Source(EMBEDDED, "corpus", rows=documents), _embedded_instructions(dataset)]


def _embedded_instructions(dataset: FinanceDataset) -> Source:
    def conversations():
        for item in dataset.instructions:  # deep copies: cleaning rewrites them
            yield item.id, {"id": item.id, "task": item.task, "group": item.group,
                            "messages": [dict(m) for m in item.messages], "answer": json.loads(json.dumps(item.answer))}

    return Source(EMBEDDED, "instructions", rows=conversations)


def sources(config: DataConfig, dataset: Optional[FinanceDataset]) -> list[Source]:
    """The corpus, then the instructions, then the synthesized tables' instructions, in that order."""
    found: list[Source] = []
    if config.corpus == EMBEDDED:
        assert dataset is not None
        found.append(embedded_sources(dataset)[0])
    else:
        found.append(Source(config.corpus, "corpus", path=Path(config.corpus), fmt="text", text_unit=config.text_unit))
    if config.instructions == EMBEDDED:
        assert dataset is not None
        found.append(_embedded_instructions(dataset))
    elif config.instructions == EMBEDDED_MODERATION:
        from lmsmith.datasets.moderation import generate as moderation_set

        rows = moderation_set(config.embedded.seed)
        found.append(Source(EMBEDDED_MODERATION, "instructions", rows=lambda: ((row["id"], row) for row in rows)))
    else:
        found.append(Source(config.instructions, "instructions", path=Path(config.instructions),
                            text_unit=config.text_unit))
    for table in config.synth_tables:
        found.append(Source(f"synth:{Path(table).name}", "instructions", rows=_synthesized(table, config)))
    return found


def _synthesized(table: str, config: DataConfig):
    def rows():
        for i, row in enumerate(synthesize_table(table, config.synth)):
            yield f"{table}:{i + 1}", {"id": f"synth-{i}", **row}

    return rows


# ---------------------------------------------------------------------------------------------- writer


class StageWriter:
    """Writes the stage's split files and dropped.jsonl, and counts the corpus's noise labels: read,
    dropped, repaired (an operator that resolves the label rewrote the document) or remaining."""

    def __init__(self, out_dir: Path, ops: list[dict[str, Any]], sample: Optional[QualitySample] = None):
        self.out_dir = out_dir
        self.resolves = {name: set(op.resolves) for name, op in zip(step_names(ops), build_ops(ops))}
        self.sample = sample
        self.files: dict[str, Any] = {}
        for prefix in ("corpus", "sft"):
            (out_dir / prefix).mkdir(parents=True, exist_ok=True)
            for split in SPLITS:
                self.files[f"{prefix}/{split}"] = open(out_dir / prefix / f"{split}.jsonl", "w", encoding="utf-8")
        self.files["dropped"] = open(out_dir / "dropped.jsonl", "w", encoding="utf-8")
        self.noise: dict[str, Counter] = {}
        self.documents = Counter()  # read / noisy / kept / kept_noisy / kept_unrepaired
        self.tasks: dict[str, Counter] = {}

    def _write(self, name: str, row: dict[str, Any]) -> None:
        self.files[name].write(json.dumps(row, ensure_ascii=False) + "\n")

    def _labels(self, record: Record) -> list[str]:
        return list((record.row or {}).get("noise") or []) if record.kind == "corpus" else []

    def keep(self, record: Record, split: str, modified: list[str], tags: list[str]) -> None:
        if record.kind == "corpus":
            row = corpus_row(record) | ({"tags": tags} if tags else {})
            self._write(f"corpus/{split}", row)
            labels = self._labels(record)
            repaired = set().union(*(self.resolves.get(step, set()) for step in modified)) if modified else set()
            self.documents.update(read=1, kept=1, noisy=bool(labels), kept_noisy=bool(labels),
                                  kept_unrepaired=any(label not in repaired for label in labels))
            for label in labels:
                self.noise.setdefault(label, Counter())["read"] += 1
                self.noise[label]["repaired" if label in repaired else "remaining"] += 1
        else:
            row = instruction_row(record) | ({"tags": tags} if tags else {})
            self._write(f"sft/{split}", row)
            self.tasks.setdefault(row["task"], Counter())[split] += 1
        if self.sample is not None and self.sample.holds(record):
            self.sample.after.append(self.sample.enrich(row, record) | {"modified_by": modified})

    def drop(self, record: Record, split: str, reason: str, detail: str, modified: list[str],
             original: Optional[Original]) -> None:
        row: dict[str, Any] = {"kind": record.kind, "id": record.id, "where": record.where, "split": split,
                               "reason": reason, "detail": detail}
        if reason == READ:  # malformed (on_error: skip): kept as it was read, counted nowhere else
            row["record"] = record.row if record.row is not None else record.raw
        elif record.kind == "corpus":
            labels = self._labels(record)
            row.update(text=record.row.get("text", ""), noise=labels)
            self.documents.update(read=1, noisy=bool(labels))
            for label in labels:
                self.noise.setdefault(label, Counter()).update(read=1, dropped=1)
        else:  # it passed the instruction check when read; the operators rewrite only its text
            row.update({key: value for key, value in instruction_row(record).items() if key in ("task", "messages")})
        self._write("dropped", row)
        if self.sample is not None and self.sample.holds(record):
            self.sample.dropped.append(row)

    def noise_report(self) -> dict[str, Any]:
        """Noise before and after cleaning, from the corpus's labels.

        - `rate_before`: labelled documents / documents read;
        - `rate_after`: labelled documents kept / documents kept;
        - `residual_rate_after`: kept documents still carrying a label no operator repaired / kept."""
        docs = self.documents
        return {
            "rate_before": _rate(docs["noisy"], docs["read"]),
            "rate_after": _rate(docs["kept_noisy"], docs["kept"]),
            "residual_rate_after": _rate(docs["kept_unrepaired"], docs["kept"]),
            "labels": {label: {key: counts[key] for key in ("read", "dropped", "repaired", "remaining")}
                       for label, counts in sorted(self.noise.items())},
        }

    def close(self) -> None:
        for handle in self.files.values():
            handle.close()


def _rate(part: int, whole: int) -> float:
    return round(part / whole, 4) if whole else 0.0


# ------------------------------------------------------------------------------------------------- run


def run(config: DataConfig, ctx: StageContext) -> StageResult:
    uses_embedded = EMBEDDED in (config.corpus, config.instructions)
    dataset = _embedded(config) if uses_embedded else None
    sample = QualitySample(config.quality.sample_size, dataset) if config.quality is not None else None
    writer = StageWriter(ctx.stage_dir, config.ops, sample)
    options = stream_options(config, config.on_error, config.split.ratios, config.split.seed)
    try:
        stream = run_stream(sources(config, dataset), options, writer, ctx.stage_dir / ".work",
                            observe=sample.observe if sample is not None else None)
    finally:
        writer.close()
    outputs = {f"{prefix}_{split}": f"{prefix}/{split}.jsonl" for prefix in ("corpus", "sft") for split in SPLITS}
    outputs["dropped"] = "dropped.jsonl"
    extra_metrics: dict[str, Any] = {}
    if config.quality is not None and sample is not None:
        report = build_quality_report(sample.before(), sample.after, sample.dropped, ctx.stage_dir / "quality",
                                      config.quality)
        outputs |= {f"quality_{kind}": f"quality/report.{kind}" for kind in ("json", "md", "html")}
        extra_metrics |= summarise_for_manifest(report)
    if config.augment is not None:
        extra_metrics["augment_added"] = augment_train(ctx.stage_dir / "sft" / "train.jsonl", config, ctx.stage_dir)
        if (ctx.stage_dir / "class_weights.json").exists():
            outputs["class_weights"] = "class_weights.json"
    stats = _stats(config, stream, writer)
    (ctx.stage_dir / "stats.json").write_text(json.dumps(stats, indent=2, ensure_ascii=False), encoding="utf-8")
    outputs["stats"] = "stats.json"

    metrics = _metrics(stats) | extra_metrics
    if config.annotate is not None:
        annotator = Annotator(config.annotate, company_names=[c.name for c in dataset.companies] if dataset else [])
        rows = [row for split in SPLITS for _, row in iter_jsonl(ctx.stage_dir / "sft" / f"{split}.jsonl")]
        write_conll(ctx.stage_dir / "entities.conll", annotate_rows(rows, annotator))
        outputs["entities"] = "entities.conll"
        if any(isinstance(row["answer"].get("entities"), list) for row in rows):
            scores = score(rows, annotator)
            metrics |= {f"entities_{key}": scores[key] for key in ("precision", "recall", "f1")}
    summary = (
        f"kept: corpus {metrics['corpus_kept']}/{metrics['corpus_read']}, "
        f"instructions {metrics['sft_kept']}/{metrics['sft_read']}"
    )
    if "noise_rate_before" in metrics:
        summary += f"; noise {metrics['noise_rate_before']:.1%} → {metrics['residual_noise_rate_after']:.1%}"
    console.print(summary)
    return StageResult(outputs=outputs, metrics=metrics)


def _embedded(config: DataConfig) -> FinanceDataset:
    with track("generating embedded:finance", total=1) as bar:
        dataset = generate(config.embedded.seed, config.embedded.companies, config.embedded.years)
        bar.advance()
    return dataset


def augment_train(train_file: Path, config: DataConfig, out_dir: Path) -> int:
    """Augment only the train split (read back from its file), so val/test stay untouched references;
    returns the number of rows added."""
    assert config.augment is not None
    rows = [row for _, row in iter_jsonl(train_file)]
    augmented, counts = augment(rows, config.augment, out_dir)
    written = []
    for i, row in enumerate(augmented):
        problem, fmt = check_row(row, "auto", "instructions")
        if problem is not None:
            raise UserError(f"augment:{i}: {problem}")
        written.append(instruction_row(Record(f"augment:{i}", {"id": row.get("id", f"aug-{i}"), **row}, fmt=fmt,
                                              kind="instructions")))
    write_jsonl(train_file, written)
    return counts["output"] - counts["input"]


def _stats(config: DataConfig, stream: Stream, writer: StageWriter) -> dict[str, Any]:
    sections: dict[str, Any] = {}
    for kind, source in (("corpus", config.corpus), ("instructions", config.instructions)):
        splits = {}
        for split in SPLITS:
            dropped_by = stream.dropped_by(kind, split)
            splits[split] = {"read": stream.read[(kind, split)], "kept": stream.kept[(kind, split)],
                             "dropped": sum(dropped_by.values()), "dropped_by": dropped_by}
        dropped_by = stream.dropped_by(kind)
        sections[kind] = {
            "source": source,
            "read": stream.total(stream.read, kind),
            "kept": stream.total(stream.kept, kind),
            "dropped": sum(dropped_by.values()),
            "dropped_by": dict(sorted(dropped_by.items())),
            "modified_by": dict(sorted((step, count) for (k, step), count in stream.modified.items() if k == kind)),
            "steps": stream.step_table(kind),
            "tags": {f"{step}:{tag}": count for (k, step, tag), count in sorted(stream.tags.items()) if k == kind},
            "splits": splits,
        }
    if writer.noise:
        sections["corpus"]["noise"] = writer.noise_report()
    sections["instructions"]["tasks"] = {task: {s: counts[s] for s in SPLITS} for task, counts in sorted(writer.tasks.items())}
    return {
        "ops": config.ops,
        "fitted": stream.fitted,
        "executor": {"kind": config.executor, "workers": config.workers},
        "split": {"ratios": list(config.split.ratios), "seed": config.split.seed, "groups": stream.groups},
        "corpus": sections["corpus"],
        "instructions": sections["instructions"],
        "shards": stream.shards,
    }


def _metrics(stats: dict[str, Any]) -> dict[str, Any]:
    """The flat numbers for the manifest and the report."""
    metrics: dict[str, Any] = {}
    for prefix, section in (("corpus", stats["corpus"]), ("sft", stats["instructions"])):
        for key in ("read", "kept", "dropped"):
            metrics[f"{prefix}_{key}"] = section[key]
        for split in SPLITS:
            metrics[f"{prefix}_{split}"] = section["splits"][split]["kept"]
        for reason, count in section["dropped_by"].items():
            metrics[f"{prefix}_dropped_{reason}"] = count
    noise = stats["corpus"].get("noise")
    if noise:
        metrics["noise_rate_before"] = noise["rate_before"]
        metrics["noise_rate_after"] = noise["rate_after"]
        metrics["residual_noise_rate_after"] = noise["residual_rate_after"]
    return metrics
