"""`lmsmith rag build|add|remove|search`: knowledge bases from the command line. The options are generated
from `KBConfig` and `SearchConfig`, so they match the Python API and recipes."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lmsmith.console import console


def add_rag_parser(sub) -> None:
    from lmsmith.cli_options import add_config_arguments
    from lmsmith.rag.config import KBConfig, SearchConfig
    from lmsmith.rag.grounding import RagSettings

    rag = sub.add_parser("rag", help="Knowledge bases over your documents: build, add, remove, search.")
    verbs = rag.add_subparsers(dest="rag_command", required=True)

    build = verbs.add_parser("build", help="Index documents (txt, md, html, jsonl, csv, pdf, docx; folders too) "
                             "into a new knowledge base.", description=KBConfig.__doc__)
    build.add_argument("docs", nargs="+", type=Path, help="Files or folders.")
    build.add_argument("--out", required=True, type=Path, help="The knowledge base folder (replaced if it is one).")
    add_config_arguments(build, KBConfig)
    build.set_defaults(func=_build)

    add = verbs.add_parser("add", help="Add or update documents by id; unchanged ones are not embedded again.")
    add.add_argument("kb", type=Path)
    add.add_argument("docs", nargs="+", type=Path)
    add.set_defaults(func=_add)

    remove = verbs.add_parser("remove", help="Remove documents by id, or every document of a source file.")
    remove.add_argument("kb", type=Path)
    remove.add_argument("ids", nargs="+")
    remove.set_defaults(func=_remove)

    ask = verbs.add_parser("ask", help="Answer a question from the knowledge base with a model, citing sources.",
                           description=RagSettings.__doc__)
    ask.add_argument("kb", type=Path)
    ask.add_argument("question")
    ask.add_argument("--model", required=True, help="A run folder, model folder or run:RUN#STAGE[/OUTPUT].")
    ask.add_argument("--max-new-tokens", type=int, default=256)
    ask.add_argument("--json", action="store_true", help="One JSON object: answer and citations.")
    add_config_arguments(ask, RagSettings)
    ask.set_defaults(func=_ask)

    search = verbs.add_parser("search", help="Print the chunks that best answer a query.",
                              description=SearchConfig.__doc__)
    search.add_argument("kb", type=Path)
    search.add_argument("query")
    search.add_argument("--json", action="store_true", help="One JSON object per hit instead of a table.")
    add_config_arguments(search, SearchConfig)
    search.set_defaults(func=_search)


def _report(change, folder: Path) -> None:
    console.print(f"[bold]{folder}[/]: {change.files_read} files read; documents: {change.documents_added} added, "
                  f"{change.documents_replaced} replaced, {change.documents_unchanged} unchanged, "
                  f"{change.documents_removed} removed; {change.chunks_added} chunks embedded", soft_wrap=True)
    for skipped in change.skipped or []:
        console.print(f"[yellow]skipped[/] {skipped.path}: {skipped.reason}", soft_wrap=True, highlight=False)


def _build(args: argparse.Namespace) -> int:
    from lmsmith.cli_options import config_from_arguments
    from lmsmith.rag.config import KBConfig
    from lmsmith.rag.kb import KnowledgeBase

    config = config_from_arguments(args, KBConfig, "lmsmith rag build")
    _, change = KnowledgeBase.build(args.docs, args.out, config)
    _report(change, args.out)
    return 0


def _add(args: argparse.Namespace) -> int:
    from lmsmith.rag.kb import KnowledgeBase

    _report(KnowledgeBase.open(args.kb).add(args.docs), args.kb)
    return 0


def _remove(args: argparse.Namespace) -> int:
    from lmsmith.rag.kb import KnowledgeBase

    _report(KnowledgeBase.open(args.kb).remove(args.ids), args.kb)
    return 0


def _ask(args: argparse.Namespace) -> int:
    """The same grounding as `lmsmith serve --kb`, on the in-process engine, greedy."""
    from lmsmith.cli_options import config_from_arguments
    from lmsmith.eval.suite import resolve_model_spec
    from lmsmith.rag.grounding import GroundedModel, RagSettings
    from lmsmith.serve.engine import Engine
    from lmsmith.serve.sampling import SamplingParams

    settings = config_from_arguments(args, RagSettings, "lmsmith rag ask")
    grounded = GroundedModel("ask", args.kb, settings)
    with console.status(f"loading {args.model}"):
        engine = Engine.load(resolve_model_spec(args.model))
    try:
        grounding = grounded.ground_now([{"role": "user", "content": args.question}], engine.tokenizer)
        if grounding.refusal is not None:
            answer = grounding.refusal
        else:
            prompt = engine.encode_chat(grounding.messages)
            answer = "".join(chunk.text for chunk in engine.stream_sync(
                prompt, SamplingParams(max_tokens=args.max_new_tokens, temperature=0.0)))
    finally:
        engine.close()
    if args.json:
        print(json.dumps({"answer": answer, "citations": grounding.citations}, ensure_ascii=False))
        return 0
    console.out(answer, highlight=False)
    for citation in grounding.citations:
        where = " / ".join([citation["title"] or citation["source"], *citation["title_path"]])
        console.print(f"[dim][{citation['index']}] {where} [{citation['start']}:{citation['end']}] "
                      f"score {citation['score']:.4f}[/]", highlight=False, soft_wrap=True)
    return 0


def _search(args: argparse.Namespace) -> int:
    from rich.table import Table

    from lmsmith.cli_options import config_from_arguments
    from lmsmith.rag.config import SearchConfig
    from lmsmith.rag.kb import KnowledgeBase

    settings = config_from_arguments(args, SearchConfig, "lmsmith rag search")
    hits = KnowledgeBase.open(args.kb).search(args.query, settings)
    if args.json:
        for hit in hits:
            print(json.dumps(hit.body(), ensure_ascii=False))
        return 0
    table = Table("#", "score", "source", "section", "text")
    for rank, hit in enumerate(hits, start=1):
        text = hit.chunk["text"].replace("\n", " ")
        table.add_row(str(rank), f"{hit.score:.4f}", f"{hit.chunk['source']} [{hit.chunk['start']}:{hit.chunk['end']}]",
                      " / ".join(hit.chunk["title_path"]), text[:160] + ("…" if len(text) > 160 else ""))
    console.print(table)
    if not hits:
        console.print("[yellow]no chunk matches[/]")
    return 0
