"""The 3C data quality report — Consistency, Coverage, Cleanliness — as JSON, Markdown and HTML.

`build_quality_report(before, after, dropped, out_dir)` compares the records before cleaning with those
kept and those dropped (`dropped.jsonl` rows with a `reason`), and writes `report.json`, `report.md`
(figures as PNG files beside it) and a self-contained `report.html` (figures inlined as base64).

- **Consistency**: schema completeness, duplicate ids, one number format per record, and whether
  growth answers agree with the figures they show;
- **Coverage**: length distributions, the category distribution (task, industry, source) and its long
  tail, and the coverage of a domain term list (the shipped finance list or yours);
- **Cleanliness**: the noise rate by detector before and after cleaning (detectors in
  `lmsmith.data.quality.detectors`, written apart from the cleaning operators), examples of each drop
  reason and, where records carry `noise` labels (the embedded corpus), the cleaning chain's precision
  and recall against them.

The heavy lifting: `datasketch` (near duplicates), `matplotlib` (Agg figures), the report stage's
document model (`lmsmith.report.document`) for the two renderings; the rest is the standard library.
"""

from __future__ import annotations

import hashlib
import heapq
import json
from collections import Counter
from pathlib import Path
from typing import Any, Optional, Sequence

from pydantic import Field

from lmsmith.console import track
from lmsmith.data.quality.detectors import DETECTORS, detect_fragment, run_detectors
from lmsmith.data.quality.metrics import (
    REPAIRABLE_LABELS,
    category_distribution,
    consistency,
    detector_rates,
    detectors_vs_labels,
    length_stats,
    lengths,
    prf,
    rate,
    term_coverage,
)
from lmsmith.data.resources import read_term_list, resource_path
from lmsmith.data.record import Record, corpus_row, instruction_row, row_kind, row_text
from lmsmith.jsonl import write_json
from lmsmith.errors import UserError
from lmsmith.schema import StrictModel

class QualityConfig(StrictModel):
    """Settings of the 3C quality report."""

    terms: Optional[str] = Field(
        None, description="Domain term list (one term a line, # comments); default: the shipped finance list."
    )
    category_fields: list[str] = Field(
        default_factory=lambda: ["task", "industry", "source"],
        description="Record fields whose value distribution and long tail are reported (absent ones are skipped).",
    )
    head_share: float = Field(0.8, gt=0, le=1, description="The head: most frequent categories holding this share.")
    histogram_bins: int = Field(30, ge=5, le=200)
    fragment_min_chars: int = Field(60, ge=1, description="The fragment detector flags corpus texts shorter than this.")
    near_dup_threshold: float = Field(0.8, gt=0, lt=1, description="Estimated Jaccard for the near-duplicate detector.")
    shingle_size: int = Field(5, ge=2, le=20, description="Characters per shingle for MinHash.")
    num_perm: int = Field(128, ge=16, le=1024, description="MinHash permutations.")
    examples_per_reason: int = Field(3, ge=0, le=50)
    example_chars: int = Field(160, ge=20)
    sample_size: int = Field(
        20000, ge=100, description="Records the report looks at in detail (a fixed sample by hash of where "
        "each was read; every record when there are fewer). Counts and drop reasons are always exact.",
    )
    canonicalizers: list[str] = Field(
        default_factory=lambda: ["unicode_normalize", "normalize_numbers"],
        description="Mappers that rewrite every text into one canonical form; a change by them alone is not "
        "counted as flagging a record in the `repair` precision/recall.",
    )
    noise_target: float = Field(0.037, ge=0, le=1, description="Target: noise rate after cleaning at most this.")
    precision_target: float = Field(0.95, ge=0, le=1, description="Target: cleaning precision at least this.")
    plots: bool = True


# ------------------------------------------------------------------------------- cleaning vs the labels


def _key(row: dict[str, Any]) -> tuple[str, str]:
    return row_kind(row), str(row.get("id"))


