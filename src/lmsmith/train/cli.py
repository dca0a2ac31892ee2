"""`lmsmith train`: run a recipe's training stages (pretrain, sft) through the pipeline.

The help text lists every training method with its fields, generated from the pydantic method configs
in `method_config.py`, so it cannot drift from what a recipe accepts.
"""

from __future__ import annotations

import argparse
import textwrap
import types
import typing
from pathlib import Path

from pydantic import BaseModel

from lmsmith.errors import UserError

TRAIN_STAGES = ("pretrain", "sft")


def _type_name(annotation) -> str:
    """A short readable form of a field's type: int, str | None, one of: a, b."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return "one of: " + ", ".join(str(arg) for arg in args)
    if origin in (typing.Union, types.UnionType):
        parts = [_type_name(arg) for arg in args if arg is not type(None)]
        return " | ".join(parts) + (" | null" if type(None) in args else "")
    if origin in (list, tuple):
        return f"list of {_type_name(args[0])}" if args else "list"
    return getattr(annotation, "__name__", str(annotation))


def describe_config(cls: type[BaseModel], indent: str = "    ") -> str:
    """One block per config class: `name: first docstring paragraph`, then each field with type,
    default and description."""
    doc = " ".join((cls.__doc__ or "").split())
    name = cls.model_fields["name"].default if "name" in cls.model_fields else cls.__name__
    lines = textwrap.wrap(f"{name}: {doc}", width=100, subsequent_indent=indent)
    for field_name, field in cls.model_fields.items():
        if field_name == "name":
            continue
        default = "required" if field.is_required() else f"default {field.default!r}"
        text = f"{field_name} ({_type_name(field.annotation)}; {default})"
        if field.description:
            text += f": {field.description}"
        lines.extend(textwrap.wrap(text, width=100, initial_indent=indent + "  ", subsequent_indent=indent + "    "))
    return "\n".join(lines)


def methods_help() -> str:
    from lmsmith.train.method_config import METHOD_CLASSES, DistillationConfig, PrivacyConfig

    blocks = ["training methods (recipe: sft.method: {name: NAME, FIELD: VALUE, ...}; default lora):", ""]
    blocks.extend(describe_config(cls) + "\n" for cls in METHOD_CLASSES)
    blocks.append("objective and privacy blocks:\n")
    for title, cls in (("distill", DistillationConfig), ("privacy", PrivacyConfig)):
        blocks.append(describe_config(cls).replace(f"{cls.__name__}:", f"{title}:", 1) + "\n")
    blocks.append(
        "examples:\n"
        "  lmsmith train recipes/finance-demo.yaml --stage sft --set sft.method.name=dora --set sft.method.r=8\n"
        "  lmsmith train recipes/finance-demo.yaml --stage sft --set 'sft.method={name: freeze, last_n_layers: 2}'\n"
        "  lmsmith train recipes/finance-demo.yaml --resume"
    )
    return "\n".join(blocks)


def resume_value(text: str):
    """`--resume` alone means a checkpoint must exist; `--resume=auto` resumes when there is one."""
    if text != "auto":
        raise argparse.ArgumentTypeError(f"expected --resume or --resume=auto, got --resume={text}")
    return "auto"


def apply_resume(recipe, resume, stages: list[str], run_dir: Path) -> None:
    """Set `resume` on the named training stages of the recipe (those it holds).

    `--resume` insists on a checkpoint, but only one stage is ever interrupted: the stages that have a
    checkpoint resume strictly, the others (finished before, or not yet started) as `auto`, and it is
    an error only when none of them has one.
    """
    from pydantic import ValidationError

    from lmsmith.recipe import format_validation_error
    from lmsmith.train.checkpoint import checkpoint_root, latest_checkpoint

    present = [stage for stage in stages if getattr(recipe, stage) is not None]
    for stage in present:  # a setting that cannot resume at all (DP-SGD) is the first thing to say
        try:
            setattr(getattr(recipe, stage), "resume", "auto")
        except ValidationError as exc:
            raise UserError(format_validation_error(f"--resume ({stage})", exc)) from None
    if resume is True:
        interrupted = [stage for stage in present if latest_checkpoint(checkpoint_root(run_dir, stage))]
        if not interrupted:
            raise UserError(f"--resume: no checkpoint of {' or '.join(present) or 'a training stage'} in "
                            f"{run_dir / '.checkpoints'}; nothing to resume from (--resume=auto starts afresh)")
        for stage in interrupted:
            getattr(recipe, stage).resume = True


def add_resume_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--resume", nargs="?", const=True, default=None, type=resume_value, metavar="auto",
        help="Continue the interrupted training stage from its last checkpoint (an error when no training "
        "stage has one; --resume=auto starts afresh then); finished stages are not rerun.")


def _cmd_train(args: argparse.Namespace) -> int:
    from lmsmith.pipeline import run_pipeline
    from lmsmith.recipe import load_recipe

    recipe = load_recipe(args.recipe, overrides=args.set)
    stages = [args.stage] if args.stage else [stage for stage in TRAIN_STAGES if getattr(recipe, stage) is not None]
    if args.stage and getattr(recipe, args.stage) is None:
        raise UserError(f"--stage {args.stage}: the recipe has no {args.stage} block")
    run_dir = Path(args.out or Path("runs") / recipe.name)
    if args.resume is not None:
        apply_resume(recipe, args.resume, stages, run_dir)
        # Resuming reruns nothing that finished: up-to-date stages are skipped, not forced.
        run_pipeline(recipe, run_dir, stages=stages)
        return 0
    for stage in stages:
        run_pipeline(recipe, run_dir, only=stage)
    return 0


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    """Register `lmsmith train` on the top-level subparsers."""
    parser = subparsers.add_parser(
        "train",
        help="Run a recipe's training stages (pretrain, then sft) with any training method.",
        description="Run the pretrain and/or sft stage of a recipe. Upstream stages (data, tokenizer) must "
        "already be in the run folder (lmsmith run RECIPE --only data, ...).",
        epilog=methods_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("recipe", help="Recipe YAML file.")
    parser.add_argument("--stage", choices=TRAIN_STAGES, help="Run only this stage (default: pretrain, then sft).")
    add_resume_argument(parser)
    parser.add_argument("--out", help="Run folder (default: runs/<recipe name>).")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY.PATH=VALUE",
        help="Override a recipe field, e.g. --set sft.method.r=8 (repeatable; values are YAML).",
    )
    parser.set_defaults(func=_cmd_train)
    return parser
