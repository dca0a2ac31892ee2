"""Embedding rows an adapter trained beside its LoRA matrices (peft's trainable tokens), applied per request.

lmsmith's LoRA training trains the rows of tokens its SFT data uses (`train_tokens: used`): a base never
saw the chat markers. peft saves those rows as `...embed_tokens.token_adapter.trainable_tokens_delta`
(the rows' new values, [n, hidden]) with their ids in `trainable_token_indices`; with tied embeddings
the LM head uses the same rows, and an untied head may carry its own (`...lm_head...`). Requests for
such an adapter read the adapter's rows instead of the base's: at the embedding for their input tokens,
and in the LM head for those tokens' logits. Other requests in the same step are untouched.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmsmith.errors import UserError

_TOKEN_KEY = re.compile(r"(embed_tokens|lm_head)\.token_adapter\.trainable_tokens_delta(?:\.[\w-]+)?$")


@dataclass(frozen=True)
class TokenSpace:
    """What an adapter's token rows must fit: the base's vocabulary, width, and whether its head is tied."""

    vocab: int
    hidden: int
    tied: bool


@dataclass
class TokenRows:
    ids: torch.Tensor  # [n] token ids
    values: torch.Tensor  # [n, hidden] their rows


@dataclass
class AdapterTokens:
    """The rows an adapter replaces at the input embedding and at the LM head (either may be None)."""

    embedding: TokenRows | None = None
    head: TokenRows | None = None

    def __bool__(self) -> bool:
        return self.embedding is not None or self.head is not None


def extract_token_rows(raw: dict[str, torch.Tensor], config: dict[str, Any], folder: Path,
                       space: TokenSpace) -> AdapterTokens:
    """Take the trainable-token tensors out of `raw` (the adapter's state dict) and check them."""
    found = {}
    for key in list(raw):
        match = _TOKEN_KEY.search(key)
        if match is not None:
            found[match.group(1)] = raw.pop(key)
    tokens = AdapterTokens()
    if not found:
        return tokens
    indices = config.get("trainable_token_indices")
    for module, values in found.items():
        ids = _indices_for(module, indices, folder)
        if values.dim() != 2 or values.shape != (len(ids), space.hidden):
            raise UserError(f"{folder}: {module} token rows have shape {tuple(values.shape)}; "
                            f"expected ({len(ids)}, {space.hidden}) for trainable_token_indices")
        if ids and not 0 <= min(ids) <= max(ids) < space.vocab:
            raise UserError(f"{folder}: trainable_token_indices for {module} fall outside the base's "
                            f"vocabulary of {space.vocab}")
        rows = TokenRows(torch.tensor(ids, dtype=torch.long), values.float())
        if module == "embed_tokens":
            tokens.embedding = rows
        else:
            tokens.head = rows
    if space.tied and tokens.embedding is not None and tokens.head is None:
        tokens.head = tokens.embedding
    return tokens


def _indices_for(module: str, indices: Any, folder: Path) -> list[int]:
    if isinstance(indices, list) and module == "embed_tokens":
        return [int(i) for i in indices]
    if isinstance(indices, dict):
        for name, ids in indices.items():
            if name == module or name.endswith("." + module):
                return [int(i) for i in ids]
    raise UserError(f"{folder}: adapter_config.json has no trainable_token_indices for its {module} rows")


class TokenOverrides:
    """The loaded adapters' token rows by bank row, applied inside a step (eager shapes only)."""

    def __init__(self, dtype: torch.dtype, device: torch.device):
        self.dtype = dtype
        self.device = device
        self._embedding: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # row -> (id -> slot map, values)
        self._head: dict[int, TokenRows] = {}

    def install(self, row: int, tokens: AdapterTokens, vocab: int) -> None:
        if tokens.embedding is not None:
            lookup = torch.full((vocab,), -1, dtype=torch.long, device=self.device)
            lookup[tokens.embedding.ids.to(self.device)] = torch.arange(len(tokens.embedding.ids), device=self.device)
            self._embedding[row] = (lookup, tokens.embedding.values.to(self.device, self.dtype))
        if tokens.head is not None:
            self._head[row] = TokenRows(tokens.head.ids.to(self.device), tokens.head.values.to(self.device, self.dtype))

    def remove(self, row: int) -> None:
        self._embedding.pop(row, None)
        self._head.pop(row, None)

    def uses(self, rows: set[int]) -> bool:
        """Whether any of these bank rows replaces token rows (such steps run eagerly)."""
        return any(row in self._embedding or row in self._head for row in rows)

    def apply_to_embeddings(self, hidden: torch.Tensor, input_ids: torch.Tensor,
                            segments: tuple[tuple[int, torch.Tensor | None], ...]) -> torch.Tensor:
        """`hidden` ([tokens, hidden], the embedding's fresh output, written in place) with each adapter's
        rows in place of the base's, for its own tokens."""
        for row, tokens in segments:
            if row not in self._embedding:
                continue
            lookup, values = self._embedding[row]
            positions = torch.arange(len(input_ids), device=hidden.device) if tokens is None else tokens
            slots = lookup[input_ids[positions]]
            hit = slots >= 0
            if bool(hit.any()):
                hidden[positions[hit]] = values[slots[hit]]
        return hidden

    def apply_to_logits(self, logits: torch.Tensor, normed: torch.Tensor, sample_rows: list[int]) -> torch.Tensor:
        """Logits of each sampled row ([rows, vocab]) with its adapter's head rows for their tokens."""
        for row in {row for row in sample_rows if row in self._head}:
            head = self._head[row]
            which = torch.tensor([i for i, r in enumerate(sample_rows) if r == row], device=logits.device)
            replaced = (normed[which] @ head.values.t()).to(logits.dtype)  # [rows, n]
            logits[which.unsqueeze(1), head.ids.unsqueeze(0)] = replaced
        return logits
