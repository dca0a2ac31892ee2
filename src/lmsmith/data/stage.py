"""The data stage: read the corpus and the instructions, clean them with the recipe's operators, drop
exact and near duplicates (MinHash LSH; near copies across splits are leaks and leave val/test), split
them by group, and account for every record.

Outputs (names for `ctx.artifact("data", NAME)`):
- `corpus_{train,val,test}` → `corpus/{split}.jsonl`: `{"id", "text", "source", "noise"}` per line;
- `sft_{train,val,test}` → `sft/{split}.jsonl`: `{"id", "task", "messages", "answer"}` per line;
- `stats` → `stats.json`: read / kept / dropped per operator and per split, and the noise rates;
- `dropped` → `dropped.jsonl`: every dropped record with its `reason` (an operator name) and `detail`.

Only the standard library and the modules beside this one; the default embedded dataset runs end to
end in about a second.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Optional

from lmsmith.console import console, track
from lmsmith.data.cleaning import Ledger, clean, near_dedup, noise_report
from lmsmith.data.config import EMBEDDED, EMBEDDED_MODERATION, DataConfig
from lmsmith.data.annotate import Annotator, annotate_rows, score, write_conll
from lmsmith.data.augment import augment
from lmsmith.data.ops import build_ops
from lmsmith.data.quality import build_quality_report, summarise_for_manifest
from lmsmith.data.synth import synthesize_table
from lmsmith.data.readers import (
    embedded_conversations,
    embedded_documents,
    list_files,
    parse_instruction,
    read_corpus_file,
    read_instruction_file,
)
from lmsmith.data.records import Conversation, Document
from lmsmith.data.split import SPLITS, assign_groups
from lmsmith.datasets.finance import FinanceDataset, generate
from lmsmith.jsonl import write_jsonl
from lmsmith.pipeline import StageContext, StageResult


def _embedded(config: DataConfig) -> FinanceDataset:
    with track("generating embedded:finance", total=1) as bar:
        dataset = generate(config.embedded.seed, config.embedded.companies, config.embedded.years)
        bar.advance()
    return dataset


def read_documents(config: DataConfig, dataset: Optional[FinanceDataset]) -> list[Document]:
    if config.corpus == EMBEDDED:
        assert dataset is not None
        return embedded_documents(dataset)
    files = list_files(Path(config.corpus), (".jsonl", ".txt"))
    documents: list[Document] = []
    with track("reading corpus", total=len(files)) as bar:
        for file, name in files:
            documents.extend(read_corpus_file(file, name))
            bar.advance()
    return documents


def read_conversations(config: DataConfig, dataset: Optional[FinanceDataset]) -> list[Conversation]:
    if config.instructions == EMBEDDED:
        assert dataset is not None
        return embedded_conversations(dataset)
    if config.instructions == EMBEDDED_MODERATION:
        from lmsmith.datasets.moderation import generate as moderation_set

        return [Conversation(row["id"], row["task"], row["group"], row["messages"], row["answer"])
                for row in moderation_set(config.embedded.seed)]
    files = list_files(Path(config.instructions), (".jsonl",))
    conversations: list[Conversation] = []
    with track("reading instructions", total=len(files)) as bar:
        for file, name in files:
            conversations.extend(read_instruction_file(file, name))
            bar.advance()
    return conversations


def run(config: DataConfig, ctx: StageContext) -> StageResult:
    ops = build_ops(config.ops)
    uses_embedded = EMBEDDED in (config.corpus, config.instructions)
    dataset = _embedded(config) if uses_embedded else None
    documents = read_documents(config, dataset)
    conversations = read_conversations(config, dataset) + synthesized_conversations(config)
    # Cleaning rewrites records in place: the quality report needs them as they were read.
    before = _rows(documents, dataset) + _rows(conversations, dataset) if config.quality else []

    # One assignment over both kinds, so a company-year's documents and instructions share a split.
    split_of = assign_groups(
        [doc.group for doc in documents] + [conv.group for conv in conversations],
        config.split.ratios,
        config.split.seed,
    )
    corpus_ledger, sft_ledger = Ledger("corpus"), Ledger("instructions")
    corpus = clean(documents, ops, "corpus", split_of, config.exact_dedup, corpus_ledger)
    sft = clean(conversations, ops, "instructions", split_of, config.exact_dedup, sft_ledger)
    corpus = near_dedup(corpus, config.near_dedup, "corpus", corpus_ledger)
    sft = near_dedup(sft, config.near_dedup, "instructions", sft_ledger)

    outputs: dict[str, str] = {}
    extra_metrics: dict[str, Any] = {}
    if config.quality is not None:
        kept_rows = _rows([r for split in SPLITS for r in corpus[split]], dataset)
        kept_rows += _rows([r for split in SPLITS for r in sft[split]], dataset)
        report = build_quality_report(
            before, kept_rows, corpus_ledger.rows + sft_ledger.rows, ctx.stage_dir / "quality",
            config.quality.model_copy(update={"ops": config.ops}),
        )
        outputs |= {f"quality_{kind}": f"quality/report.{kind}" for kind in ("json", "md", "html")}
        extra_metrics |= summarise_for_manifest(report)
    if config.augment is not None:
        sft["train"], counts = augment_train(sft["train"], config, ctx.stage_dir)
        extra_metrics["augment_added"] = counts["output"] - counts["input"]
        if (ctx.stage_dir / "class_weights.json").exists():
            outputs["class_weights"] = "class_weights.json"
    with track("writing splits", total=2 * len(SPLITS) + 2) as bar:
        for split in SPLITS:
            for name, records in (("corpus", corpus), ("sft", sft)):
                relative = f"{name}/{split}.jsonl"
                write_jsonl(ctx.stage_dir / relative, (record.to_row() for record in records[split]))
                outputs[f"{name}_{split}"] = relative
                bar.advance()
        write_jsonl(ctx.stage_dir / "dropped.jsonl", corpus_ledger.rows + sft_ledger.rows)
        outputs["dropped"] = "dropped.jsonl"
        bar.advance()

        stats = _stats(config, split_of, corpus_ledger, sft_ledger, documents, corpus, sft)
        (ctx.stage_dir / "stats.json").write_text(json.dumps(stats, indent=2, ensure_ascii=False), encoding="utf-8")
        outputs["stats"] = "stats.json"
        bar.advance()

    metrics = _metrics(stats) | extra_metrics
    if config.annotate is not None:
        annotator = Annotator(config.annotate, company_names=_company_names(dataset))
        rows = [r.to_row() for split in SPLITS for r in sft[split]]
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


def synthesized_conversations(config: DataConfig) -> list[Conversation]:
    """Instructions computed from structured tables (`lmsmith.data.synth`), read like any instruction row."""
    conversations: list[Conversation] = []
    for table in config.synth_tables:
        rows = synthesize_table(table, config.synth)
        conversations += [parse_instruction(row, f"{table}:{i + 1}", f"synth-{i}") for i, row in enumerate(rows)]
    return conversations


def augment_train(train: list[Conversation], config: DataConfig, out_dir: Path) -> tuple[list[Conversation], dict]:
    """Augment only the train split, so val/test stay untouched references."""
    assert config.augment is not None
    rows = [conv.to_row() | {"group": conv.group} for conv in train]
    augmented, counts = augment(rows, config.augment, out_dir)
    return [parse_instruction(row, f"augment:{i}", f"aug-{i}") for i, row in enumerate(augmented)], counts


def _industry_of(dataset: Optional[FinanceDataset]) -> dict[str, str]:
    return {c.ticker: c.industry for c in dataset.companies} if dataset is not None else {}


def _company_names(dataset: Optional[FinanceDataset]) -> list[str]:
    return [c.name for c in dataset.companies] if dataset is not None else []


def _rows(records: Iterable[Document | Conversation], dataset: Optional[FinanceDataset]) -> list[dict[str, Any]]:
    """Plain rows for the quality report, with `group` and (embedded data) `industry` for its charts."""
    industry = _industry_of(dataset)
    rows = []
    for record in records:
        row = json.loads(json.dumps(record.to_row(), ensure_ascii=False)) | {"group": record.group}
        if record.group.split(":")[0] in industry:
            row["industry"] = industry[record.group.split(":")[0]]
        rows.append(row)
    return rows


def _stats(
    config: DataConfig,
    split_of: dict[str, str],
    corpus_ledger: Ledger,
    sft_ledger: Ledger,
    documents: list[Document],
    corpus: dict[str, list[Document]],
    sft: dict[str, list[Conversation]],
) -> dict[str, Any]:
    corpus_stats: dict[str, Any] = {"source": config.corpus, **corpus_ledger.summary()}
    if config.corpus == EMBEDDED or any(doc.noise for doc in documents):
        kept_docs = [doc for split in SPLITS for doc in corpus[split]]
        corpus_stats["noise"] = noise_report(documents, kept_docs)
    tasks: dict[str, dict[str, int]] = {}
    for split in SPLITS:
        for conv in sft[split]:
            tasks.setdefault(conv.task, {s: 0 for s in SPLITS})[split] += 1
    groups = {split: sum(1 for s in split_of.values() if s == split) for split in SPLITS}
    return {
        "ops": config.ops,
        "split": {"ratios": list(config.split.ratios), "seed": config.split.seed, "groups": groups},
        "corpus": corpus_stats,
        "instructions": {"source": config.instructions, **sft_ledger.summary(), "tasks": dict(sorted(tasks.items()))},
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
