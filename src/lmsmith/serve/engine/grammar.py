"""Constrained decoding: a request's grammar as a mask over the next token, applied in the batched step.

llguidance does the heavy lifting: it wraps the model's tokenizer once (`GrammarTokens`, lazily, as it
costs about a second on a 150k vocabulary), compiles each request's grammar (JSON schema or Lark, as
`lmsmith.serve.structured` writes them) into a matcher, and fills the allowed-token bitmask for each
step. Rows of the batch without a grammar cost nothing: the engine calls `mask_rows` only with the
constrained rows.
"""

from __future__ import annotations

import threading
from typing import Any, Iterable

import numpy as np
import torch


class GrammarError(ValueError):
    """The request's grammar does not compile against this tokenizer (the caller's fault: a 400)."""


class GrammarTokens:
    """The tokenizer as llguidance sees it, built on first use and shared by every matcher."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_ids: Iterable[int]):
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size  # the logits' width: a padded embedding is wider than the tokenizer
        self._eos_ids = sorted(eos_ids)
        self._lock = threading.Lock()
        self._built: Any = None

    def get(self) -> Any:
        with self._lock:
            if self._built is None:
                import llguidance.hf

                self._built = llguidance.hf.from_tokenizer(
                    self._tokenizer, n_vocab=self._vocab_size, eos_token=self._eos_ids or None)
            return self._built

    def matcher(self, grammar: str) -> "Constraint":
        """A fresh matcher for `grammar`; GrammarError when it does not compile."""
        import llguidance

        matcher = llguidance.LLMatcher(self.get(), grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(_first_line(matcher.get_error()))
        return Constraint(matcher, self._vocab_size)


class Constraint:
    """One request's position in its grammar: which tokens may come next, and the tokens taken so far."""

    def __init__(self, matcher: Any, vocab_size: int):
        self._matcher = matcher
        self._words = (vocab_size + 31) // 32
        self.vocab_size = vocab_size

    def fill(self, bitmask: np.ndarray) -> None:
        """Write the allowed-token bits (bit i of word i // 32 for token i) into `bitmask` (int32, one row)."""
        self._matcher.unsafe_compute_mask_ptr(bitmask.ctypes.data, self._words * 4)

    def consume(self, token: int) -> None:
        """Advance past the sampled token; a token the mask allowed is always accepted."""
        if not self._matcher.consume_token(token):
            raise GrammarError(f"the grammar refused token {token}: {_first_line(self._matcher.get_error())}")


def mask_rows(logits: torch.Tensor, constraints: list[tuple[int, Constraint]]) -> torch.Tensor:
    """`logits` with each constrained row's disallowed tokens at -inf (a copy: the raw logits stay for logprobs).

    Columns past the grammar's vocabulary (none, when the model's embedding and the tokenizer agree) are
    disallowed too.
    """
    masked = logits.float().clone()
    words = (masked.shape[-1] + 31) // 32
    bits = np.zeros((len(constraints), words), dtype=np.int32)
    for index, (_, constraint) in enumerate(constraints):
        constraint.fill(bits[index])
    allowed = np.unpackbits(bits.view(np.uint8), axis=1, bitorder="little")[:, :masked.shape[-1]].astype(bool)
    rows = torch.tensor([row for row, _ in constraints], device=masked.device)
    allowed_rows = torch.from_numpy(allowed).to(masked.device, non_blocking=True)
    masked[rows] = masked[rows].masked_fill(~allowed_rows, float("-inf"))
    return masked


def _first_line(error: str) -> str:
    return (error or "unknown grammar error").strip().splitlines()[0]
