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

    from lmsmith.train.cli import TRAIN_STAGES, apply_resume

    recipe = load_recipe(args.recipe, overrides=args.set)
    run_dir = Path(args.out or Path("runs") / recipe.name)
    if args.resume is not None:
        apply_resume(recipe, args.resume, list(TRAIN_STAGES), run_dir)
    manifests = run_pipeline(recipe, run_dir, start=args.start, only=args.only)
    report = manifests.get("report")
    if report is not None and "html" in report.outputs:
        console.print(str(report.output_path(run_dir / "report", "html").resolve()), soft_wrap=True)
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from lmsmith.cli_options import config_from_arguments
    from lmsmith.serve.api import serve_forever
    from lmsmith.rag.grounding import RagSettings
    from lmsmith.serve.config import PushBack, ServeConfig

    def named_paths(items: list[str], flag: str) -> dict[str, str]:
        found: dict[str, str] = {}
        for item in items:
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                raise UserError(f"{flag} {item!r}: expected NAME=PATH")
            found[name] = path
        return found

    loras = named_paths(args.lora, "--lora")
    upstreams = [url.strip() for group in args.upstream for url in group.split(",") if url.strip()]
    if bool(args.path) + bool(upstreams) + bool(args.registry) != 1:
        raise UserError("lmsmith serve: give one of a model/run folder, --registry NAME or --upstream URL[,URL...], "
                        "not both")
    fields = {
        "host": args.host, "port": args.port, "max_new_tokens": args.max_new_tokens, "device": args.device,
        "dtype": args.dtype, "max_slots": args.max_slots, "max_model_len": args.max_model_len,
        "prefill_chunk": args.prefill_chunk, "cuda_graphs": args.cuda_graphs,
        "packed_weights": args.packed_weights, "loras": loras, "variant": args.variant, "registry": args.registry, "upstreams": upstreams, "tokenizer": args.tokenizer,
        "health_check_interval_s": args.health_interval, "embedding_model": args.embedding_model,
        "push_back": config_from_arguments(args, PushBack, "lmsmith serve").model_dump(),
        "kbs": named_paths(args.kb, "--kb"),
        "rag": config_from_arguments(args, RagSettings, "lmsmith serve", prefix="rag").model_dump(),
        "cache": {"backend": args.cache, "max_entries": args.cache_size, "ttl_s": args.cache_ttl,
                  "redis_url": args.redis_url},
        "long_doc": {"auto": args.long_doc_auto, "max_input_tokens": args.long_doc_threshold,
                     "chunk_tokens": args.chunk_tokens, "overlap": args.chunk_overlap},
    }
    try:
        config = ServeConfig.model_validate(fields)
    except ValidationError as exc:
        problem = exc.errors()[0]
        where = ".".join(str(part) for part in problem["loc"])
        raise UserError(f"lmsmith serve: {where}: {problem['msg']}") from None
    from lmsmith.gateway.config import GatewayConfig

    serve_forever(args.path, config, config_from_arguments(args, GatewayConfig, "lmsmith serve"))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from lmsmith.cli_options import config_from_arguments
    from lmsmith.train.export_run import ExportConfig, export_run

    export_run(config_from_arguments(args, ExportConfig, "lmsmith export", positional=("run",)))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from lmsmith.cli_options import config_from_arguments
    from lmsmith.eval.suite import SuiteConfig, run_suite

    run_suite(config_from_arguments(args, SuiteConfig, "lmsmith eval"))
    return 0


