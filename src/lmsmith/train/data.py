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
    # Set on packed rows: positions restart at 0 where each document starts, which also tells the
    # attention (transformers derives a block-diagonal mask from them) where documents end.
    position_ids: list[int] | None = None
    weight: float = 1.0  # class weight of the whole sequence (its task's), applied to each of its tokens

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class Batch:
    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor | None  # None: no padding (or packed rows), so no 2-D mask is needed
    position_ids: torch.Tensor | None = None  # packed rows only
    real_tokens: int | None = None  # packed rows only: tokens excluding the padding after the last document
    sample_weights: torch.Tensor | None = None  # one class weight per row, when any differs from 1

    @property
    def tokens(self) -> int:
        """Real (non-padding) tokens the model reads."""
        if self.real_tokens is not None:
            return self.real_tokens
        if self.attention_mask is None:
            return self.input_ids.numel()
        return int(self.attention_mask.sum())

    def to(self, device: torch.device) -> "Batch":
        if self.input_ids.device == device:
            return self
        move = lambda tensor: tensor.to(device, non_blocking=True) if tensor is not None else None  # noqa: E731
        return Batch(move(self.input_ids), move(self.labels), move(self.attention_mask), move(self.position_ids),
                     self.real_tokens, move(self.sample_weights))

    @property
    def target_tokens(self) -> int:
        """Positions with a next-token target: the loss is a sum over these."""
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())

    @property
    def target_weight(self) -> float:
        """What the loss is normalised by: the target count, each target weighted by its row's weight."""
        if self.sample_weights is None:
            return float(self.target_tokens)
        per_row = (self.labels[:, 1:] != IGNORE_INDEX).sum(dim=1).to(torch.float64)
        return float((per_row * self.sample_weights.to(torch.float64)).sum())


def collate(examples: Sequence[Example], pad_id: int) -> Batch:
    """Right-pad to the longest example; padding is masked out of attention and of the loss.

    Packed rows (examples with `position_ids`) get no attention mask: the padding after the last
    document is a separate position run of its own, and causal attention never lets a real token see
    a later pad, so position_ids alone keep every document to itself.
    """
    width = max(len(example) for example in examples)
    if any(example.position_ids is not None for example in examples):
        return _collate_packed(examples, pad_id, width)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        length = len(example)
        input_ids[row, :length] = torch.tensor(example.input_ids)
        labels[row, :length] = torch.tensor(example.labels)
        attention_mask[row, :length] = 1
    padded = bool((attention_mask == 0).any())
    weights = [example.weight for example in examples]
    return Batch(input_ids=input_ids, labels=labels, attention_mask=attention_mask if padded else None,
                 sample_weights=torch.tensor(weights) if any(w != 1.0 for w in weights) else None)


def _collate_packed(examples: Sequence[Example], pad_id: int, width: int) -> Batch:
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.arange(width, dtype=torch.long).repeat(len(examples), 1)
    for row, example in enumerate(examples):
        length = len(example)
        input_ids[row, :length] = torch.tensor(example.input_ids)
        labels[row, :length] = torch.tensor(example.labels)
        positions = example.position_ids if example.position_ids is not None else list(range(length))
        position_ids[row, :length] = torch.tensor(positions)
        position_ids[row, length:] = torch.arange(width - length)
    return Batch(input_ids=input_ids, labels=labels, attention_mask=None, position_ids=position_ids,
                 real_tokens=sum(len(example) for example in examples))


def pack_examples(examples: Sequence[Example], capacity: int) -> list[Example]:
    """Pack examples into rows of at most `capacity` tokens, first-fit by decreasing length.

    In each row the positions restart at 0 for every example and an example's first token is never
    the target of the previous example's last one, so a packed row trains exactly like its examples
    would one by one, with no padding between them. An example longer than `capacity` gets a row alone.
    """
    rows: list[list[Example]] = []
    room: list[int] = []
    for example in sorted(examples, key=len, reverse=True):
        for index, free in enumerate(room):
            if len(example) <= free:
                rows[index].append(example)
                room[index] -= len(example)
                break
        else:
            rows.append([example])
            room.append(capacity - len(example))
    packed = []
    for members in rows:
        input_ids, labels, positions = [], [], []
        for example in members:
            input_ids.extend(example.input_ids)
            labels.extend([IGNORE_INDEX] + list(example.labels[1:]))
            positions.extend(range(len(example)))
        packed.append(Example(input_ids=input_ids, labels=labels, position_ids=positions))
    return packed


def oversample(
    examples: Sequence[Example], labels: Sequence[Sequence[str]], factors: dict[str, float], seed: int
) -> list[Example]:
    """Repeat each example by the largest factor among its labels (its task, `tag:<name>` for each tag the
    data stage gave it; 1 when none is listed): whole copies, plus a seeded share for the fraction.

    The simple counterweight to a rare class: its examples weigh more in every epoch without any change
    to the loss.
    """
    rng = random.Random(f"oversample:{seed}")
    result: list[Example] = []
    for example, names in zip(examples, labels):
        factor = max((factors[name] for name in names if name in factors), default=1.0)
        copies = int(factor) + (1 if rng.random() < factor - int(factor) else 0)
        result.extend([example] * copies)
    return result


