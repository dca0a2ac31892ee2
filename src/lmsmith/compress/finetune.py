"""Training inside the compress stage: pruning's recovery fine-tune and the distilled student.

Both are the training stages' own pieces, not a second loop: conversations rendered answer-only as the
sft stage renders them (`lmsmith.train.sft.chat_examples`), `lmsmith.train.loop.train` with a full
fine-tune, and for the student the sft stage's distillation loss (`objectives.distillation_loss`, KL to
the teacher's softened distribution plus CE) with the source model as the teacher.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from lmsmith.errors import UserError


def finetune(model, tokenizer, conversations: Sequence[list[dict]], schedule, max_len: int, out: Path,
             seed: int, description: str, teacher=None, val_conversations: Sequence[list[dict]] = ()) -> dict[str, Any]:
    """Train every weight of `model` in place on `conversations`; with `teacher`, by distillation.

    `schedule` is a `TrainingSchedule` (with `temperature`/`alpha` when distilling). Returns the loop's
    summary metrics."""
    from lmsmith.train import objectives
    from lmsmith.train.data import StepPlan, eval_batches
    from lmsmith.train.loop import train
    from lmsmith.train.method_config import FullMethod
    from lmsmith.train.methods import apply_method, build_optimizer
    from lmsmith.train.sft import chat_examples

    examples, _ = chat_examples(tokenizer, list(conversations), max_len, f"{description}: render train split")
    if not examples:
        raise UserError(f"{description}: no training conversation fits in max_len {max_len} tokens")
    val_examples, _ = chat_examples(tokenizer, list(val_conversations), max_len, f"{description}: render val split")
    torch.manual_seed(seed)
    model.train()
    model, _ = apply_method(model, FullMethod(), ())
    optimizer = build_optimizer(model, FullMethod(), schedule.optim)
    plan = StepPlan.for_schedule(examples, tokenizer.pad_token_id, schedule, 1, seed)
    objective: Optional[Any] = None
    if teacher is not None:
        teacher.eval().requires_grad_(False)
        objectives.check_shared_vocabulary(model, teacher)

        def objective(student, batch):
            return objectives.distillation_loss(
                student, teacher, batch.input_ids, batch.labels, batch.attention_mask, batch.position_ids,
                temperature=schedule.temperature, alpha=schedule.alpha)

    summary = train(model, plan, plan.total_steps, schedule, out,
                    val_batches=eval_batches(val_examples, tokenizer.pad_token_id, schedule.batch_size),
                    objective=objective, optimizer=optimizer, description=description)
    model.eval().requires_grad_(False)
    return summary.metrics()
