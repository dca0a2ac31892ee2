"""The sft stage: supervised fine-tuning on chat conversations with answer-only loss.

Each conversation is rendered with the tokenizer's chat template (transformers); only the assistant's
content and its `<|im_end|>` are targets. The method (peft LoRA, or full) decides what trains; the tuned
model is saved merged, and a LoRA run also saves its adapter.
"""

from __future__ import annotations

import gc
import random

import torch

from lmsmith.console import console, track
from lmsmith.errors import UserError
from lmsmith.pipeline import StageContext, StageResult
from lmsmith.jsonl import iter_jsonl
from lmsmith.models import start_model
from lmsmith.tokenizer.records import read_conversations
from lmsmith.train import dist
from lmsmith.train.checkpoint import checkpoint_root
from lmsmith.train.config import SFTConfig
from lmsmith.train.data import Example, StepPlan, chat_example, eval_batches, oversample, pack_examples
from lmsmith.train.export import merge_adapter, save_adapter
from lmsmith.train.loop import GenerationProbe, resolve_precision, train
from lmsmith.train.methods import apply_method, build_optimizer, is_adapter, is_mergeable
from lmsmith.train.model import check_fits, load_causal_lm, save_causal_lm

MERGED_DIR = "merged"
ADAPTER_DIR = "adapter"
METRICS = "metrics.jsonl"


def chat_examples(tokenizer, conversations, max_len: int, description: str) -> tuple[list[Example], list[int]]:
    """Answer-only examples of the conversations that fit in `max_len` tokens, and the indices kept."""
    examples: list[Example] = []
    kept: list[int] = []
    with track(description, total=len(conversations)) as progress:
        for index, messages in enumerate(conversations):
            example = chat_example(tokenizer, messages)
            # Cutting would drop the answer's end and its end-of-turn, teaching the model not to stop.
            if len(example) <= max_len:
                examples.append(example)
                kept.append(index)
            progress.advance()
    return examples, kept


def load_base(config: SFTConfig, ctx: StageContext, precision: str):
    """(model, tokenizer, base folder, chat template used): the model sft starts from (see
    `lmsmith.models.start_model`), loaded as the method needs it, with the recipe's chat template."""
    from lmsmith.tokenizer.chat import ensure_chat_template
    from lmsmith.train.model import set_generation_tokens

    ref = start_model(ctx.recipe, "sft")
    folder = ref.resolve(ctx).resolve()
    source = "sft.base_model" if config.base_model is not None else ref.describe()
    model, tokenizer = load_causal_lm(folder, source=source, method=config.method, precision=precision)
    choice = ctx.recipe.model.chat_template if ctx.recipe.model is not None else "auto"
    template = ensure_chat_template(tokenizer, source, choice)
    set_generation_tokens(model, tokenizer)  # the template decides the end-of-turn token
    return model, tokenizer, folder, template


def val_probes(config: SFTConfig, tokenizer, conversations, ctx: StageContext) -> list:
    """What each val check measures besides val loss: ROUGE-L of the first `val_generations` val
    conversations, and a capped sample of each of `val_tasks` (`lmsmith.eval.probe`)."""
    probes: list = []
    chosen = conversations[: config.val_generations]
    if chosen:
        probes.append(GenerationProbe(tokenizer=tokenizer, prompts=[messages[:-1] for messages in chosen],
                                      references=[messages[-1]["content"] for messages in chosen],
                                      max_new_tokens=config.val_max_new_tokens))
    evaluated = set(ctx.recipe.eval.tasks) if ctx.recipe.eval is not None else set()
    if shared := sorted(evaluated & set(config.val_tasks)):
        raise UserError(f"sft.val_tasks: {', '.join(shared)} is also what the eval stage scores; choosing the "
                        "checkpoint on it would inflate the eval figures (give the probe a task file of its own)")
    if config.val_tasks:
        from lmsmith.eval.probe import TaskProbe
        from lmsmith.eval.stage import task_files
        from lmsmith.eval.tasks import load_task

        paths = task_files(config.val_tasks, ctx, ctx.stage_dir / "val_tasks", max_items=config.val_task_items)
        task_probe = TaskProbe([load_task(path) for path in paths], tokenizer, config.batch_size)
        watched = config.early_stopping.metric if config.early_stopping is not None else None
        if watched is not None and watched.startswith("val.") and watched not in task_probe.metric_names():
            raise UserError(f"sft.early_stopping.metric: {watched} is not measured; the val tasks give "
                            f"{', '.join(task_probe.metric_names())}")
        probes.append(task_probe)
    return probes


