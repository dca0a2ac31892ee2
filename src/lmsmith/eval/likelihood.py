"""Multiple choice by log-likelihood on a local causal LM (torch and transformers do the forward passes).

For each question every option is scored as the summed log-probability of its tokens after the prompt.
The split between prompt and option follows lm-evaluation-harness: the prompt and prompt + option are
tokenized whole, the option's tokens are those after the prompt's, and trailing spaces of the prompt move
to the option so that a merge across the boundary cannot hide them. Two accuracies:

- `acc`: the option with the highest log-likelihood;
- `acc_norm`: the highest log-likelihood per byte of option text (UTF-8), so long options are not
  penalised for their length; lm-eval normalises by characters, bytes treat Chinese and English alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from lmsmith.eval.stats import bootstrap_stderr


@dataclass(frozen=True)
class ChoiceItem:
    """One question: the prompt, the option texts as they follow it, and the index of the right one."""

    prompt: str
    options: tuple[str, ...]
    gold: int


def split_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-evaluation-harness splits them."""
    trailing = len(context) - len(context.rstrip())
    if trailing:
        context, continuation = context[:-trailing], context[-trailing:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    head = tokenizer(context, add_special_tokens=False)["input_ids"]
    return whole[: len(head)], whole[len(head):]


@torch.inference_mode()
def continuation_logprobs(model, tokenizer, pairs: Sequence[tuple[str, str]], batch_size: int = 16) -> list[float]:
    """Summed log-probability of each continuation given its context, batched with right padding.

    A one-token continuation (an option letter, a short label) needs only the distribution after its
    context, so the options of one question share a single forward pass; only the positions that
    predict continuation tokens go through the log-softmax.
    """
    encoded = [split_pair(tokenizer, context, continuation) for context, continuation in pairs]
    rows: list[list[int]] = []
    row_of: dict[tuple[int, ...], int] = {}
    needs: list[tuple[int, list[tuple[int, int]]]] = []  # per pair: (row, [(position, target token)])
    for (head, tail), (_, continuation) in zip(encoded, pairs):
        if not tail:
            raise ValueError(f"option {continuation!r} adds no token to its prompt")
        row = head if (head and len(tail) == 1) else head + tail
        index = row_of.setdefault(tuple(row), len(rows))
        if index == len(rows):
            rows.append(row)
        # Position t predicts token t + 1; with no context the first continuation token has no prediction.
        first = max(len(head) - 1, 0)
        targets = [(first + j, (head + tail)[first + j + 1]) for j in range(len(tail)) if first + j + 1 < len(head + tail)]
        needs.append((index, targets))
    by_row: dict[int, list[int]] = {}
    for pair, (index, _) in enumerate(needs):
        by_row.setdefault(index, []).append(pair)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    scores = [0.0] * len(pairs)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start: start + batch_size]
        width = max(len(row) for row in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, row in enumerate(chunk):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        for i in range(len(chunk)):
            for pair in by_row[start + i]:
                targets = needs[pair][1]
                if not targets:
                    continue
                positions = torch.tensor([position for position, _ in targets], device=logits.device)
                logprobs = F.log_softmax(logits[i, positions].float(), dim=-1)
                tokens = torch.tensor([token for _, token in targets], device=logits.device)
                scores[pair] = float(logprobs.gather(-1, tokens.unsqueeze(-1)).sum())
    return scores


def best_per_group(scores: Sequence[float], sizes: Sequence[int]) -> list[int]:
    """The index of the highest score within each consecutive group of `sizes` scores (the options of one
    question, the labels of one text)."""
    picked, at = [], 0
    for size in sizes:
        group = scores[at: at + size]
        picked.append(max(range(size), key=group.__getitem__))
        at += size
    if at != len(scores):
        raise ValueError(f"{len(scores)} scores for groups of {sum(sizes)}")
    return picked


@dataclass(frozen=True)
class LikelihoodScores:
    acc: float
    acc_norm: float
    acc_stderr: float | None
    acc_norm_stderr: float | None
    items: int
    predictions: list[int]

    def as_dict(self) -> dict:
        return {"acc": self.acc, "acc_stderr": self.acc_stderr, "acc_norm": self.acc_norm,
                "acc_norm_stderr": self.acc_norm_stderr, "items": self.items}


def score_by_likelihood(model, tokenizer, items: Sequence[ChoiceItem], batch_size: int = 16) -> LikelihoodScores:
    """acc and acc_norm (0–100) with bootstrap standard errors over `items`."""
    pairs = [(item.prompt, option) for item in items for option in item.options]
    flat = continuation_logprobs(model, tokenizer, pairs, batch_size)
    sizes = [len(item.options) for item in items]
    options = [option for item in items for option in item.options]
    per_byte = [score / max(1, len(option.encode("utf-8"))) for score, option in zip(flat, options)]
    predictions = best_per_group(flat, sizes)
    right = [100.0 * (best == item.gold) for best, item in zip(predictions, items)]
    right_norm = [100.0 * (best == item.gold) for best, item in zip(best_per_group(per_byte, sizes), items)]
    n = len(items)
    return LikelihoodScores(
        acc=sum(right) / n if n else 0.0, acc_norm=sum(right_norm) / n if n else 0.0,
        acc_stderr=bootstrap_stderr(right), acc_norm_stderr=bootstrap_stderr(right_norm), items=n,
        predictions=predictions,
    )
