"""The tokenizer stage: train a byte-level BPE, WordPiece or char tokenizer on the cleaned corpus and/or
the instructions (`train_on`), or extend an existing tokenizer (and model) with domain vocabulary mined
from corpus_train only.

HF `tokenizers` trains (see `bpe.py`), jieba mines domain terms (see `extend.py`); the result is saved as
a transformers tokenizer folder with the ChatML template, loadable with `AutoTokenizer.from_pretrained`.
Fertility and the unknown-token rate on corpus_val are reported (before and after, when extending).
"""

from __future__ import annotations

from pathlib import Path

from lmsmith.console import console, track
from lmsmith.errors import UserError
from lmsmith.pipeline import StageContext, StageResult
from lmsmith.tokenizer.bpe import train_tokenizer
from lmsmith.tokenizer.chat import ensure_chat_template
from lmsmith.tokenizer.config import ExtendConfig, TokenizerConfig
from lmsmith.tokenizer.extend import extend_model_embeddings, extend_tokenizer, mine_terms, read_term_list
from lmsmith.tokenizer.metrics import fit_report
from lmsmith.tokenizer.records import read_conversations, read_corpus_texts

OUTPUT_DIR = "tokenizer"
MODEL_DIR = "model"
TERMS_FILE = "added_terms.txt"


def training_texts(ctx: StageContext, train_on: list[str]) -> list[str]:
    """Corpus documents and/or every message of the training instructions (prompts and answers).

    Only the sources in `train_on` are read, so a DP recipe's instructions never reach the vocabulary."""
    texts: list[str] = []
    if "corpus" in train_on:
        texts.extend(read_corpus_texts(ctx.artifact("data", "corpus_train")))
    if "instructions" in train_on:
        for conversation in read_conversations(ctx.artifact("data", "sft_train")):
            texts.extend(message["content"] for message in conversation)
    return texts


def _shown(value: float | None) -> str:
    return f"{value:.4f}" if value is not None else "n/a"


def train_new(config: TokenizerConfig, ctx: StageContext, val_texts: list[str]) -> StageResult:
    texts = training_texts(ctx, config.train_on)
    if not any(texts):
        files = {"corpus": "corpus_train", "instructions": "sft_train"}
        read = " or ".join(files[source] for source in dict.fromkeys(config.train_on))
        raise UserError(f"data: no text to train a tokenizer on in {read} (tokenizer.train_on: "
                        f"{', '.join(config.train_on)})")
    with track(f"train {config.kind} tokenizer", total=1) as progress:
        tokenizer = train_tokenizer(config.kind, texts, config.vocab_size, config.min_frequency)
        progress.advance()
    tokenizer.save_pretrained(ctx.stage_dir / OUTPUT_DIR)
    quality = fit_report(tokenizer, val_texts)
    metrics = {
        "kind": config.kind,
        "vocab_size": len(tokenizer),
        "train_on": list(config.train_on),
        "train_texts": len(texts),
        "train_chars": sum(len(text) for text in texts),
        "fertility_val": quality["fertility"],
        "unk_rate_val": quality["unk_rate"],
    }
    console.print(
        f"{config.kind}: vocab {metrics['vocab_size']}, on corpus_val {_shown(metrics['fertility_val'])} "
        f"tokens/char, unknown {_shown(metrics['unk_rate_val'])}"
    )
    if config.kind != "byte_bpe":
        console.print(
            f"[yellow]note[/] {config.kind}: AutoTokenizer rebuilds any qwen2 model folder's tokenizer as "
            "Qwen2's byte-level BPE; use a llama-architecture model with this tokenizer"
        )
    return StageResult(outputs={"tokenizer": OUTPUT_DIR}, metrics=metrics)


def _load_base(extend: ExtendConfig):
    """(tokenizer, model or None) of `extend.base`: a model folder brings its weights along."""
    from transformers import AutoTokenizer

    base = Path(extend.base)
    try:
        tokenizer = AutoTokenizer.from_pretrained(base)
    except (OSError, ValueError) as exc:
        raise UserError(f"tokenizer.extend.base: no loadable tokenizer in {base}: {exc}") from None
    ensure_chat_template(tokenizer, "tokenizer.extend.base")
    model = None
    if (base / "config.json").exists():
        from lmsmith.train.model import load_causal_lm

        model, _ = load_causal_lm(base, source="tokenizer.extend.base")
    return tokenizer, model


def extend_existing(config: TokenizerConfig, ctx: StageContext, val_texts: list[str]) -> StageResult:
    extend = config.extend
    old_tokenizer, model = _load_base(extend)
    terms: list[str] = []
    if extend.terms is not None:
        terms.extend(read_term_list(extend.terms))
    mined: list[tuple[str, int]] = []
    if extend.mine is not None:
        mined = mine_terms(
            old_tokenizer,
            read_corpus_texts(ctx.artifact("data", "corpus_train")),
            top_k=extend.mine.top_k,
            min_count=extend.mine.min_count,
            min_chars=extend.mine.min_chars,
        )
        terms.extend(term for term, _ in mined)
    new_tokenizer, added = extend_tokenizer(old_tokenizer, terms)
    new_tokenizer.save_pretrained(ctx.stage_dir / OUTPUT_DIR)
    (ctx.stage_dir / TERMS_FILE).write_text("".join(f"{term}\n" for term in added), encoding="utf-8")
    outputs = {"tokenizer": OUTPUT_DIR, "terms": TERMS_FILE}
    if model is not None:
        from lmsmith.train.model import save_causal_lm

        extend_model_embeddings(model, old_tokenizer, new_tokenizer, added)
        save_causal_lm(model, new_tokenizer, ctx.stage_dir / MODEL_DIR)
        outputs["model"] = MODEL_DIR

    before, after = fit_report(old_tokenizer, val_texts), fit_report(new_tokenizer, val_texts)
    metrics = {
        "kind": "extend",
        "vocab_size_before": len(old_tokenizer),
        "vocab_size": len(new_tokenizer),
        "added_tokens": len(added),
        "terms_from_list": len(terms) - len(mined),
        "terms_mined": len(mined),
        "fertility_val_before": before["fertility"],
        "fertility_val": after["fertility"],
        "unk_rate_val_before": before["unk_rate"],
        "unk_rate_val": after["unk_rate"],
    }
    console.print(
        f"extended {len(old_tokenizer)} → {len(new_tokenizer)} tokens ({len(added)} added); corpus_val "
        f"fertility {_shown(before['fertility'])} → {_shown(after['fertility'])}, unknown "
        f"{_shown(before['unk_rate'])} → {_shown(after['unk_rate'])}"
    )
    return StageResult(outputs=outputs, metrics=metrics)


def run(config: TokenizerConfig, ctx: StageContext) -> StageResult:
    val_texts = read_corpus_texts(ctx.artifact("data", "corpus_val"))
    if config.extend is not None:
        return extend_existing(config, ctx, val_texts)
    return train_new(config, ctx, val_texts)