def weigh_by_task(examples: list[Example], tasks: list[str], ctx: StageContext) -> list[Example]:
    """Each example carries its task's weight from the data stage's class_weights output."""
    from dataclasses import replace

    from lmsmith.train.objectives import load_class_weights

    try:
        path = ctx.artifact("data", "class_weights")
    except KeyError:
        raise UserError("sft.class_weights: the data stage wrote no class_weights output; enable its "
                        "oversampling/class weights or set sft.class_weights: false") from None
    weights = load_class_weights(path)
    return [replace(example, weight=float(weights.get(task, 1.0))) for example, task in zip(examples, tasks)]


def replay_examples(config: SFTConfig, ctx: StageContext, tokenizer, examples: list[Example]) -> list[Example]:
    """Blocks of `corpus_train` carrying `replay.token_share` of the epoch's target tokens, every token a
    target; drawn with the run's seed, without repeats until every block is used."""
    from lmsmith.tokenizer.records import read_corpus_texts
    from lmsmith.train.data import IGNORE_INDEX, pack_documents
    from lmsmith.train.pretrain import document_separator, tokenize_documents

    replay = config.replay
    if "corpus_train" not in ctx.manifest("data").outputs:
        raise UserError("sft.replay: the data stage has no corpus to replay; set data.corpus or drop sft.replay")
    path = ctx.artifact("data", "corpus_train")
    documents = tokenize_documents(tokenizer, read_corpus_texts(path), "tokenize corpus_train (replay)")
    blocks = pack_documents(documents, document_separator(tokenizer), replay.seq_len, keep_remainder=False)
    if not blocks:
        raise UserError(f"sft.replay: {path} holds fewer than replay.seq_len ({replay.seq_len}) tokens")
    answer_targets = sum(sum(label != IGNORE_INDEX for label in example.labels[1:]) for example in examples)
    wanted = max(1, round(replay.token_share / (1 - replay.token_share) * answer_targets / (replay.seq_len - 1)))
    rng = random.Random(f"{ctx.seed}:replay")
    chosen: list[Example] = []
    while len(chosen) < wanted:
        chosen += rng.sample(blocks, min(len(blocks), wanted - len(chosen)))
    return chosen


def objective_for(config: SFTConfig, model, device):
    """The loss the loop optimises: distillation, class-weighted CE, or None (the loop's chunked CE)."""
    from lmsmith.train import objectives

    if config.distill is not None:
        teacher = objectives.load_teacher(config.distill, model).to(device)
        settings = config.distill

        def distill(student, batch):
            return objectives.distillation_loss(
                student, teacher, batch.input_ids, batch.labels, batch.attention_mask, batch.position_ids,
                temperature=settings.temperature, alpha=settings.alpha, chunk_tokens=settings.chunk_tokens)

        return distill
    if config.class_weights:

        def weighted(student, batch):
            return objectives.causal_lm_loss(student, batch.input_ids, batch.labels, batch.attention_mask,
                                             batch.position_ids, sample_weights=batch.sample_weights,
                                             chunk_tokens=config.efficiency.loss_chunk_size)

        return weighted
    return None