def _cmd_eval_curve(args: argparse.Namespace) -> int:
    from lmsmith.cli_options import config_from_arguments
    from lmsmith.eval.curve import CurveConfig, run_curve

    run_curve(config_from_arguments(args, CurveConfig, "lmsmith eval curve", positional=("run",)))
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
    from lmsmith.train.cli import add_resume_argument

    add_resume_argument(run)
    run.set_defaults(func=_cmd_run)

    serve = sub.add_parser("serve", help="Serve a run folder or model folder with an OpenAI-compatible API.")
    serve.add_argument("path", nargs="?", help="A run folder (serves its tuned model) or an HF model folder.")
    serve.add_argument("--variant", help="Serve the run's compressed variant of this name (RUN/compress/<name>).")
    serve.add_argument("--registry", metavar="NAME", help="Serve NAME's current registry version and follow "
                       "promotes and rollbacks without a restart (`lmsmith registry`).")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--max-new-tokens", type=int, default=256, help="Default max_tokens per request.")
    serve.add_argument("--device", default="auto", help="torch device (auto: cuda when present).")
    serve.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    serve.add_argument("--max-slots", type=int, help="Requests decoding at once (default: 16 on CPU, 256 on CUDA).")
    serve.add_argument("--max-model-len", type=int, help="Longest prompt + answer (default: the model's).")
    serve.add_argument("--prefill-chunk", type=int, default=256, help="Largest prompt piece per engine step.")
    serve.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                       help="Run decode steps eagerly on CUDA.")
    serve.add_argument("--packed-weights", action=argparse.BooleanOptionalAction, default=None,
                       help="On CPU, keep a row-kernel copy of every projection (faster decode, the projections' "
                            "memory again); default: when it fits in half the free memory.")
    serve.add_argument("--lora", action="append", default=[], metavar="NAME=PATH",
                       help="Load a peft adapter at start; requests select it with model=NAME (repeatable).")
    serve.add_argument("--kb", action="append", default=[], metavar="NAME=FOLDER",
                       help="Serve model NAME: answers grounded in the knowledge base FOLDER (`lmsmith rag build`), "
                            "with citations (repeatable).")
    serve.add_argument("--upstream", action="append", default=[], metavar="URL[,URL...]",
                       help="Front these OpenAI-compatible servers instead of loading a model (repeatable).")
    serve.add_argument("--health-interval", type=float, default=5.0, help="Upstream health checks, seconds.")
    serve.add_argument("--tokenizer", help="Upstream mode: tokenizer folder for long_doc chunking.")
    serve.add_argument("--cache", default="none", choices=["none", "memory", "redis"],
                       help="Response cache for deterministic requests (temperature 0 or a seed).")
    serve.add_argument("--cache-size", type=int, default=4096, help="Memory cache: most answers kept.")
    serve.add_argument("--cache-ttl", type=float, default=3600.0, help="Seconds a cached answer stays valid.")
    serve.add_argument("--redis-url", default="redis://127.0.0.1:6379/0", help="Redis cache: server URL.")
    serve.add_argument("--long-doc-auto", action="store_true",
                       help="Map-reduce inputs over the context window instead of refusing them.")
    serve.add_argument("--long-doc-threshold", type=int, metavar="TOKENS",
                       help="With --long-doc-auto: also map-reduce inputs longer than this.")
    serve.add_argument("--chunk-tokens", type=int, default=512, help="long_doc chunk size in tokens.")
    serve.add_argument("--chunk-overlap", type=int, default=64, help="long_doc overlap between chunks, tokens.")
    serve.add_argument("--embedding-model", default="minilm",
                       help="/v1/embeddings model: minilm (bundled), a sentence-transformers folder, or none.")
    from lmsmith.cli_options import add_config_arguments
    from lmsmith.gateway.config import GatewayConfig
    from lmsmith.serve.config import PushBack

    add_config_arguments(serve.add_argument_group("push-back: limits that answer 413/408/503 (docs/serving.md)"),
                         PushBack)
    from lmsmith.rag.grounding import RagSettings

    add_config_arguments(serve.add_argument_group("rag: how --kb models answer (docs/rag.md)"), RagSettings,
                         prefix="rag")
    add_config_arguments(serve.add_argument_group("gateway: keys, roles, limits (docs/security.md)"), GatewayConfig)
    serve.set_defaults(func=_cmd_serve)

    from lmsmith.gateway.cli import add_audit_parser, add_feedback_parser, add_keys_parser, add_registry_parser

    add_keys_parser(sub)
    add_audit_parser(sub)
    add_registry_parser(sub)
    add_feedback_parser(sub)

    from lmsmith.rag.cli import add_rag_parser

    add_rag_parser(sub)

    from lmsmith.train.export_run import ExportConfig

    export = sub.add_parser("export", help="Export a run's tuned model: merged HF folder, peft adapter, or a "
                            "vLLM-loadable adapter.", description=ExportConfig.__doc__)
    add_config_arguments(export, ExportConfig, positional=("run",))
    export.set_defaults(func=_cmd_export)

    from lmsmith.eval.suite import SuiteConfig

    evaluate = sub.add_parser("eval", help="Score local models on eval tasks (YAML): multiple choice by "
                              "log-likelihood or generation, generation against references.",
                              description=SuiteConfig.__doc__)
    add_config_arguments(evaluate, SuiteConfig)
    evaluate.set_defaults(func=_cmd_eval)

    from lmsmith.eval.curve import CurveConfig

    # `lmsmith eval curve ...` is routed here by `main` (eval's own options leave no room for a subcommand).
    curve = sub.add_parser("eval-curve", help="lmsmith eval curve RUN: train sft on 10/25/50/100%% of "
                           "the run's data with a fixed step budget; plot every metric against the data size.",
                           description=CurveConfig.__doc__, prog="lmsmith eval curve")
    add_config_arguments(curve, CurveConfig, positional=("run",))
    curve.set_defaults(func=_cmd_eval_curve)

    chat = sub.add_parser("chat", help="Chat with a run folder's or model folder's model in the terminal.")
    chat.add_argument("path")
    chat.add_argument("--max-new-tokens", type=int, default=256)
    chat.add_argument("--temperature", type=float, default=0.0)
    chat.set_defaults(func=_cmd_chat)

    from lmsmith.data.cli import add_data_parser
    from lmsmith.train.cli import add_train_parser

    add_data_parser(sub)
    add_train_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["eval", "curve"]:
        argv = ["eval-curve", *argv[2:]]
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