# ---------------------------------------------------------------- pretraining


def pack_documents(
    documents: Sequence[Sequence[int]],
    separator_id: int,
    seq_len: int,
    keep_remainder: bool,
    isolate_documents: bool = False,
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
    if not isolate_documents:
        return [Example(input_ids=block, labels=list(block)) for block in blocks]
    return [_isolated_block(block, separator_id) for block in blocks]


def _isolated_block(block: list[int], separator_id: int) -> Example:
    """Positions restart after each separator, so attention stays inside each document; the separator
    still closes its document and stays a target, and the next document's first token is not one."""
    positions, labels, position = [], [], 0
    for index, token in enumerate(block):
        restart = index > 0 and block[index - 1] == separator_id
        position = 0 if restart else position
        positions.append(position)
        labels.append(IGNORE_INDEX if restart else token)
        position += 1
    return Example(input_ids=block, labels=labels, position_ids=positions)


# ---------------------------------------------------------------- supervised fine-tuning


def chat_example(tokenizer, messages: list[dict[str, str]]) -> Example:
    """Render `messages` with the chat template; only assistant content and its end-of-turn are targets.

    A template with `{% generation %}` markers names the assistant's tokens itself (transformers'
    assistant mask). Checkpoints' own templates mostly have none: then each assistant turn is found
    as the text the template adds between the conversation before it (with the generation prompt)
    and the conversation up to it, and its tokens are picked by their character offsets.
    """
    from jinja2 import TemplateError

    from lmsmith.errors import UserError
    from lmsmith.tokenizer.chat import has_generation_markers

    try:
        if has_generation_markers(getattr(tokenizer, "chat_template", None)):
            encoded = tokenizer.apply_chat_template(
                messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
            )
            input_ids = list(encoded["input_ids"])
            mask = list(encoded["assistant_masks"])
        else:
            input_ids, mask = _rendered_assistant_mask(tokenizer, messages)
    except TemplateError as exc:
        roles = "/".join(message["role"] for message in messages)
        raise UserError(f"chat template: cannot render a {roles} conversation: {exc}; give another template "
                        "(model.chat_template: chatml, plain or a .jinja path)") from None
    labels = [token if supervised else IGNORE_INDEX for token, supervised in zip(input_ids, mask)]
    return Example(input_ids=input_ids, labels=labels)


def _rendered_assistant_mask(tokenizer, messages: list[dict[str, str]]) -> tuple[list[int], list[bool]]:
    from lmsmith.errors import UserError

    render = tokenizer.apply_chat_template
    text = render(messages, tokenize=False)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(messages[:index], tokenize=False, add_generation_prompt=True) if index else ""
        upto = render(messages[: index + 1], tokenize=False)
        if not (upto.startswith(prompt) and text.startswith(upto)):
            raise UserError(
                "chat template: rendering a conversation changes its earlier turns once later ones follow, so "
                "the assistant's tokens cannot be located; give a template with {% generation %} markers "
                "(model.chat_template: a .jinja path)")
        # What follows the end-of-turn (a newline before the next turn) is layout, not the answer.
        end = len(upto.rstrip())
        spans.append((len(prompt), max(end, len(prompt))))
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [any(start <= first < stop for start, stop in spans) for first, _ in encoded["offset_mapping"]]
    return list(encoded["input_ids"]), mask


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

    @classmethod
    def for_schedule(cls, examples: Sequence[Example], pad_id: int, schedule, num_processes: int, seed: int) -> "StepPlan":
        """The plan a stage's `TrainingSchedule` asks for; each step holds every process's micro-batches
        (dist.py splits them)."""
        return cls(
            examples,
            pad_id=pad_id,
            batch_size=schedule.batch_size,
            grad_accum_steps=schedule.grad_accum_steps * num_processes,
            epochs=schedule.epochs,
            max_steps=schedule.max_steps,
            seed=seed,
        )

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
        return self.steps(0)

    def steps(self, start: int = 0) -> Iterator[list[Batch]]:
        """The steps after the first `start` ones: a resumed run skips them without building their batches."""
        lengths = [len(example) for example in self.examples]
        epoch, emitted = divmod(start, self.steps_per_epoch)
        emitted = start
        first = start - epoch * self.steps_per_epoch
        while emitted < self.total_steps:
            order = length_grouped_order(lengths, self.batch_size, random.Random(f"{self.seed}:{epoch}"))
            for step in range(first, self.steps_per_epoch):
                micro = order[step * self.grad_accum_steps : (step + 1) * self.grad_accum_steps]
                yield [collate([self.examples[i] for i in batch], self.pad_id) for batch in micro]
                emitted += 1
                if emitted == self.total_steps:
                    return
            epoch, first = epoch + 1, 0


def eval_batches(examples: Sequence[Example], pad_id: int, batch_size: int) -> list[Batch]:
    """Fixed validation batches, sorted by length so padding stays small."""
    ordered = sorted(examples, key=len)
    return [collate(ordered[i : i + batch_size], pad_id) for i in range(0, len(ordered), batch_size)]
