"""The `lmsmith` command line. Each subcommand validates into the same pydantic models as recipes."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from lmsmith.errors import UserError
from lmsmith.stages import STAGE_NAMES


def _cmd_run(args: argparse.Namespace) -> int:
    from lmsmith.console import console
    from lmsmith.pipeline import run_pipeline
    from lmsmith.recipe import load_recipe

    recipe = load_recipe(args.recipe, overrides=args.set)
    run_dir = Path(args.out or Path("runs") / recipe.name)
    manifests = run_pipeline(recipe, run_dir, start=args.start, only=args.only)
    report = manifests.get("report")
    if report is not None and "html" in report.outputs:
        console.print(str(report.output_path(run_dir / "report", "html").resolve()), soft_wrap=True)
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from lmsmith.serve.api import serve_forever
    from lmsmith.serve.config import ServeConfig

    config = ServeConfig(host=args.host, port=args.port, max_new_tokens=args.max_new_tokens)
    serve_forever(args.path, config)
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    from lmsmith.serve.chat import chat_loop

    chat_loop(args.path, max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmsmith", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="Run a recipe's stages (skipping those already up to date).")
    run.add_argument("recipe", help="Recipe YAML file.")
    run.add_argument("--out", help="Run folder (default: runs/<recipe name>).")
    run.add_argument("--from", dest="start", metavar="STAGE", help=f"Rerun from this stage on: {', '.join(STAGE_NAMES)}.")
    run.add_argument("--only", metavar="STAGE", help="Rerun only this stage.")
    run.add_argument(
        "--set", action="append", default=[], metavar="KEY.PATH=VALUE",
        help="Override a recipe field, e.g. --set sft.method.r=8 (repeatable; values are YAML).",
    )
    run.set_defaults(func=_cmd_run)

    serve = sub.add_parser("serve", help="Serve a run folder or model folder with an OpenAI-compatible API.")
    serve.add_argument("path", help="A run folder (serves its tuned model) or an HF model folder.")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--max-new-tokens", type=int, default=256, help="Default max_tokens per request.")
    serve.set_defaults(func=_cmd_serve)

    chat = sub.add_parser("chat", help="Chat with a run folder's or model folder's model in the terminal.")
    chat.add_argument("path")
    chat.add_argument("--max-new-tokens", type=int, default=256)
    chat.add_argument("--temperature", type=float, default=0.0)
    chat.set_defaults(func=_cmd_chat)

    from lmsmith.data.cli import add_data_parser

    add_data_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
