"""`lmsmith data report | augment | annotate | synth`: the command-line faces of the quality report,
augmentation, annotation and synthesis (argparse; each command validates into the same pydantic configs
a recipe uses, and writes `manifest.json` with its counts next to its outputs).

`lmsmith.data.cli` calls `add_quality_commands(data_subparsers)` to attach them under `lmsmith data`.
Every input may be a jsonl file or `embedded:finance` (the embedded dataset, generated on the spot).
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

from pydantic import BaseModel, ValidationError

from lmsmith.errors import UserError

EMBEDDED = "embedded:finance"
M = TypeVar("M", bound=BaseModel)


def _config(cls: type[M], **values: Any) -> M:
    """Build a config from CLI values; a validation error names the option."""
    try:
        return cls.model_validate({k: v for k, v in values.items() if v is not None})
    except ValidationError as exc:
        problem = exc.errors()[0]
        option = "--" + str(problem["loc"][0]).replace("_", "-") if problem["loc"] else cls.__name__
        raise UserError(f"{option}: {problem['msg']}") from None


def _write_manifest(out: Path, command: str, args: argparse.Namespace, counts: dict[str, Any],
                    outputs: dict[str, str], started: float, **extra: Any) -> None:
    from lmsmith.jsonl import write_json

    # A secret never lands in a manifest.
    inputs = {k: ("***" if k == "api_key" and v else v) for k, v in vars(args).items()
              if k not in ("func", "out") and not callable(v)}
    extra = {k: _redact(v) for k, v in extra.items()}
    write_json(out / "manifest.json", {
        "command": f"lmsmith data {command}",
        "inputs": {k: (str(v) if isinstance(v, Path) else v) for k, v in inputs.items()},
        "counts": counts,
        "outputs": outputs,
        **extra,
        "wall_time_s": round(time.time() - started, 3),
        "versions": {"python": platform.python_version()},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    })


def _redact(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: ("***" if k == "api_key" and v else _redact(v)) for k, v in value.items()}
    return value


def _read_inputs(paths: list[str]) -> list[dict[str, Any]]:
    from lmsmith.jsonl import read_jsonl

    rows: list[dict[str, Any]] = []
    for path in paths:
        rows.extend(read_jsonl(path))
    return rows


def _embedded_instructions(args: argparse.Namespace) -> list[dict[str, Any]]:
    from lmsmith.data.quality import embedded_rows

    before, _, _ = embedded_rows(args.seed, args.companies, args.years)
    return [row for row in before if "messages" in row]


def _add_embedded_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(f"{EMBEDDED} size")
    group.add_argument("--seed", type=int, default=0, help="Seed of the embedded dataset and of random choices.")
    group.add_argument("--companies", type=int, default=60)
    group.add_argument("--years", type=int, default=5)


# --------------------------------------------------------------------------------------------- report


def _cmd_report(args: argparse.Namespace) -> int:
    from lmsmith.console import console
    from lmsmith.data.quality import QualityConfig, build_quality_report, embedded_rows

    started = time.time()
    config = _config(QualityConfig, terms=args.terms, near_dup_threshold=args.near_dup_threshold,
                     plots=not args.no_plots)
    if args.before == [EMBEDDED] and not args.after:
        before, after, dropped = embedded_rows(args.seed, args.companies, args.years)
    else:
        if not args.after:
            raise UserError("--after: give the cleaned records (kept.jsonl or split files) to compare with --before")
        if EMBEDDED in args.before:
            raise UserError(f"--before: {EMBEDDED} is cleaned by the default chain; leave out --after/--dropped for it")
        before, after = _read_inputs(args.before), _read_inputs(args.after)
        dropped = _read_inputs(args.dropped) if args.dropped else []
    out = Path(args.out)
    report = build_quality_report(before, after, dropped, out, config)
    for line in report["summary"]["explanation"]:
        console.print(line)
    counts = {"read": len(before), "kept": len(after), "dropped": len(dropped)}
    _write_manifest(out, "report", args, counts, report["files"], started, summary={
        k: v for k, v in report["summary"].items() if k not in ("explanation",)
    })
    console.print(str((out / "report.html").resolve()), soft_wrap=True)
    return 0


# -------------------------------------------------------------------------------------------- augment


def _cmd_augment(args: argparse.Namespace) -> int:
    from lmsmith.console import console
    from lmsmith.data.augment import (
        AugmentConfig,
        BackTranslationConfig,
        EdaConfig,
        OversampleConfig,
        augment,
        parse_target,
    )
    from lmsmith.jsonl import write_jsonl

    started = time.time()
    rows = _embedded_instructions(args) if args.inputs == [EMBEDDED] else _read_inputs(args.inputs)
    eda = None
    if args.eda:
        operations = args.operations.split(",") if args.operations else None
        eda = _config(EdaConfig, synonyms=args.synonyms, protect=args.protect, operations=operations,
                      num_aug=args.num_aug, alpha=args.alpha, p_delete=args.p_delete, seed=args.seed)
    back_translation = None
    if args.back_translate:
        if not args.base_url or not args.model:
            raise UserError("--back-translate needs --base-url and --model")
        back_translation = _config(BackTranslationConfig, base_url=args.base_url, model=args.model,
                                   api_key=args.api_key, pivot_language=args.pivot,
                                   source_language=args.source_language, max_tokens=args.max_tokens)
    oversample = None
    if args.oversample:
        oversample = _config(OversampleConfig, field=args.oversample, target=parse_target(args.target),
                             max_factor=args.max_factor, diversify=args.diversify, seed=args.seed)
    if not (eda or back_translation or oversample):
        raise UserError("nothing to do: pass --eda, --back-translate and/or --oversample FIELD")
    config = AugmentConfig(eda=eda, back_translation=back_translation, oversample=oversample)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result, counts = augment(rows, config, out)
    write_jsonl(out / "augmented.jsonl", result)
    outputs = {"augmented": "augmented.jsonl"}
    if oversample:
        outputs["class_weights"] = "class_weights.json"
    weights = counts.pop("class_weights", None)
    _write_manifest(out, "augment", args, counts, outputs, started, config=config.model_dump(mode="json"),
                    **({"class_weights": weights} if weights else {}))
    console.print(f"{counts['input']} records in, {counts['output']} out → {out / 'augmented.jsonl'}")
    return 0


# ------------------------------------------------------------------------------------------- annotate


def _cmd_annotate(args: argparse.Namespace) -> int:
    from lmsmith.console import console
    from lmsmith.data.annotate import AnnotateConfig, Annotator, annotate_rows, embedded_company_names, score, write_conll
    from lmsmith.jsonl import write_json, write_jsonl

    started = time.time()
    config = _config(AnnotateConfig, companies=args.companies_file, metrics=args.metrics, text=args.text)
    names: list[str] = []
    if args.inputs == [EMBEDDED]:
        rows = [row for row in _embedded_instructions(args) if row.get("task") == "entities"]
        names = embedded_company_names(args.seed, args.companies, args.years)
    else:
        rows = _read_inputs(args.inputs)
    annotator = Annotator(config, company_names=names)
    annotated = annotate_rows(rows, annotator)
    out = Path(args.out)
    write_jsonl(out / "annotations.jsonl", annotated)
    write_conll(out / "entities.conll", annotated)
    outputs = {"annotations": "annotations.jsonl", "conll": "entities.conll"}
    counts: dict[str, Any] = {
        "records": len(rows),
        "entities": sum(len(r["entities"]) for r in annotated),
        "entities_by_type": {},
    }
    for record in annotated:
        for entity in record["entities"]:
            counts["entities_by_type"][entity["type"]] = counts["entities_by_type"].get(entity["type"], 0) + 1
    scores = None
    if any(isinstance((row.get("answer") or {}).get("entities"), list) for row in rows):
        scores = score(rows, annotator)
        write_json(out / "scores.json", scores)
        outputs["scores"] = "scores.json"
        console.print(f"entity P/R/F1 (seqeval): {scores['precision']:.3f} / {scores['recall']:.3f} / {scores['f1']:.3f}")
    _write_manifest(out, "annotate", args, counts, outputs, started, **({"scores": scores} if scores else {}))
    return 0


# ---------------------------------------------------------------------------------------------- synth


def _cmd_synth(args: argparse.Namespace) -> int:
    from collections import Counter

    from lmsmith.console import console
    from lmsmith.jsonl import write_jsonl
    from lmsmith.data.synth import SynthConfig, synthesize_table, write_embedded_table

    started = time.time()
    out = Path(args.out)
    config = _config(SynthConfig, company_field=args.company_field, year_field=args.year_field, unit=args.unit,
                     tasks=args.tasks.split(",") if args.tasks else None, metrics=args.metrics,
                     ratios=args.ratios, seed=args.seed)
    table = args.table
    if table == EMBEDDED:
        table = write_embedded_table(out / "table.csv", args.seed, args.companies, args.years)
    rows = synthesize_table(table, config)
    write_jsonl(out / "synth.jsonl", rows)
    counts = {"samples": len(rows), "by_task": dict(sorted(Counter(r["task"] for r in rows).items())),
              "company_years": len({r["group"] for r in rows})}
    outputs = {"samples": "synth.jsonl", **({"table": "table.csv"} if args.table == EMBEDDED else {})}
    _write_manifest(out, "synth", args, counts, outputs, started, config=config.model_dump(mode="json"))
    console.print(f"{len(rows)} samples → {out / 'synth.jsonl'}")
    return 0


# ---------------------------------------------------------------------------------------------- parser


def add_quality_commands(data_subparsers: "argparse._SubParsersAction") -> None:
    """Attach `report`, `augment`, `annotate` and `synth` to the `lmsmith data` subcommands."""
    report = data_subparsers.add_parser(
        "report", help="3C quality report (consistency, coverage, cleanliness) as JSON, Markdown and HTML.")
    report.add_argument("--before", nargs="+", default=[EMBEDDED], metavar="JSONL",
                        help=f"Records before cleaning (default: {EMBEDDED}, cleaned here by the default chain).")
    report.add_argument("--after", nargs="+", metavar="JSONL", help="Records kept by cleaning (kept.jsonl or split files).")
    report.add_argument("--dropped", nargs="+", metavar="JSONL", help="dropped.jsonl (rows with a 'reason').")
    report.add_argument("--out", required=True, help="Output folder.")
    report.add_argument("--terms", help="Domain term list (one a line); default: the shipped finance list.")
    report.add_argument("--near-dup-threshold", type=float, default=None)
    report.add_argument("--no-plots", action="store_true", help="Leave the figures out.")
    _add_embedded_options(report)
    report.set_defaults(func=_cmd_report)

    aug = data_subparsers.add_parser("augment", help="EDA, back-translation and long-tail oversampling.")
    aug.add_argument("inputs", nargs="+", metavar="INPUT", help=f"jsonl records, or {EMBEDDED} (its instructions).")
    aug.add_argument("--out", required=True)
    aug.add_argument("--eda", action="store_true", help="Add EDA variants.")
    aug.add_argument("--num-aug", type=int, default=None, help="EDA variants per record (default 4).")
    aug.add_argument("--operations", help="EDA operations, comma-separated: synonym,insert,swap,delete.")
    aug.add_argument("--synonyms", help="Synonym YAML (default: the shipped finance list).")
    aug.add_argument("--protect", help="Words EDA never deletes or swaps (one a line).")
    aug.add_argument("--alpha", type=float, default=None)
    aug.add_argument("--p-delete", type=float, default=None)
    aug.add_argument("--back-translate", action="store_true", help="Add back-translated variants.")
    aug.add_argument("--base-url", help="OpenAI-compatible API root, e.g. http://127.0.0.1:8000/v1.")
    aug.add_argument("--model", help="Model name sent to the endpoint.")
    aug.add_argument("--api-key", help="Bearer token (default: $OPENAI_API_KEY).")
    aug.add_argument("--pivot", default=None, help="Pivot language (default English).")
    aug.add_argument("--source-language", default=None, help="Language of the records (default Chinese).")
    aug.add_argument("--max-tokens", type=int, default=None)
    aug.add_argument("--oversample", metavar="FIELD", help="Oversample the long tail of this field (e.g. task).")
    aug.add_argument("--target", default="uniform", help="'uniform' or 'name=share,...'.")
    aug.add_argument("--max-factor", type=float, default=None)
    aug.add_argument("--diversify", action="store_true", help="Pass oversampled copies through EDA.")
    _add_embedded_options(aug)
    aug.set_defaults(func=_cmd_augment)

    ann = data_subparsers.add_parser("annotate", help="BIO entity tags (company, metric, amount, date), CoNLL export, seqeval scores.")
    ann.add_argument("inputs", nargs="+", metavar="INPUT", help=f"jsonl records, or {EMBEDDED} (its entity samples).")
    ann.add_argument("--out", required=True)
    ann.add_argument("--companies-file", help="Company gazetteer (one name a line).")
    ann.add_argument("--metrics", help="Metric dictionary YAML (default: the shipped metrics.yaml).")
    ann.add_argument("--text", default=None, help="Field to tag (default: text, or the last user turn).")
    _add_embedded_options(ann)
    ann.set_defaults(func=_cmd_annotate)

    syn = data_subparsers.add_parser("synth", help="Instruction samples (report, YoY, ratio) from a company × year × metric table.")
    syn.add_argument("table", metavar="TABLE", help=f"csv, json or jsonl table, or {EMBEDDED} (its statements).")
    syn.add_argument("--out", required=True)
    syn.add_argument("--company-field", default=None)
    syn.add_argument("--year-field", default=None)
    syn.add_argument("--unit", default=None, help="Unit of the amount columns: yuan, wan or yi.")
    syn.add_argument("--tasks", help="Comma-separated: report,yoy,ratio (default all).")
    syn.add_argument("--metrics", help="Metric dictionary YAML.")
    syn.add_argument("--ratios", help="Ratio definitions YAML.")
    _add_embedded_options(syn)
    syn.set_defaults(func=_cmd_synth)


def build_parser() -> argparse.ArgumentParser:
    """A stand-alone `data` parser holding only these commands (for tests and `python -m`)."""
    parser = argparse.ArgumentParser(prog="lmsmith data")
    add_quality_commands(parser.add_subparsers(dest="data_command", required=True))
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.func
    try:
        return handler(args)
    except UserError as exc:
        print(f"error: {exc}")
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