def cleaning_vs_labels(
    before: Sequence[dict[str, Any]],
    after: Sequence[dict[str, Any]],
    dropped: Sequence[dict[str, Any]],
    after_verdicts: Sequence[dict[str, str]],
    config: QualityConfig,
) -> Optional[dict[str, Any]]:
    """`after` rows carry `modified_by`, the steps that rewrote them as the stream counted (a row without
    it, from files cleaned elsewhere, counts as rewritten by `unattributed` when its text changed)."""
    """The cleaning chain judged against the embedded noise labels (None when no row carries labels).

    A record is "flagged" by cleaning when it was dropped or rewritten; the truth is "it carries a noise
    label". Two readings of "rewritten" are reported:
    - `strict`: any change at all;
    - `repair`: a change by an operator other than the `canonicalizers` (which rewrite clean texts too,
      so their changes say nothing about noise).
    `by_op` says how often each operator flags a clean record (what hurts precision) and, as `recall`, the
    share of all labelled noisy records it flagged (what each step, a model-based one included, adds; a
    record goes to the step that dropped it, or to every step that rewrote it); `by_label` how often each
    kind of noise goes unflagged (what hurts recall).
    """
    labelled = [row for row in before if isinstance(row.get("noise"), list)]
    if not any(row["noise"] for row in labelled):
        return None
    kept = {_key(row): row for row in after}
    reasons = {_key(row): str(row.get("reason", "unknown")) for row in dropped}
    verdict_of = {_key(row): verdict for row, verdict in zip(after, after_verdicts)}
    canonical = set(config.canonicalizers)

    strict, repair = Counter(), Counter()
    by_op: dict[str, Counter] = {}
    by_label: dict[str, Counter] = {}
    unaccounted = residual = 0
    before_text = {_key(row): row_text(row) for row in labelled}
    with track("scoring cleaning against labels", total=len(labelled)) as bar:
        for row in labelled:
            key, noisy = _key(row), bool(row["noise"])
            if key in reasons:
                flaggers = [f"drop:{reasons[key]}"]
                strict_flag = repair_flag = True
            elif key in kept:
                changed = _modified_by(kept[key], before_text[key])
                flaggers = [name for name in changed if name.split("#")[0] not in canonical]
                strict_flag, repair_flag = bool(changed), bool(flaggers)
                residual += _still_noisy(row["noise"], verdict_of.get(key, {}), kept[key], config)
            else:
                unaccounted += 1
                bar.advance()
                continue
            for counts, flag in ((strict, strict_flag), (repair, repair_flag)):
                counts["tp" if flag and noisy else "fp" if flag else "fn" if noisy else "tn"] += 1
            for name in flaggers:
                by_op.setdefault(name, Counter())["noisy" if noisy else "clean"] += 1
            for label in row["noise"]:
                by_label.setdefault(label, Counter())["caught" if repair_flag else "missed"] += 1
            bar.advance()

    kept_labelled = sum(1 for row in labelled if _key(row) in kept)
    noisy_total = sum(1 for row in labelled if row["noise"])
    return {
        "records": len(labelled),
        "labelled_noisy": sum(1 for row in labelled if row["noise"]),
        "rate_before": rate(sum(1 for row in labelled if row["noise"]), len(labelled)),
        "labelled_rate_after": rate(sum(1 for row in labelled if row["noise"] and _key(row) in kept), kept_labelled),
        "residual_rate_after": rate(residual, kept_labelled),
        "strict": {**prf(strict["tp"], strict["fp"], strict["fn"]), "tn": strict["tn"]},
        "repair": {**prf(repair["tp"], repair["fp"], repair["fn"]), "tn": repair["tn"]},
        "by_op": {
            name: {"flagged": c["noisy"] + c["clean"], "clean_flagged": c["clean"],
                   "precision": rate(c["noisy"], c["noisy"] + c["clean"]),
                   "recall": rate(c["noisy"], noisy_total)}
            for name, c in sorted(by_op.items())
        },
        "by_label": {
            label: {"records": c["caught"] + c["missed"], "missed": c["missed"],
                    "recall": rate(c["caught"], c["caught"] + c["missed"])}
            for label, c in sorted(by_label.items())
        },
        "unaccounted": unaccounted,
    }


def _modified_by(kept_row: dict[str, Any], text_before: str) -> list[str]:
    steps = kept_row.get("modified_by")
    if isinstance(steps, list):
        return [str(step) for step in steps]
    return ["unattributed"] if row_text(kept_row) != text_before else []


def _still_noisy(labels: list[str], verdict: dict[str, str], kept_row: dict[str, Any], config: QualityConfig) -> bool:
    """Does a kept record still carry one of its labels? A repairable label (html, pii, ...) counts
    while its detector still fires on the cleaned text; a duplicate or a fragment always counts, since
    only dropping removes it (a fragment that grew past the fragment detector is the exception)."""
    for label in labels:
        if label in REPAIRABLE_LABELS:
            if REPAIRABLE_LABELS[label] in verdict:
                return True
        elif label == "fragment":
            if detect_fragment(row_text(kept_row), config.fragment_min_chars) is not None:
                return True
        else:
            return True
    return False


