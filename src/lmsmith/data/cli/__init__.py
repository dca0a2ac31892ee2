"""`lmsmith data ...`: clean, split and list operators from the command line (argparse).

`add_data_parser(subparsers)` adds the `data` command to the main `lmsmith` parser. The quality
commands (`report`, `augment`, ...) live in `lmsmith.data.cli.quality` and are added when it exists.
"""

from __future__ import annotations

import argparse
import types
import typing
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from lmsmith.errors import UserError


def load_pipeline(path: str | Path):
    """A pipeline YAML (`PipelineConfig` fields: ops, exact_dedup, near_dedup, ...) → the config; files it
    names resolve against its folder; a bad field is a `UserError` naming the file and the field."""
    from lmsmith.data.config import PipelineConfig

    path = Path(path)
    try:
        data: Any = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise UserError(f"{path}: cannot read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise UserError(f"{path}:{mark.line + 1 if mark else 1}: invalid YAML") from None
    if isinstance(data, list):
        data = {"ops": data}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping with 'ops' (or a list of operators)")
    try:
        return PipelineConfig.model_validate(data, context={"base_dir": path.parent})  # files beside the YAML
    except ValidationError as exc:
        problem = exc.errors()[0]
        field = ".".join(str(part) for part in problem["loc"])
        message = "unknown field" if problem["type"] == "extra_forbidden" else problem["msg"]
        raise UserError(f"{path}: {field}: {message.removeprefix('Value error, ')}") from None


def cmd_clean(args: argparse.Namespace) -> int:
    from lmsmith.data.config import PipelineConfig
    from lmsmith.data.clean import run_clean

    plan = load_pipeline(args.pipeline) if args.pipeline else PipelineConfig()
    if args.format:
        plan = plan.model_copy(update={"format": args.format})
    if args.workers < 1:
        raise UserError(f"--workers: must be at least 1, got {args.workers}")
    run_clean(args.input, args.out, plan, executor=args.executor, workers=args.workers, on_error=args.on_error)
    return 0


def _ratios(text: str) -> tuple[float, float, float]:
    parts = [p for p in text.replace(":", ",").split(",") if p.strip()]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected three numbers like 8:1:1 or 0.8,0.1,0.1, got {text!r}") from None
    if len(values) != 3 or sum(values) <= 0 or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected three non-negative numbers like 8:1:1, got {text!r}")
    total = sum(values)
    return (values[0] / total, values[1] / total, values[2] / total)


def cmd_split(args: argparse.Namespace) -> int:
    from lmsmith.data.config import NearDedupConfig
    from lmsmith.data.split import run_split

    near = NearDedupConfig(enabled=not args.no_leak_check, threshold=args.threshold, apply_to="both")
    run_split(args.input, args.out, args.ratios, args.seed, args.stratify, args.group, near)
    return 0


def describe_operators() -> list[dict[str, Any]]:
    """Every registered operator: name, kind, summary, and its parameters with defaults."""
    from lmsmith.data.steps import REGISTRY, op_kind

    listing = []
    for name, cls in sorted(REGISTRY.items()):
        params = []
        for field_name, info in cls.Config.model_fields.items():
            default = None if info.is_required() else info.get_default(call_default_factory=True)
            params.append({"name": field_name, "type": _type_name(info.annotation), "required": info.is_required(),
                           "default": default, "description": info.description or ""})
        doc = " ".join((cls.__doc__ or "").split())
        listing.append({"name": name, "kind": op_kind(cls), "summary": doc, "params": params})
    return listing


def _type_name(annotation: Any) -> str:
    """A parameter's type as a reader wants it: `InputPath` (an Annotated Path with its validator) is a
    `path`, so the catalog never prints a function's address."""
    if annotation is Path:
        return "path"
    if typing.get_origin(annotation) is typing.Annotated:
        base = typing.get_args(annotation)[0]
        return "path" if base is Path else _type_name(base)
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args:
        inner = [_type_name(arg) for arg in args if arg is not type(None)]
        return f"Optional[{', '.join(inner)}]"
    text = getattr(annotation, "__name__", None) if not args else None
    return text or str(annotation).replace("typing.", "")


def cmd_ops(args: argparse.Namespace) -> int:
    from lmsmith.console import console

    listing = describe_operators()
    if args.json:
        print(json.dumps(listing, indent=2, ensure_ascii=False, default=str))
        return 0
    for op in listing:
        console.print(f"[bold]{op['name']}[/bold] ({op['kind']}): {op['summary']}", soft_wrap=True)
        for param in op["params"]:
            default = "required" if param["required"] else f"default {json.dumps(param['default'], ensure_ascii=False, default=str)}"
            console.print(f"    {param['name']}: {param['type']}, {default}. {param['description']}", soft_wrap=True,
                          markup=False)
    return 0


def add_data_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `data clean|split|ops` (and the quality commands, when installed) to the `lmsmith` parser."""
    data = subparsers.add_parser("data", help="Clean, split and inspect datasets.")
    data_subparsers = data.add_subparsers(dest="data_command", required=True)

    clean = data_subparsers.add_parser(
        "clean", help="Run a cleaning pipeline: writes OUT/kept.jsonl, OUT/dropped.jsonl and OUT/manifest.json."
    )
    clean.add_argument("input", help="A jsonl/json/csv/parquet/txt/md file (optionally .gz) or a folder of them.")
    clean.add_argument("--out", required=True, help="Output folder.")
    clean.add_argument("--pipeline", help="Pipeline YAML: ops, exact_dedup, near_dedup, ... (default: the default chain).")
    clean.add_argument("--executor", choices=("local", "ray"), default="local", help="local processes or Ray Data.")
    clean.add_argument("--workers", type=int, default=1, help="Worker processes (local) or actors (ray).")
    clean.add_argument("--on-error", choices=("fail", "skip"), default="fail",
                       help="A malformed record stops the run (fail) or goes to dropped.jsonl (skip).")
    clean.add_argument("--format", choices=("auto", "text", "alpaca", "sharegpt", "messages"),
                       help="Record format (overrides the pipeline's; default auto-detect per record).")
    clean.set_defaults(func=cmd_clean)

    split = data_subparsers.add_parser(
        "split", help="Split records into OUT/{train,val,test}.jsonl, removing near-duplicate leaks between splits."
    )
    split.add_argument("input", help="A cleaned jsonl (or any readable input).")
    split.add_argument("--out", required=True, help="Output folder.")
    split.add_argument("--ratios", type=_ratios, default=(0.8, 0.1, 0.1), help="train:val:test, default 8:1:1.")
    split.add_argument("--seed", type=int, default=0)
    split.add_argument("--stratify", metavar="FIELD", help="Keep each value of this field in proportion in every split.")
    split.add_argument("--group", metavar="FIELD", help="Records sharing this field's value stay in one split.")
    split.add_argument("--threshold", type=float, default=0.8, help="Near-duplicate Jaccard threshold for leaks.")
    split.add_argument("--no-leak-check", action="store_true", help="Skip the near-duplicate leak check.")
    split.set_defaults(func=cmd_split)

    ops = data_subparsers.add_parser("ops", help="List the cleaning operators and their parameters.")
    ops.add_argument("--json", action="store_true", help="Machine-readable listing.")
    ops.set_defaults(func=cmd_ops)

    from lmsmith.data.cli.quality import add_quality_commands

    add_quality_commands(data_subparsers)
    return data
