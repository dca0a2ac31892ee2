"""Batched generation from chat messages, and loading of the models the pipeline writes.

transformers does the modelling (the forward pass and its KV cache, `DynamicCache`) and renders prompts
with the tokenizer's chat template. The decode loop is ours: it is a few lines, it lets eval and compress
count exactly how many new tokens each sequence produced and time just the decoding, and
`stop_at_eos=False` gives the fixed-length decodes a speed benchmark needs. With `do_sample=False` it makes the same choices as `model.generate` with greedy decoding.

`load_causal_lm` reads either a plain HF folder or a variant folder written by the compress stage
(`lmsmith.compress.folder`).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch

from lmsmith.console import Tracker, track
from lmsmith.errors import UserError

Messages = list[dict[str, str]]


@dataclass
class Generation:
    """Decoded continuations, how many new tokens each one used (eos included) and the loop's wall time."""

    texts: list[str]
    new_tokens: list[int]
    wall_s: float

    @property
    def tokens_per_s(self) -> float:
        return sum(self.new_tokens) / self.wall_s if self.wall_s > 0 else 0.0


def load_causal_lm(path: str | Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Load an HF causal-LM folder, or a compress-stage variant folder, in eval mode on CPU."""
    from lmsmith.compress.folder import is_compressed_folder, load_variant

    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: model folder not found")
    if is_compressed_folder(path):
        return load_variant(path)
    from lmsmith.train.model import read_pretrained

    return read_pretrained(path, str(path), dtype=dtype).eval()


def load_tokenizer(path: str | Path):
    """The tokenizer saved beside a model (see `lmsmith.train.model.load_tokenizer`), left-padded for
    batched generation."""
    from lmsmith.train.model import load_tokenizer as load_saved_tokenizer

    tokenizer = load_saved_tokenizer(path)
    tokenizer.padding_side = "left"
    return tokenizer


def eos_token_ids(model: torch.nn.Module, tokenizer) -> set[int]:
    """Every id that ends an answer: the tokenizer's eos, the chat template's end of turn and the
    model's generation-config eos (`lmsmith.train.model.stop_token_ids`)."""
    from lmsmith.train.model import stop_token_ids

    return {int(token) for token in stop_token_ids(tokenizer, model)}


def render_prompts(tokenizer, conversations: Sequence[Messages]) -> list[str]:
    """Chat-template each conversation, ending with the assistant's turn opened."""
    return [
        tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        for messages in conversations
    ]


def _choose_next(
    logits: torch.Tensor, do_sample: bool, temperature: float, top_p: float, generator: torch.Generator | None
) -> torch.Tensor:
    if not do_sample:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / max(temperature, 1e-5), dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token is always kept).
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs > top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def decode_batch(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    eos_ids: set[int],
    pad_id: int,
    stop_at_eos: bool = True,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Decode up to `max_new_tokens` for a left-padded batch; returns the new ids (pad after eos).

    A row that has produced its eos leaves the batch (its cache rows are dropped), so the steps that
    finish the longest answers compute only the rows still writing.
    """
    from transformers import DynamicCache

    batch = input_ids.shape[0]
    eos = torch.tensor(sorted(eos_ids), dtype=torch.long)
    # Left padding shifts each row, so positions come from the mask, as in `generate`.
    position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
    cache = DynamicCache(config=model.config)
    new_ids = torch.full((batch, max_new_tokens), pad_id, dtype=torch.long)
    rows = torch.arange(batch)  # the original row of each row still in the batch
    steps = 0
    step_ids = input_ids
    for step in range(max_new_tokens):
        out = model(
            input_ids=step_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        next_ids = _choose_next(out.logits[:, -1, :], do_sample, temperature, top_p, generator)
        new_ids[rows, step] = next_ids
        steps = step + 1
        if stop_at_eos:
            finished = torch.isin(next_ids, eos)
            if bool(finished.all()):
                break
            if bool(finished.any()):
                keep = (~finished).nonzero().squeeze(1)
                rows, next_ids = rows[keep], next_ids[keep]
                attention_mask, position_ids = attention_mask[keep], position_ids[keep]
                cache.batch_select_indices(keep)
        step_ids = next_ids[:, None]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(rows), 1)], dim=-1)
        position_ids = position_ids[:, -1:] + 1
    return new_ids[:, :steps]


def _trim(new_ids: list[int], eos_ids: set[int], stop_at_eos: bool) -> tuple[list[int], int]:
    """Content ids (before eos) and the count of generated tokens (eos included)."""
    if not stop_at_eos:
        return new_ids, len(new_ids)
    for index, token in enumerate(new_ids):
        if token in eos_ids:
            return new_ids[:index], index + 1
    return new_ids, len(new_ids)


def generate_chat(
    model: torch.nn.Module,
    tokenizer,
    conversations: Sequence[Messages],
    max_new_tokens: int = 96,
    batch_size: int = 8,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    stop_at_eos: bool = True,
    progress: str | None = None,
) -> Generation:
    """Answer each conversation (its last turn is the user's); greedy unless `do_sample`.

    Prompts are batched by length with left padding; the answers come back in the order given.
    `stop_at_eos=False` always produces `max_new_tokens` per prompt, for throughput measurements.
    """
    prompts = render_prompts(tokenizer, conversations)
    eos_ids = eos_token_ids(model, tokenizer)
    # Finished rows are filled with pad (or eos) ids; they are cut off again before decoding.
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos_ids, default=0)
    generator = torch.Generator().manual_seed(seed) if do_sample else None
    previous_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    wall = 0.0
    # Prompts of similar length batch together (less left padding); answers come back in the given order.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    answers: dict[int, tuple[str, int]] = {}
    try:
        with maybe_track(progress, len(prompts)) as tracker:
            for chunk in batches:
                encoded = tokenizer([prompts[i] for i in chunk], return_tensors="pt", padding=True,
                                    add_special_tokens=False)
                started = time.perf_counter()
                new_ids = decode_batch(
                    model,
                    encoded["input_ids"],
                    encoded["attention_mask"],
                    max_new_tokens,
                    eos_ids,
                    pad_id,
                    stop_at_eos=stop_at_eos,
                    do_sample=do_sample,
                    temperature=temperature,
                    top_p=top_p,
                    generator=generator,
                )
                wall += time.perf_counter() - started
                for index, row in zip(chunk, new_ids.tolist()):
                    content, used = _trim(row, eos_ids, stop_at_eos)
                    answers[index] = (tokenizer.decode(content, skip_special_tokens=True).strip(), used)
                if tracker is not None:
                    done = sum(used for _, used in answers.values())
                    tracker.advance(len(chunk), tok_s=done / wall if wall else 0.0)
    finally:
        tokenizer.padding_side = previous_side
    texts = [answers[i][0] for i in range(len(prompts))]
    counts = [answers[i][1] for i in range(len(prompts))]
    return Generation(texts=texts, new_tokens=counts, wall_s=wall)


@contextmanager
def maybe_track(description: str | None, total: int) -> Iterator[Tracker | None]:
    """A progress bar when `description` is given, nothing otherwise (callers that show their own)."""
    if description is None:
        yield None
        return
    with track(description, total) as tracker:
        yield tracker
