"""Figures and the two renderings of the 3C quality report.

matplotlib draws on the Agg canvas through `matplotlib.figure.Figure` (no pyplot, no global state);
the report stage's document model (`lmsmith.report.document`) writes the same sections as Markdown
(figures as PNG files in `figures/`) and as one self-contained HTML file (figures as base64 data URIs).
"""

from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path
from typing import Any

from lmsmith.data.quality.detectors import DETECTORS
from lmsmith.report.document import Bullets, Document, Image, Paragraph, Preformatted
from lmsmith.report.tables import Table

BEFORE, AFTER = "#8c959f", "#0969da"


def _png(figure: Any) -> bytes:
    figure.tight_layout()
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # Category values may be Chinese; the default font lacks those glyphs (boxes are drawn instead).
        warnings.filterwarnings("ignore", message="Glyph .* missing")
        figure.savefig(buffer, format="png")
    return buffer.getvalue()


def length_histogram_png(before: list[int], after: list[int], kind: str, bins: int) -> bytes:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 3.2), dpi=100)
    axes = figure.subplots()
    values = before + after
    edges = bins if not values else [min(values) + i * (max(values) - min(values) + 1) / bins for i in range(bins + 1)]
    if before:
        axes.hist(before, bins=edges, color=BEFORE, alpha=0.6, label=f"before ({len(before)})")
    if after:
        axes.hist(after, bins=edges, color=AFTER, alpha=0.6, label=f"after ({len(after)})")
    axes.set_title(f"{kind}: characters per record")
    axes.set_xlabel("characters (whitespace excluded)")
    axes.set_ylabel("records")
    axes.legend()
    axes.grid(alpha=0.3)
    return _png(figure)


def category_png(field: str, distribution: dict[str, Any]) -> bytes:
    from matplotlib.figure import Figure

    counts = distribution["counts"]
    names = list(counts)
    figure = Figure(figsize=(7, 0.9 + 0.28 * max(3, len(names))), dpi=100)
    axes = figure.subplots()
    head = set(distribution["head"])
    colors = [AFTER if name in head else "#cf222e" for name in names]
    axes.barh(names[::-1], [counts[name] for name in names][::-1], color=colors[::-1])
    axes.set_title(f"{field}: head (blue) and long tail (red), {distribution['tail_share']:.1%} of records in the tail")
    axes.set_xlabel("records")
    axes.grid(alpha=0.3, axis="x")
    return _png(figure)


def noise_png(before: dict[str, Any], after: dict[str, Any], kind: str) -> bytes:
    from matplotlib.figure import Figure

    names = [*DETECTORS, "any"]
    rates_before = [before["detectors"][name]["rate"] * 100 for name in names]
    rates_after = [after.get("detectors", {}).get(name, {}).get("rate", 0.0) * 100 for name in names]
    figure = Figure(figsize=(7, 3.4), dpi=100)
    axes = figure.subplots()
    positions = range(len(names))
    axes.bar([p - 0.2 for p in positions], rates_before, width=0.4, color=BEFORE, label="before")
    axes.bar([p + 0.2 for p in positions], rates_after, width=0.4, color=AFTER, label="after")
    axes.set_xticks(list(positions), names, rotation=30, ha="right")
    axes.set_ylabel("% of records")
    axes.set_title(f"{kind}: noise rate by detector")
    axes.legend()
    axes.grid(alpha=0.3, axis="y")
    return _png(figure)


def drop_reasons_png(reasons: dict[str, Any]) -> bytes:
    from matplotlib.figure import Figure

    names = list(reasons)
    figure = Figure(figsize=(7, 0.9 + 0.3 * max(3, len(names))), dpi=100)
    axes = figure.subplots()
    axes.barh(names[::-1], [reasons[name]["count"] for name in names][::-1], color="#cf222e")
    axes.set_title("dropped records by reason")
    axes.set_xlabel("records")
    axes.grid(alpha=0.3, axis="x")
    return _png(figure)


def _pct(value: float) -> str:
    return f"{value:.2%}"


