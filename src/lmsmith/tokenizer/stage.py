"""The tokenizer stage: a byte-level BPE trained on the cleaned corpus and the instructions.

HF `tokenizers` trains it (see `bpe.py`); the result is saved as a transformers tokenizer folder with the
ChatML template, loadable with `AutoTokenizer.from_pretrained`.
"""

from __future__ import annotations

from lmsmith.console import console, track
from lmsmith.errors import UserError
from lmsmith.pipeline import StageContext, StageResult
from lmsmith.tokenizer.bpe import fertility, train_byte_bpe
from lmsmith.tokenizer.config import TokenizerConfig
from lmsmith.tokenizer.records import read_conversations, read_corpus_texts

OUTPUT_DIR = "tokenizer"


def training_texts(ctx: StageContext) -> list[str]:
    """Corpus documents plus every message of the training instructions (prompts and answers)."""
    texts = read_corpus_texts(ctx.artifact("data", "corpus_train"))
    for conversation in read_conversations(ctx.artifact("data", "sft_train")):
        texts.extend(message["content"] for message in conversation)
    return texts


def run(config: TokenizerConfig, ctx: StageContext) -> StageResult:
    texts = training_texts(ctx)
    if not any(texts):
        raise UserError("data: corpus_train and sft_train hold no text to train a tokenizer on")
    with track("train byte-level BPE", total=1) as progress:
        tokenizer = train_byte_bpe(
            texts,
            vocab_size=config.vocab_size,
            min_frequency=config.min_frequency,
        )
        progress.advance()
    tokenizer.save_pretrained(ctx.stage_dir / OUTPUT_DIR)

    val_texts = read_corpus_texts(ctx.artifact("data", "corpus_val"))
    val_fertility = fertility(tokenizer, val_texts)
    metrics = {
        "vocab_size": len(tokenizer),
        "train_texts": len(texts),
        "train_chars": sum(len(text) for text in texts),
        "fertility_val": round(val_fertility, 4) if val_fertility is not None else None,
    }
    shown = f"{val_fertility:.3f}" if val_fertility is not None else "n/a"
    console.print(f"vocab {metrics['vocab_size']}, fertility on corpus_val {shown} tokens/char")
    return StageResult(outputs={"tokenizer": OUTPUT_DIR}, metrics=metrics)
