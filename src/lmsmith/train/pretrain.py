"""The pretrain stage: causal-LM training on the cleaned corpus, from scratch or from a local model.

Documents are tokenized, each followed by `<|endoftext|>`, and packed into `seq_len` blocks; the loop is
lmsmith's own (`loop.py`); transformers supplies the Qwen2 model.
"""

from __future__ import annotations

import torch

from lmsmith.console import console, track
from lmsmith.errors import UserError
from lmsmith.models import start_model
from lmsmith.pipeline import StageContext, StageResult
from lmsmith.tokenizer.chat import END_OF_TEXT
from lmsmith.tokenizer.records import read_corpus_texts
from lmsmith.train import dist
from lmsmith.train.checkpoint import checkpoint_root
from lmsmith.train.config import PretrainConfig
from lmsmith.train.data import StepPlan, eval_batches, pack_documents
from lmsmith.train.loop import train
from lmsmith.train.methods import count_parameters
from lmsmith.train.model import (
    build_tiny_model,
    check_fits,
    load_causal_lm,
    load_tokenizer,
    save_causal_lm,
    special_token_id,
)

MODEL_DIR = "model"
METRICS = "metrics.jsonl"


def tokenize_documents(tokenizer, texts: list[str], description: str) -> list[list[int]]:
    """Token ids of each text, tokenized in chunks so the progress bar moves."""
    chunk = 256
    documents: list[list[int]] = []
    with track(description, total=len(texts)) as progress:
        for start in range(0, len(texts), chunk):
            part = texts[start : start + chunk]
            documents.extend(tokenizer(part, add_special_tokens=False)["input_ids"])
            progress.advance(len(part))
    return documents


def document_separator(tokenizer) -> int:
    """`<|endoftext|>` when the vocabulary has it, else the tokenizer's eos."""
    separator = special_token_id(tokenizer, END_OF_TEXT)
    return separator if separator is not None else tokenizer.eos_token_id


def load_start_model(config: PretrainConfig, ctx: StageContext):
    """The model pretraining continues (see `lmsmith.models.start_model`), or a fresh tiny model over
    the tokenizer stage's tokenizer."""
    ref = start_model(ctx.recipe, "pretrain")
    if ref is not None:
        source = "pretrain.base_model" if config.base_model is not None else ref.describe()
        return load_causal_lm(ref.resolve(ctx), source=source)
    tokenizer = load_tokenizer(ctx.artifact("tokenizer", "tokenizer"))
    torch.manual_seed(ctx.seed)
    return build_tiny_model(config.model, tokenizer), tokenizer


def run(config: PretrainConfig, ctx: StageContext) -> StageResult:
    if config.early_stopping is not None and config.early_stopping.metric != "val_loss":
        raise UserError("pretrain.early_stopping.metric: pretraining only measures val_loss")
    accelerator = dist.make_accelerator()
    model, tokenizer = load_start_model(config, ctx)
    check_fits(config.seq_len, model, "pretrain.seq_len")
    params = count_parameters(model)
    console.print(f"model: {params.total / 1e6:.2f}M parameters, vocab {len(tokenizer)}")

    separator = document_separator(tokenizer)
    train_docs = tokenize_documents(
        tokenizer, read_corpus_texts(ctx.artifact("data", "corpus_train")), "tokenize corpus_train"
    )
    val_docs = tokenize_documents(
        tokenizer, read_corpus_texts(ctx.artifact("data", "corpus_val")), "tokenize corpus_val"
    )
    isolate = config.efficiency.packing
    train_blocks = pack_documents(train_docs, separator, config.seq_len, keep_remainder=False, isolate_documents=isolate)
    if not train_blocks:
        # A corpus shorter than one block still trains, as one shorter block.
        train_blocks = pack_documents(train_docs, separator, config.seq_len, keep_remainder=True,
                                      isolate_documents=isolate)
    if not train_blocks:
        raise UserError("data: corpus_train has no text to pretrain on")
    val_blocks = pack_documents(val_docs, separator, config.seq_len, keep_remainder=True, isolate_documents=isolate)

    plan = StepPlan.for_schedule(train_blocks, tokenizer.pad_token_id, config, accelerator.num_processes, ctx.seed)
    torch.manual_seed(ctx.seed)
    summary = train(
        model,
        plan,
        plan.total_steps,
        config,
        ctx.stage_dir,
        checkpoint_dir=checkpoint_root(ctx.run_dir, "pretrain"),
        val_batches=eval_batches(val_blocks, tokenizer.pad_token_id, config.batch_size),
        accelerator=accelerator,
        description="pretrain",
    )
    if accelerator.is_main_process:
        save_causal_lm(model, tokenizer, ctx.stage_dir / MODEL_DIR)
    accelerator.wait_for_everyone()
    metrics = {
        **summary.metrics(),
        "parameters": params.total,
        "train_blocks": len(train_blocks),
        "val_blocks": len(val_blocks),
        "corpus_tokens": sum(len(doc) + 1 for doc in train_docs),
    }
    return StageResult(outputs={"model": MODEL_DIR, **summary.outputs}, metrics=metrics)