# ----------------------------------------------------------------------------------------------- report


def _drop_examples(dropped: Sequence[dict[str, Any]], config: QualityConfig) -> dict[str, Any]:
    reasons: dict[str, dict[str, Any]] = {}
    for row in dropped:
        reason = str(row.get("reason", "unknown"))
        entry = reasons.setdefault(reason, {"count": 0, "examples": []})
        entry["count"] += 1
        if len(entry["examples"]) < config.examples_per_reason:
            text = row_text(row)
            entry["examples"].append({
                "id": row.get("id"),
                "detail": row.get("detail", ""),
                "text": text[:config.example_chars] + ("…" if len(text) > config.example_chars else ""),
            })
    return dict(sorted(reasons.items(), key=lambda kv: -kv[1]["count"]))


def _targets(summary: dict[str, Any], labels: Optional[dict[str, Any]], config: QualityConfig) -> dict[str, Any]:
    noise_after = summary["labelled_residual_noise_rate_after"] if labels else summary["noise_rate_after"]
    targets: dict[str, Any] = {
        "noise_after": {"value": noise_after, "max": config.noise_target, "met": noise_after <= config.noise_target,
                        "measure": "labelled residual noise" if labels else "detector noise"},
    }
    if labels:
        precision = labels["repair"]["precision"]
        targets["precision"] = {"value": precision, "min": config.precision_target,
                                "met": precision >= config.precision_target, "measure": "repair"}
        targets["strict_precision"] = {"value": labels["strict"]["precision"], "min": config.precision_target,
                                       "met": labels["strict"]["precision"] >= config.precision_target,
                                       "measure": "strict"}
    return targets


def explain_targets(report: dict[str, Any]) -> list[str]:
    """Plain sentences on each target: met or not, and which operator or noise kind is to blame."""
    lines = []
    targets = report["summary"]["targets"]
    labels = report["cleanliness"].get("cleaning_vs_labels")
    noise = targets["noise_after"]
    verdict = "met" if noise["met"] else "missed"
    lines.append(f"Noise after cleaning ({noise['measure']}): {noise['value']:.2%} (target ≤ {noise['max']:.1%}): {verdict}.")
    if labels:
        missed = {label: c for label, c in labels["by_label"].items() if c["missed"]}
        if missed:
            worst = ", ".join(f"{label} ({c['missed']}/{c['records']} missed)"
                              for label, c in sorted(missed.items(), key=lambda kv: -kv[1]["missed"]))
            lines.append(f"Noise the chain leaves unflagged: {worst}.")
        for name in ("precision", "strict_precision"):
            target = targets[name]
            verdict = "met" if target["met"] else "missed"
            lines.append(f"Cleaning precision ({target['measure']}): {target['value']:.3f} (target ≥ {target['min']}): {verdict}.")
        culprits = {op: c for op, c in labels["by_op"].items() if c["clean_flagged"]}
        strict_culprits = [op for op in report["config"]["canonicalizers"]]
        if not targets["strict_precision"]["met"]:
            lines.append(
                "Strict precision counts every rewrite as a flag; the canonicalizers "
                f"({', '.join(strict_culprits)}) rewrite clean records too (number and width normalisation), "
                "so they, not a noise detector, pull it down."
            )
        if culprits:
            worst = ", ".join(f"{op} ({c['clean_flagged']} clean records)" for op, c in culprits.items())
            lines.append(f"Operators flagging clean records: {worst}.")
    return lines