def _build_document(report: dict[str, Any], images: dict[str, tuple[str, bytes]]) -> Document:
    summary = report["summary"]
    doc = Document(report["title"], subtitle=(
        f"{summary['records_before']} records before cleaning, {summary['records_after']} kept, "
        f"{summary['dropped']} dropped."
    ))

    overview = doc.section("Summary")
    table = Table(["measure", "value"], numeric=False)
    table.add("noise rate before (detectors, " + summary["headline_kind"] + ")", _pct(summary["noise_rate_before"]))
    table.add("noise rate after (detectors, " + summary["headline_kind"] + ")", _pct(summary["noise_rate_after"]))
    for key, label in (("labelled_noise_rate_before", "labelled noise before"),
                       ("labelled_residual_noise_rate_after", "labelled residual noise after"),
                       ("precision", "cleaning precision (repair)"), ("recall", "cleaning recall (repair)"),
                       ("strict_precision", "cleaning precision (strict)"), ("strict_recall", "cleaning recall (strict)")):
        if key in summary:
            value = summary[key]
            table.add(label, _pct(value) if "rate" in key else f"{value:.3f}")
    overview.blocks.append(table)
    overview.blocks.append(Bullets(summary["explanation"]))

    consistency = doc.section("Consistency")
    table = Table(["kind", "when", "records", "schema complete", "duplicate ids", "one number format", "growth answers consistent"])
    for when in ("before", "after"):
        for kind, section in report["consistency"][when].items():
            growth = section.get("growth_answers_consistent_rate")
            table.add(kind, when, section["records"], _pct(section["schema_complete_rate"]), section["duplicate_ids"],
                      _pct(section["one_number_format_rate"]),
                      "–" if growth is None else f"{_pct(growth)} of {section['growth_answers_checked']}")
    consistency.blocks.append(table)

    coverage = doc.section("Coverage")
    table = Table(["kind", "when", "count", "mean", "p50", "p90", "p99", "max"])
    for kind, stats in report["coverage"]["lengths"].items():
        for when in ("before", "after"):
            s = stats[when]
            if s["count"]:
                table.add(kind, when, s["count"], s["mean"], s["p50"], s["p90"], s["p99"], s["max"])
    coverage.blocks.append(Paragraph("Characters per record (whitespace excluded):"))
    coverage.blocks.append(table)
    for name, (caption, png) in images.items():
        if name.startswith("lengths_"):
            coverage.blocks.append(Image(f"figures/{name}.png", caption, png))
    for field, dists in report["coverage"]["categories"].items():
        after = dists["after"] or {}
        coverage.blocks.append(Paragraph(
            f"{field}: {len(dists['before']['counts'])} categories; head {', '.join(dists['before']['head'])}; "
            f"long tail {len(dists['before']['tail'])} categories holding {_pct(dists['before']['tail_share'])} of records "
            f"before and {_pct(after.get('tail_share', 0.0))} after; imbalance (largest/smallest) "
            f"{dists['before']['imbalance_ratio']}."
        ))
        if f"categories_{field}" in images:
            caption, png = images[f"categories_{field}"]
            coverage.blocks.append(Image(f"figures/categories_{field}.png", caption, png))
    terms = report["coverage"]["terms"]["after"]
    coverage.blocks.append(Paragraph(
        f"Domain terms: {terms['covered']} of {terms['terms']} ({_pct(terms['coverage'])}) appear in the kept records; "
        f"{_pct(terms['records_with_a_term_rate'])} of records hold at least one."
    ))
    top = Table(["term", "records"])
    for term, count in terms["top_terms"].items():
        top.add(term, count)
    coverage.blocks.append(top)
    if terms["missing_terms"]:
        coverage.blocks.append(Paragraph("Missing terms: " + ", ".join(terms["missing_terms"])))
    tagged = report["coverage"].get("tags") or {}
    if tagged:
        coverage.blocks.append(Paragraph("Kept records the operators tagged (rare_cluster: the long tail the "
                                         "coverage step found, candidates for oversampling):"))
        table = Table(["tag", "records", "share", "example"])
        for tag, entry in tagged.items():
            example = entry["examples"][0]["text"] if entry["examples"] else ""
            table.add(tag, entry["records"], _pct(entry["share"]), example)
        coverage.blocks.append(table)

    clean = doc.section("Cleanliness")
    cleanliness = report["cleanliness"]
    table = Table(["kind", "detector", "before", "after"])
    for kind, before in cleanliness["detectors"]["before"].items():
        after = cleanliness["detectors"]["after"].get(kind, {"detectors": {}})
        for name in [*DETECTORS, "any"]:
            b = before["detectors"][name]
            a = after["detectors"].get(name, {"count": 0, "rate": 0.0})
            table.add(kind, name, f"{b['count']} ({_pct(b['rate'])})", f"{a['count']} ({_pct(a['rate'])})")
    clean.blocks.append(table)
    for name, (caption, png) in images.items():
        if name.startswith("noise_"):
            clean.blocks.append(Image(f"figures/{name}.png", caption, png))

    labels = cleanliness.get("cleaning_vs_labels")
    if labels:
        clean.blocks.append(Paragraph(
            "Cleaning against the embedded noise labels: a record is flagged when it is dropped or rewritten "
            "(strict: any rewrite; repair: a rewrite by an operator other than the canonicalizers "
            + ", ".join(report["config"]["canonicalizers"]) + ")."
        ))
        table = Table(["reading", "precision", "recall", "F1", "TP", "FP", "FN"])
        for reading in ("repair", "strict"):
            r = labels[reading]
            table.add(reading, r["precision"], r["recall"], r["f1"], r["tp"], r["fp"], r["fn"])
        clean.blocks.append(table)
        table = Table(["flagged by", "records", "clean records flagged", "precision", "recall"])
        for op, counts in labels["by_op"].items():
            table.add(op, counts["flagged"], counts["clean_flagged"], counts["precision"], counts.get("recall", ""))
        clean.blocks.append(table)
        table = Table(["noise label", "records", "missed", "recall"])
        for label, counts in labels["by_label"].items():
            table.add(label, counts["records"], counts["missed"], counts["recall"])
        clean.blocks.append(table)
        detectors = cleanliness.get("detectors_vs_labels") or {}
        table = Table(["detector", "label", "precision", "recall"])
        for name, counts in detectors.items():
            table.add(name, counts["label"], counts["precision"], counts["recall"])
        clean.blocks.append(Paragraph("The detectors themselves, scored against the labels before cleaning:"))
        clean.blocks.append(table)

    drops = doc.section("Drop reasons")
    if "drop_reasons" in images:
        caption, png = images["drop_reasons"]
        drops.blocks.append(Image("figures/drop_reasons.png", caption, png))
    for reason, entry in cleanliness["drop_reasons"].items():
        drops.blocks.append(Paragraph(f"{reason}: {entry['count']} records."))
        if entry["examples"]:
            drops.blocks.append(Preformatted("\n".join(
                f"[{ex['id']}] {ex['detail']}\n    {ex['text']}" for ex in entry["examples"]
            )))
    if not cleanliness["drop_reasons"]:
        drops.blocks.append(Paragraph("Nothing was dropped."))
    residual = cleanliness["residual_examples"]
    if residual:
        left = doc.section("What cleaning left behind")
        for name, examples in residual.items():
            left.blocks.append(Paragraph(f"{name}:"))
            left.blocks.append(Preformatted("\n".join(f"[{ex['id']}] {ex['evidence']}\n    {ex['text']}" for ex in examples)))
    return doc


