"""Two cheap stand-in stages for testing the pipeline's bookkeeping without models."""

from __future__ import annotations

import json
from collections import Counter

from lmsmith.pipeline import StageResult

CALLS: Counter = Counter()


def run_data(config, ctx):
    CALLS["data"] += 1
    corpus = config.corpus
    text = open(corpus, encoding="utf-8").read() if not corpus.startswith("embedded:") else corpus
    out = ctx.stage_dir / "corpus.txt"
    out.write_text(f"{text}|companies={config.embedded.companies}", encoding="utf-8")
    return StageResult(outputs={"corpus": "corpus.txt"}, metrics={"chars": len(text)})


def run_tokenizer(config, ctx):
    CALLS["tokenizer"] += 1
    corpus = ctx.artifact("data", "corpus").read_text(encoding="utf-8")
    folder = ctx.stage_dir / "tokenizer"
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps(sorted(set(corpus))[: config.vocab_size]))
    return StageResult(outputs={"tokenizer": "tokenizer"}, metrics={"vocab": len(set(corpus))})