def build_quality_report(
    before_records: Sequence[dict[str, Any]],
    after_records: Sequence[dict[str, Any]],
    dropped_records: Sequence[dict[str, Any]],
    out_dir: str | Path,
    config: Optional[QualityConfig] = None,
    title: str = "Data quality report (3C)",
) -> dict[str, Any]:
    """Compute the 3C report, write report.json / report.md / report.html (and figures/) into `out_dir`,
    and return the report as a dict. Rows are the data stage's: corpus `{"id", "text", ...}` and
    conversations `{"id", "task", "messages", "answer"}`; dropped rows carry a `reason`."""
    from lmsmith.data.quality.render import render_report

    config = config or QualityConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    before, after, dropped = list(before_records), list(after_records), list(dropped_records)
    for name, rows in (("before", before), ("after", after), ("dropped", dropped)):
        bad = next((i for i, row in enumerate(rows) if not isinstance(row, dict)), None)
        if bad is not None:
            raise UserError(f"{name} record {bad}: expected a JSON object, got {type(rows[bad]).__name__}")
    terms = read_term_list(config.terms) if config.terms else read_term_list(resource_path("finance_terms.txt"))

    detector_args = (config.fragment_min_chars, config.near_dup_threshold, config.shingle_size, config.num_perm)
    before_verdicts = run_detectors(before, *detector_args, description="detecting noise (before)")
    after_verdicts = run_detectors(after, *detector_args, description="detecting noise (after)")

    rates_before = detector_rates(before, before_verdicts, DETECTORS)
    rates_after = detector_rates(after, after_verdicts, DETECTORS)
    headline_kind = "corpus" if "corpus" in rates_before else next(iter(rates_before), "corpus")
    labels = cleaning_vs_labels(before, after, dropped, after_verdicts, config)

    lengths_before, lengths_after = lengths(before), lengths(after)
    categories = {}
    for field in config.category_fields:
        dist_before = category_distribution(before, field, config.head_share)
        if dist_before is not None:
            categories[field] = {"before": dist_before, "after": category_distribution(after, field, config.head_share)}

    summary: dict[str, Any] = {
        "records_before": len(before),
        "records_after": len(after),
        "dropped": len(dropped),
        "reconciles": len(before) == len(after) + len(dropped),
        "headline_kind": headline_kind,
        "noise_rate_before": rates_before.get(headline_kind, {}).get("detectors", {}).get("any", {}).get("rate", 0.0),
        "noise_rate_after": rates_after.get(headline_kind, {}).get("detectors", {}).get("any", {}).get("rate", 0.0),
    }
    if labels:
        summary["labelled_noise_rate_before"] = labels["rate_before"]
        summary["labelled_residual_noise_rate_after"] = labels["residual_rate_after"]
        summary["precision"] = labels["repair"]["precision"]
        summary["recall"] = labels["repair"]["recall"]
        summary["strict_precision"] = labels["strict"]["precision"]
        summary["strict_recall"] = labels["strict"]["recall"]
    summary["targets"] = _targets(summary, labels, config)

    report: dict[str, Any] = {
        "title": title,
        "config": config.model_dump(mode="json"),
        "summary": summary,
        "consistency": {"before": consistency(before, before_verdicts), "after": consistency(after, after_verdicts)},
        "coverage": {
            "lengths": {
                kind: {"before": length_stats(lengths_before.get(kind, [])),
                       "after": length_stats(lengths_after.get(kind, []))}
                for kind in sorted(set(lengths_before) | set(lengths_after))
            },
            "categories": categories,
            "terms": {"before": term_coverage(before, terms), "after": term_coverage(after, terms)},
            "tags": _tagged(after, config),
        },
        "cleanliness": {
            "detectors": {"before": rates_before, "after": rates_after},
            "drop_reasons": _drop_examples(dropped, config),
            "detectors_vs_labels": detectors_vs_labels(before, before_verdicts) if labels else None,
            "cleaning_vs_labels": labels,
            "residual_examples": _residual_examples(after, after_verdicts, config),
        },
    }
    report["summary"]["explanation"] = explain_targets(report)
    files = render_report(report, lengths_before, lengths_after, out_dir, config)
    report["files"] = files
    write_json(out_dir / "report.json", report)
    return report


def _tagged(after: Sequence[dict[str, Any]], config: QualityConfig) -> dict[str, Any]:
    """Kept records the operators tagged (`coverage`'s rare clusters, candidates for oversampling; amounts
    left approximate): how many, their share and a few examples."""
    found: dict[str, dict[str, Any]] = {}
    for row in after:
        for tag in row.get("tags") or []:
            entry = found.setdefault(str(tag), {"records": 0, "examples": []})
            entry["records"] += 1
            if len(entry["examples"]) < config.examples_per_reason:
                text = row_text(row)
                entry["examples"].append({"id": row.get("id"), "text": text[:config.example_chars]
                                          + ("…" if len(text) > config.example_chars else "")})
    for entry in found.values():
        entry["share"] = rate(entry["records"], len(after))
    return dict(sorted(found.items()))