def render_report(
    report: dict[str, Any],
    lengths_before: dict[str, list[int]],
    lengths_after: dict[str, list[int]],
    out_dir: Path,
    config: Any,
) -> dict[str, str]:
    """Draw the figures, write report.md (+ figures/) and report.html; returns name → relative path."""
    logging.getLogger("matplotlib.font_manager").setLevel(logging.ERROR)
    images: dict[str, tuple[str, bytes]] = {}
    if config.plots:
        for kind in sorted(set(lengths_before) | set(lengths_after)):
            images[f"lengths_{kind}"] = (
                f"{kind}: length histogram before and after cleaning",
                length_histogram_png(lengths_before.get(kind, []), lengths_after.get(kind, []), kind, config.histogram_bins),
            )
        for field, dists in report["coverage"]["categories"].items():
            images[f"categories_{field}"] = (f"{field} distribution before cleaning", category_png(field, dists["before"]))
        detectors = report["cleanliness"]["detectors"]
        for kind, before in detectors["before"].items():
            images[f"noise_{kind}"] = (f"{kind}: noise rate by detector, before and after",
                                       noise_png(before, detectors["after"].get(kind, {}), kind))
        if report["cleanliness"]["drop_reasons"]:
            images["drop_reasons"] = ("dropped records by reason", drop_reasons_png(report["cleanliness"]["drop_reasons"]))

    doc = _build_document(report, images)
    files = {"json": "report.json", "markdown": "report.md", "html": "report.html"}
    if images:
        (out_dir / "figures").mkdir(parents=True, exist_ok=True)
        for image in doc.images:
            (out_dir / image.filename).write_bytes(image.png)
            files[Path(image.filename).stem] = image.filename
    (out_dir / "report.md").write_text(doc.to_markdown(), encoding="utf-8")
    (out_dir / "report.html").write_text(doc.to_html(), encoding="utf-8")
    return files
