"""The training forward: next-token loss over target positions only, gradient accumulation across
micro-batches and processes, and the validation loss.

Logits are computed only at target positions, through a chunked linear + cross-entropy
(`efficiency.py`) that never holds the full logits tensor. transformers supplies the decoder; accelerate
the DDP gradient synchronisation (`dist.py`).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from lmsmith.train import dist
from lmsmith.train.data import IGNORE_INDEX, Batch
from lmsmith.train.efficiency import chunked_linear_cross_entropy

# objective(model, batch) -> (summed loss over target tokens, number of target tokens)
Objective = Callable[[Any, Batch], "tuple[torch.Tensor, int]"]


def _hidden_states_path(model):
    """(decoder, output head) when logits can be taken at chosen positions only, else None.

    Adapters that live inside the layers (LoRA and kin) leave the plain decoder → head path intact;
    prompt-learning methods change the inputs in the wrapper's forward, so those use the full forward.
    """
    base = model
    if hasattr(model, "peft_config"):
        config = model.peft_config[model.active_adapter]
        if getattr(config, "is_prompt_learning", False):
            return None
        base = model.get_base_model()
    decoder, head = base.get_decoder(), base.get_output_embeddings()
    if decoder is None or head is None:
        return None
    return decoder, head


def loss_sum(model, batch: Batch, chunk_size: int | None = 1024) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the batch's target positions, and their count.

    `chunk_size` rows of logits at a time (None: all target logits at once, the plain reference).
    """
    targets = batch.labels[:, 1:]
    selected = targets != IGNORE_INDEX
    count = int(selected.sum())
    path = _hidden_states_path(model)
    if path is None:
        # Prompt learning: peft builds its own positions and puts virtual tokens in front; cut them off.
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
        logits = logits[:, -batch.input_ids.shape[1] :][:, :-1][selected]
        return F.cross_entropy(logits.float(), targets[selected], reduction="sum"), count
    decoder, head = path
    # No KV cache: transformers only derives the per-document mask of packed rows without one.
    hidden = decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                     position_ids=batch.position_ids, use_cache=False).last_hidden_state[:, :-1][selected]
    if chunk_size is None:
        return F.cross_entropy(head(hidden).float(), targets[selected], reduction="sum"), count
    return chunked_linear_cross_entropy(hidden, head, targets[selected], chunk_size), count


class TrainingForward(torch.nn.Module):
    """The whole training forward (model and loss) as one module, so DDP and FSDP see every use of
    every parameter through their wrapper even though the loss calls the decoder and head directly."""

    def __init__(self, model, objective: Objective | None = None, chunk_size: int | None = 1024):
        super().__init__()
        self.model = model
        self.objective = objective
        self.chunk_size = chunk_size

    def forward(self, batch: Batch) -> torch.Tensor:
        if self.objective is not None:
            return self.objective(self.model, batch)[0]
        return loss_sum(self.model, batch, self.chunk_size)[0]


def accumulate_gradients(
    model, micro_batches: Sequence[Batch], forward: torch.nn.Module | None = None, accelerator=None
) -> tuple[float, float]:
    """Backpropagate one optimiser step's mean token loss; return its summed loss and target count.

    With several processes, `micro_batches` is this process's share and the returned figures are
    the global ones. With class weights the count is the weighted target count (`Batch.target_weight`),
    so the step's loss is a weighted per-token mean.
    """
    forward = forward if forward is not None else TrainingForward(model)
    local_targets = sum(batch.target_weight for batch in micro_batches)
    world = accelerator.num_processes if accelerator is not None else 1
    targets = dist.all_sum([local_targets], accelerator)[0]
    total = 0.0
    for index, batch in enumerate(micro_batches):
        if accelerator is not None:
            batch = batch.to(accelerator.device)
        last = index == len(micro_batches) - 1
        # Only the last micro-batch's backward needs DDP to synchronise gradients.
        sync = nullcontext() if accelerator is None or last else accelerator.no_sync(forward)
        with sync:
            loss = forward(batch)
            # Dividing every micro-batch by the step's global target count (times the world size,
            # which DDP's gradient averaging divides out) makes the summed gradients those of the
            # global batch's per-token mean loss, whatever the micro-batches' sizes.
            scaled = loss * (world / (targets or 1))
            if accelerator is not None:
                accelerator.backward(scaled)
            else:
                scaled.backward()
        total += float(loss.detach())
    total = dist.all_sum([total], accelerator)[0]
    return total, targets


@torch.no_grad()
def evaluate(model, batches: Sequence[Batch], objective: Objective | None = None, device=None) -> float | None:
    """Mean token loss over `batches` (None when there is nothing to score)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        if device is not None:
            batch = batch.to(device)
        loss, n = objective(model, batch) if objective is not None else loss_sum(model, batch)
        total += float(loss)
        count += float(n)
    model.train(was_training)
    return total / count if count else None