def _residual_examples(after: Sequence[dict[str, Any]], verdicts: Sequence[dict[str, str]], config: QualityConfig) -> dict[str, list]:
    """A few kept records each detector still flags: what cleaning left behind."""
    examples: dict[str, list] = {}
    for row, verdict in zip(after, verdicts):
        for name, evidence in verdict.items():
            bucket = examples.setdefault(name, [])
            if len(bucket) < config.examples_per_reason:
                text = row_text(row)
                bucket.append({"id": row.get("id"), "evidence": evidence,
                               "text": text[:config.example_chars] + ("…" if len(text) > config.example_chars else "")})
    return dict(sorted(examples.items()))


# ------------------------------------------------------------------------------ the embedded corpus


def embedded_rows(seed: int = 0, companies: int = 60, years: int = 5,
                  ops: Optional[list[dict[str, Any]]] = None) -> tuple[list, list, list]:
    """(before, after, dropped) rows for the embedded finance dataset cleaned by `ops` (default: the data
    stage's default chain) through the data pipeline, exact dedup on, no near dedup, no split. Rows carry
    `group` and `industry`, so the report can show the industry distribution."""
    import tempfile

    from lmsmith.data.config import PipelineConfig
    from lmsmith.data.steps import DEFAULT_OPS
    from lmsmith.data.stage import StageWriter, embedded_sources
    from lmsmith.data.engine import run_stream, stream_options
    from lmsmith.datasets.finance import generate

    dataset = generate(seed, companies, years)
    plan = PipelineConfig(ops=[dict(spec) for spec in (ops or DEFAULT_OPS)], near_dedup={"enabled": False})
    sample = QualitySample(10**9, dataset)
    with tempfile.TemporaryDirectory() as work:
        writer = StageWriter(Path(work) / "out", plan.ops, sample)
        try:
            run_stream(embedded_sources(dataset), stream_options(plan), writer, Path(work) / "stream",
                       observe=sample.observe)
        finally:
            writer.close()
    return sample.before(), sample.after, sample.dropped


class QualitySample:
    """The records the report looks at: up to `size` of them, chosen by a hash of where each was read (so
    the same records whatever the executor or batch size), seen before cleaning and after it."""

    def __init__(self, size: int, dataset: Any = None):
        self.size = size
        self._heap: list[tuple[int, str]] = []  # (-hash, key): the largest hash on top, evicted first
        self._before: dict[str, str] = {}
        self.after: list[dict[str, Any]] = []
        self.dropped: list[dict[str, Any]] = []
        self._industry = {c.ticker: c.industry for c in dataset.companies} if dataset is not None else {}

    @staticmethod
    def _key(record: Record) -> str:
        return f"{record.kind}|{record.where}"

    def observe(self, record: Record) -> None:
        if record.row is None or record.error is not None:  # a malformed row is only a drop with reason `read`
            return
        key = self._key(record)
        digest = int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little")
        if len(self._heap) >= self.size and digest >= -self._heap[0][0]:
            return
        row = corpus_row(record) if record.kind == "corpus" else instruction_row(record)
        self._before[key] = json.dumps(self.enrich(row, record), ensure_ascii=False)
        heapq.heappush(self._heap, (-digest, key))
        if len(self._heap) > self.size:
            _, evicted = heapq.heappop(self._heap)
            del self._before[evicted]

    def enrich(self, row: dict[str, Any], record: Record) -> dict[str, Any]:
        row = {**row, "group": record.group}
        if record.group.split(":")[0] in self._industry:
            row["industry"] = self._industry[record.group.split(":")[0]]
        return row

    def holds(self, record: Record) -> bool:
        return self._key(record) in self._before

    def before(self) -> list[dict[str, Any]]:
        """The sampled rows as read, in reading order."""
        return [json.loads(self._before[key]) for key in self._before]


def summarise_for_manifest(report: dict[str, Any]) -> dict[str, Any]:
    """The flat numbers a manifest or a stage's metrics should carry."""
    summary = report["summary"]
    keys = ("records_before", "records_after", "dropped", "noise_rate_before", "noise_rate_after",
            "labelled_noise_rate_before", "labelled_residual_noise_rate_after", "precision", "recall",
            "strict_precision", "strict_recall")
    flat = {f"quality_{key}": summary[key] for key in keys if key in summary}
    flat.update({f"quality_target_{name}_met": target["met"] for name, target in summary["targets"].items()})
    return flat
