"""Training objectives: causal-LM cross-entropy (optionally class-weighted) and distillation.

Every objective returns `(sum of per-token losses, number of target tokens)`, never a mean, so the loop
can divide by the target count of a whole optimiser step and micro-batches of different sizes add up
to the same gradient as one big batch. Logits are computed only at target positions, a chunk of
positions at a time, under activation checkpointing (torch.utils.checkpoint): the backward pass
recomputes each chunk's logits, so at most one chunk of fp32 logits (chunk × vocabulary floats) lives
at any moment, for the student and teacher alike. Plain torch; the models come from transformers/peft.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lmsmith.errors import UserError
from lmsmith.train.data import IGNORE_INDEX
from lmsmith.train.method_config import DistillationConfig

DEFAULT_CHUNK_TOKENS = 1024


def _prompt_learning_config(model):
    if not hasattr(model, "peft_config"):
        return None
    config = model.peft_config[model.active_adapter]
    return config if getattr(config, "is_prompt_learning", False) else None


def _model_inputs(input_ids, attention_mask, position_ids) -> dict:
    inputs = {"input_ids": input_ids}
    if attention_mask is not None:
        inputs["attention_mask"] = attention_mask
    if position_ids is not None:
        inputs["position_ids"] = position_ids
    return inputs


def target_features(
    model, input_ids: torch.Tensor, attention_mask=None, position_ids=None, selected: torch.Tensor | None = None
) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """(features at the positions that predict a target, the map from features to logits).

    Position t predicts token t + 1, so `selected` (shape [batch, length - 1]) marks positions
    0..length-2. Where the decoder → head path is intact (plain models, LoRA, IA3), the features are
    final hidden states and the map is the output head: logits never exist outside a chunk. Prompt
    learning changes the inputs inside peft's forward, so there the full logits are the features
    (prompt tuning's virtual positions are cut off the front).
    """
    inputs = _model_inputs(input_ids, attention_mask, position_ids)
    if _prompt_learning_config(model) is None:
        base = model.get_base_model() if hasattr(model, "peft_config") else model
        decoder, head = base.get_decoder(), base.get_output_embeddings()
        if decoder is not None and head is not None:
            hidden = decoder(**inputs).last_hidden_state[:, :-1]
            return (hidden[selected] if selected is not None else hidden), head
    inputs.pop("position_ids", None)  # peft's prompt learning builds its own positions
    logits = model(**inputs).logits
    logits = logits[:, -input_ids.shape[1] :][:, :-1]  # drop prompt tuning's virtual positions, if any
    return (logits[selected] if selected is not None else logits), (lambda features: features)


def _chunked_sum(
    per_token: Callable[..., torch.Tensor], tensors: Sequence[torch.Tensor], chunk_tokens: int
) -> torch.Tensor:
    """Σ over chunks of `per_token(*chunk)` (which returns a scalar sum), each chunk checkpointed so its
    logits are recomputed in the backward pass instead of being kept."""
    rows = tensors[0].shape[0]
    # Zero times the features rather than a fresh zero: with no targets the result still has a graph.
    total = tensors[0].sum().float() * 0.0
    for start in range(0, rows, chunk_tokens):
        chunk = [tensor[start : start + chunk_tokens] for tensor in tensors]
        if torch.is_grad_enabled() and any(t.requires_grad for t in chunk):
            total = total + checkpoint(per_token, *chunk, use_reentrant=False)
        else:
            total = total + per_token(*chunk)
    return total


def causal_lm_loss(
    model,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    sample_weights: torch.Tensor | None = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> tuple[torch.Tensor, torch.Tensor | int]:
    """(Σ next-token cross-entropy over target positions, their count).

    With `sample_weights` (one per sequence) every token's loss is multiplied by its sequence's weight
    and the count is the weighted count Σ weight, so sum / count stays a weighted per-token mean: pass
    that count, not the raw token count, to whatever normalises the step.
    """
    targets = labels[:, 1:]
    selected = targets != IGNORE_INDEX
    features, project = target_features(model, input_ids, attention_mask, position_ids, selected)
    chosen_targets = targets[selected]
    if sample_weights is None:

        def token_losses(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(project(x).float(), y, reduction="sum")

        return _chunked_sum(token_losses, (features, chosen_targets), chunk_tokens), int(selected.sum())

    weights = sample_weights.to(features.device, torch.float32)[:, None].expand_as(targets)[selected]

    def weighted_losses(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return (F.cross_entropy(project(x).float(), y, reduction="none") * w).sum()

    return _chunked_sum(weighted_losses, (features, chosen_targets, weights), chunk_tokens), weights.sum()


# ---------------------------------------------------------------- class weights


def load_class_weights(path: str | Path) -> dict[str, float]:
    """The task → weight map of the data stage's class_weights.json (its `weights`)."""
    from lmsmith.data.augment import read_weights

    weights = read_weights(path)
    bad = {task: weight for task, weight in weights.items() if not isinstance(weight, (int, float)) or weight < 0}
    if bad:
        raise UserError(f"{path}: class weights must be non-negative numbers, got {bad}")
    return weights


def sample_weights_for(tasks: Sequence[str | None], weights: Mapping[str, float], default: float = 1.0) -> torch.Tensor:
    """One weight per sequence from its task; tasks the map does not name get `default`."""
    return torch.tensor([float(weights.get(task, default)) if task is not None else default for task in tasks])


# ---------------------------------------------------------------- distillation


def check_shared_vocabulary(student, teacher) -> None:
    """Teacher and student must score the same vocabulary, or KL between them means nothing."""
    student_vocab = student.get_output_embeddings().weight.shape[0]
    teacher_vocab = teacher.get_output_embeddings().weight.shape[0]
    if student_vocab != teacher_vocab:
        raise UserError(
            f"distill.teacher: its output layer has {teacher_vocab} tokens, the student's {student_vocab}; "
            "teacher and student must share a tokenizer"
        )


def distillation_loss(
    student,
    teacher,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    temperature: float = 2.0,
    alpha: float = 0.5,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> tuple[torch.Tensor, int]:
    """(Σ over target tokens of alpha·T²·KL(teacher_T ‖ student_T) + (1 − alpha)·CE, their count).

    The teacher runs without gradients; both models' logits exist one chunk of target positions at a
    time. T² restores the gradient scale that dividing the logits by T takes away (Hinton et al.).
    """
    targets = labels[:, 1:]
    selected = targets != IGNORE_INDEX
    with torch.no_grad():
        teacher_features, teacher_project = target_features(teacher, input_ids, attention_mask, position_ids, selected)
    student_features, student_project = target_features(student, input_ids, attention_mask, position_ids, selected)

    def token_losses(x: torch.Tensor, x_teacher: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = student_project(x).float()
        with torch.no_grad():
            teacher_logits = teacher_project(x_teacher).float()
        total = logits.new_zeros(())
        if alpha < 1:
            total = total + (1 - alpha) * F.cross_entropy(logits, y, reduction="sum")
        if alpha > 0:
            student_log_probs = F.log_softmax(logits / temperature, dim=-1)
            teacher_log_probs = F.log_softmax(teacher_logits / temperature, dim=-1)
            kl = F.kl_div(student_log_probs, teacher_log_probs, log_target=True, reduction="sum")
            total = total + alpha * temperature**2 * kl
        return total

    loss = _chunked_sum(token_losses, (student_features, teacher_features, targets[selected]), chunk_tokens)
    return loss, int(selected.sum())


def load_teacher(config: DistillationConfig, student):
    """The frozen, eval-mode teacher of `config`, checked to share the student's vocabulary."""
    from lmsmith.train.model import load_causal_lm

    teacher, _ = load_causal_lm(config.teacher, source="distill.teacher")
    teacher.eval().requires_grad_(False)
    base = student.get_base_model() if hasattr(student, "peft_config") else student
    check_shared_vocabulary(base, teacher)
    return teacher
