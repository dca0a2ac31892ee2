"""Turn documents and conversations into training examples, batches and optimiser steps.

Pretraining packs documents into fixed-length blocks; SFT renders each conversation with the tokenizer's
chat template and supervises only the assistant's tokens. Batches are padded on the right and labels
come from per-example masks, never from comparing ids with the pad id, so a real end-of-turn token is
always a target. Plain torch tensors; the chat template comes from transformers.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

IGNORE_INDEX = -100  # the label of positions the loss skips


@dataclass(frozen=True)
class Example:
    """One training sequence; `labels[i]` is `input_ids[i]` where supervised, else IGNORE_INDEX."""

    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class Batch:
    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor | None  # None: no padding, so attention can take the plain causal path

    @property
    def tokens(self) -> int:
        """Real (non-padding) tokens the model reads."""
        if self.attention_mask is None:
            return self.input_ids.numel()
        return int(self.attention_mask.sum())

    @property
    def target_tokens(self) -> int:
        """Positions with a next-token target: the loss is a sum over these."""
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())


def collate(examples: Sequence[Example], pad_id: int) -> Batch:
    """Right-pad to the longest example; padding is masked out of attention and of the loss."""
    width = max(len(example) for example in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        length = len(example)
        input_ids[row, :length] = torch.tensor(example.input_ids)
        labels[row, :length] = torch.tensor(example.labels)
        attention_mask[row, :length] = 1
    padded = bool((attention_mask == 0).any())
    return Batch(input_ids=input_ids, labels=labels, attention_mask=attention_mask if padded else None)


# ---------------------------------------------------------------- pretraining


def pack_documents(
    documents: Sequence[Sequence[int]], separator_id: int, seq_len: int, keep_remainder: bool
) -> list[Example]:
    """Concatenate documents, each followed by `separator_id`, and cut the stream into `seq_len` blocks.

    Attention crosses document boundaries inside a block, as in GPT-style pretraining; the separator
    teaches the model where one document ends. The final partial block is kept only if asked (for
    validation, where every token should count).
    """
    stream: list[int] = []
    for document in documents:
        stream.extend(document)
        stream.append(separator_id)
    blocks = [stream[start : start + seq_len] for start in range(0, len(stream), seq_len)]
    if blocks and len(blocks[-1]) < seq_len and not (keep_remainder and len(blocks[-1]) > 1):
        blocks.pop()
    return [Example(input_ids=block, labels=list(block)) for block in blocks]


# ---------------------------------------------------------------- supervised fine-tuning


def chat_example(tokenizer, messages: list[dict[str, str]]) -> Example:
    """Render `messages` with the chat template; only assistant content and its end-of-turn are targets."""
    encoded = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    input_ids = list(encoded["input_ids"])
    mask = list(encoded["assistant_masks"])
    labels = [token if supervised else IGNORE_INDEX for token, supervised in zip(input_ids, mask)]
    return Example(input_ids=input_ids, labels=labels)


# ---------------------------------------------------------------- batching


def length_grouped_order(lengths: Sequence[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Batches of indices with similar lengths, in random order, to cut padding without losing shuffling.

    Shuffle, sort within windows of 50 batches, cut into batches, then shuffle the batches.
    """
    indices = list(range(len(lengths)))
    rng.shuffle(indices)
    window = batch_size * 50
    batches = []
    for start in range(0, len(indices), window):
        chunk = sorted(indices[start : start + window], key=lambda i: lengths[i])
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


class StepPlan:
    """The optimiser steps of a run: each is a list of `grad_accum_steps` padded micro-batches.

    Epochs may be fractional; `max_steps` caps the total. Iterating twice yields the same steps, since
    every epoch's order comes from `seed` and the epoch number alone.
    """

    def __init__(
        self,
        examples: Sequence[Example],
        pad_id: int,
        batch_size: int,
        grad_accum_steps: int = 1,
        epochs: float = 1.0,
        max_steps: int | None = None,
        seed: int = 0,
    ):
        if not examples:
            raise ValueError("no training examples")
        self.examples = list(examples)
        self.pad_id = pad_id
        self.batch_size = batch_size
        self.grad_accum_steps = grad_accum_steps
        self.seed = seed
        micro_batches = math.ceil(len(self.examples) / batch_size)
        self.steps_per_epoch = max(1, micro_batches // grad_accum_steps)
        total = max(1, math.ceil(self.steps_per_epoch * epochs))
        self.total_steps = min(total, max_steps) if max_steps else total

    def __len__(self) -> int:
        return self.total_steps

    def __iter__(self) -> Iterator[list[Batch]]:
        lengths = [len(example) for example in self.examples]
        emitted = 0
        epoch = 0
        while emitted < self.total_steps:
            order = length_grouped_order(lengths, self.batch_size, random.Random(f"{self.seed}:{epoch}"))
            for step in range(self.steps_per_epoch):
                micro = order[step * self.grad_accum_steps : (step + 1) * self.grad_accum_steps]
                yield [collate([self.examples[i] for i in batch], self.pad_id) for batch in micro]
                emitted += 1
                if emitted == self.total_steps:
                    return
            epoch += 1


def eval_batches(examples: Sequence[Example], pad_id: int, batch_size: int) -> list[Batch]:
    """Fixed validation batches, sorted by length so padding stays small."""
    ordered = sorted(examples, key=len)
    return [collate(ordered[i : i + batch_size], pad_id) for i in range(0, len(ordered), batch_size)]
