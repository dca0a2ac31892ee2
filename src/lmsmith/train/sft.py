"""The sft stage: supervised fine-tuning on chat conversations with answer-only loss.

Each conversation is rendered with the tokenizer's chat template (transformers); only the assistant's
content and its `<|im_end|>` are targets. The method (peft LoRA, or full) decides what trains; the tuned
model is saved merged, and a LoRA run also saves its adapter.
"""

from __future__ import annotations

import torch

from lmsmith.console import console, track
from lmsmith.errors import UserError
from lmsmith.pipeline import StageContext, StageResult
from lmsmith.tokenizer.records import read_conversations
from lmsmith.train.config import SFTConfig
from lmsmith.train.data import Example, StepPlan, chat_example, eval_batches
from lmsmith.train.loop import train
from lmsmith.train.methods import apply_method, count_parameters, is_adapter, merged_model, save_adapter
from lmsmith.train.model import check_fits, load_causal_lm, save_causal_lm

MERGED_DIR = "merged"
ADAPTER_DIR = "adapter"
METRICS = "metrics.jsonl"


def chat_examples(tokenizer, conversations, max_len: int, description: str) -> tuple[list[Example], int]:
    """Answer-only examples of the conversations that fit in `max_len` tokens, and how many did not."""
    examples: list[Example] = []
    too_long = 0
    with track(description, total=len(conversations)) as progress:
        for messages in conversations:
            example = chat_example(tokenizer, messages)
            if len(example) > max_len:
                # Cutting would drop the answer's end and its end-of-turn, teaching the model not to stop.
                too_long += 1
            else:
                examples.append(example)
            progress.advance()
    return examples, too_long


def load_base(config: SFTConfig, ctx: StageContext):
    if config.base_model is not None:
        return load_causal_lm(config.base_model, source="sft.base_model")
    return load_causal_lm(ctx.artifact("pretrain", "model"), source="pretrain model")


def run(config: SFTConfig, ctx: StageContext) -> StageResult:
    model, tokenizer = load_base(config, ctx)
    check_fits(config.max_len, model, "sft.max_len")
    train_examples, train_too_long = chat_examples(
        tokenizer, read_conversations(ctx.artifact("data", "sft_train")), config.max_len, "render sft_train"
    )
    val_examples, val_too_long = chat_examples(
        tokenizer, read_conversations(ctx.artifact("data", "sft_val")), config.max_len, "render sft_val"
    )
    if not train_examples:
        raise UserError(
            f"sft.max_len: all {train_too_long} training conversations are longer than {config.max_len} tokens"
            if train_too_long
            else "data: sft_train holds no conversations"
        )
    if train_too_long:
        console.print(f"[yellow]skipped[/] {train_too_long} training conversations longer than sft.max_len")

    torch.manual_seed(ctx.seed)
    used_token_ids = {token for example in train_examples for token in example.input_ids}
    model = apply_method(model, config.method, used_token_ids)
    params = count_parameters(model)
    console.print(
        f"method {config.method.name}: {params.trainable:,} trainable of {params.total:,} parameters "
        f"({100 * params.share:.2f}%)"
    )

    plan = StepPlan(
        train_examples,
        pad_id=tokenizer.pad_token_id,
        batch_size=config.batch_size,
        grad_accum_steps=config.grad_accum_steps,
        epochs=config.epochs,
        max_steps=config.max_steps,
        seed=ctx.seed,
    )
    summary = train(
        model,
        plan,
        total_steps=plan.total_steps,
        optim=config.optim,
        metrics_path=ctx.stage_dir / METRICS,
        val_batches=eval_batches(val_examples, tokenizer.pad_token_id, config.batch_size),
        log_every=config.log_every,
        val_every=config.val_every,
        precision=config.precision,
        attention=config.attention,
        description=f"sft ({config.method.name})",
    )

    outputs = {"model": MERGED_DIR, "metrics": METRICS}
    if is_adapter(model):
        save_adapter(model, ctx.stage_dir / ADAPTER_DIR)
        tokenizer.save_pretrained(ctx.stage_dir / ADAPTER_DIR)
        outputs["adapter"] = ADAPTER_DIR
    save_causal_lm(merged_model(model), tokenizer, ctx.stage_dir / MERGED_DIR)
    metrics = {
        **summary.metrics(),
        "method": config.method.name,
        "trainable_params": params.trainable,
        "total_params": params.total,
        "trainable_share": round(params.share, 6),
        "train_examples": len(train_examples),
        "val_examples": len(val_examples),
        "skipped_too_long": train_too_long + val_too_long,
    }
    return StageResult(outputs=outputs, metrics=metrics)