def run(config: SFTConfig, ctx: StageContext) -> StageResult:
    accelerator = dist.make_accelerator()
    # opacus' per-example gradient hooks expect fp32 layers, so a DP run loads its base in fp32 too.
    precision = "fp32" if config.privacy is not None else resolve_precision(config.precision, accelerator.device)
    model, tokenizer, base_folder, template = load_base(config, ctx, precision)
    check_fits(config.max_len, model, "sft.max_len")
    train_path = ctx.artifact("data", "sft_train")
    train_conversations = read_conversations(train_path)
    val_conversations = read_conversations(ctx.artifact("data", "sft_val"))
    train_examples, kept = chat_examples(tokenizer, train_conversations, config.max_len, "render sft_train")
    val_examples, val_kept = chat_examples(tokenizer, val_conversations, config.max_len, "render sft_val")
    train_too_long = len(train_conversations) - len(kept)
    if not train_examples:
        raise UserError(
            f"sft.max_len: all {train_too_long} training conversations are longer than {config.max_len} tokens"
            if train_too_long
            else "data: sft_train holds no conversations"
        )
    if train_too_long:
        console.print(f"[yellow]skipped[/] {train_too_long} training conversations longer than sft.max_len")
    distinct = len(train_examples)
    rows = [row for _, row in iter_jsonl(train_path)]
    tasks = [row.get("task") or "" for row in rows]
    if config.class_weights:
        train_examples = weigh_by_task(train_examples, [tasks[i] for i in kept], ctx)
    if config.oversample:
        labels = [[row.get("task") or "", *(f"tag:{tag}" for tag in row.get("tags") or ())] for row in rows]
        known = {name for names in labels for name in names}
        unknown = sorted(set(config.oversample) - known)
        if unknown:
            raise UserError(f"sft.oversample: no training conversation has the task or tag {', '.join(unknown)} "
                            f"(tasks and tags: {', '.join(sorted(known - {''}))})")
        train_examples = oversample(train_examples, [labels[i] for i in kept], config.oversample, ctx.seed)
    replayed = replay_examples(config, ctx, tokenizer, train_examples) if config.replay is not None else []
    train_examples = train_examples + replayed
    if config.efficiency.packing:
        train_examples = pack_examples(train_examples, config.max_len)
        val_examples = pack_examples(val_examples, config.max_len)

    torch.manual_seed(ctx.seed)
    used_token_ids = {token for example in train_examples for token in example.input_ids}
    model, params = apply_method(model, config.method, used_token_ids)
    optimizer = build_optimizer(model, config.method, config.optim)
    val = eval_batches(val_examples, tokenizer.pad_token_id, config.batch_size)
    probes = val_probes(config, tokenizer, [val_conversations[i] for i in val_kept], ctx)

    plan = StepPlan.for_schedule(train_examples, tokenizer.pad_token_id, config, accelerator.num_processes, ctx.seed)
    private = None
    if config.privacy is not None:
        from lmsmith.train.privacy import make_private

        private = make_private(model, optimizer, train_examples, tokenizer.pad_token_id, config.batch_size,
                               plan.total_steps, config.privacy, method_name=config.method.name)
        summary = train(private.trained_model, private.batches(), private.steps, config, ctx.stage_dir,
                        val_batches=val, probes=probes, private=private,
                        description=f"sft ({config.method.name}, DP-SGD)")
    else:
        summary = train(
            model,
            plan,
            plan.total_steps,
            config,
            ctx.stage_dir,
            checkpoint_dir=checkpoint_root(ctx.run_dir, "sft"),
            val_batches=val,
            probes=probes,
            objective=objective_for(config, model, accelerator.device),
            optimizer=optimizer,
            accelerator=accelerator,
            description=f"sft ({config.method.name})",
        )

    outputs = dict(summary.outputs)
    adapter, mergeable = is_adapter(model), is_mergeable(model)
    if accelerator.is_main_process:
        if adapter:
            # The same code as `lmsmith export`: what the stage publishes is what an export would give.
            save_adapter(model, ctx.stage_dir / ADAPTER_DIR, base_model=base_folder, method=config.method,
                         tokenizer=tokenizer)
        if adapter and mergeable:
            # The trained model is on disk now; free it before the merge loads the base again.
            del model, private, optimizer
            accelerator.free_memory()
            gc.collect()
            merge_adapter(ctx.stage_dir / ADAPTER_DIR, ctx.stage_dir / MERGED_DIR)
        elif mergeable:
            save_causal_lm(model, tokenizer, ctx.stage_dir / MERGED_DIR)
    accelerator.wait_for_everyone()
    compatibility = {}
    if adapter:
        outputs["adapter"] = ADAPTER_DIR
        from lmsmith.train.export import adapter_compatibility

        compatibility = adapter_compatibility(ctx.stage_dir / ADAPTER_DIR)
    if mergeable:
        outputs["model"] = MERGED_DIR  # prompt-learning adapters have no merged form: the adapter is the output
    metrics = {
        **summary.metrics(),
        "method": config.method.name,
        "base_model": str(base_folder),
        "chat_template": template,
        "trainable_params": params.trainable,
        "total_params": params.total,
        "trainable_share": round(params.share, 6),
        "train_examples": distinct,
        "train_rows": len(train_examples),
        **({"replay_rows": len(replayed), "replay_tokens": sum(len(example) for example in replayed)}
           if replayed else {}),
        "val_examples": len(val_examples),
        "skipped_too_long": train_too_long + len(val_conversations) - len(val_kept),
    }
    if compatibility:
        # Which runtimes load the adapter as saved, and why the others would not (docs/compression.md).
        metrics["adapter_loads_in"] = [name for name, problems in compatibility.items() if not problems]
        metrics["adapter_refused_by"] = {name: problems for name, problems in compatibility.items() if problems}
    return StageResult(outputs=outputs, metrics=metrics)
