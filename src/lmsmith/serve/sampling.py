"""Per-request sampling settings and the choice of next tokens from logits (torch).

The order of the logits processors follows transformers' `generate`: repetition penalty, temperature,
top-k, top-p. Each request draws from its own `torch.Generator`, so a seeded request gives the same
answer whatever else shares its batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


MAX_TOP_LOGPROBS = 20  # as vLLM's default max_logprobs; OpenAI allows 5 for completions, 20 for chat


@dataclass(frozen=True)
class SamplingParams:
    """What a request asks of generation; the OpenAI fields of the same names map onto these.

    top_k 0 keeps every token; repetition_penalty 1.0 is off (above 1 discourages tokens already in the
    prompt or the answer, as transformers' `repetition_penalty` does). max_tokens 0 computes the prompt
    and generates nothing (to read its prompt logprobs). `logprobs` / `prompt_logprobs`: None reports
    none; k >= 0 reports each generated / prompt token's logprob with the k most likely alternatives.
    `timeout_s`: the request is dropped (freeing its KV slot) if its answer is not complete this many
    seconds after it was submitted. `grammar`: an llguidance grammar (`lmsmith.serve.structured` writes them) the answer must follow;
    the engine masks every token it does not allow.
    """

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    top_k: int = 0
    repetition_penalty: float = 1.0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    grammar: str | None = None
    timeout_s: float | None = None

    def __post_init__(self) -> None:
        if self.timeout_s is not None and not self.timeout_s > 0:
            raise ValueError("timeout must be > 0 seconds")
        if self.max_tokens < 0:
            raise ValueError("max_tokens must be >= 0")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= MAX_TOP_LOGPROBS:
                raise ValueError(f"{name} must be between 0 and {MAX_TOP_LOGPROBS}")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0 (0 keeps every token)")
        if self.repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be > 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def plain_greedy(self) -> bool:
        """Greedy with nothing else to apply: a batch of these is one argmax."""
        return self.greedy and self.repetition_penalty == 1.0


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """A private random stream per request, so a seeded request repeats whatever else is running."""
    if params.greedy:
        return None
    generator = torch.Generator(device=device)
    if params.seed is None:
        generator.seed()
    else:
        generator.manual_seed(params.seed)
    return generator


def apply_repetition_penalty(logits: torch.Tensor, previous_ids: Sequence[int], penalty: float) -> torch.Tensor:
    """Divide positive (multiply negative) logits of tokens already seen by `penalty`."""
    ids = torch.as_tensor(list(previous_ids), dtype=torch.long, device=logits.device)
    if ids.numel() == 0:
        return logits
    seen = logits.gather(-1, ids)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return logits.scatter(-1, ids, seen)


def sample_next_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None,
                      previous_ids: Sequence[int] = ()) -> int:
    """Pick a token from one row of logits: argmax when greedy, else temperature, top-k and nucleus sampling.

    `previous_ids` (prompt and answer so far) is only read for the repetition penalty.
    """
    logits = logits.float()
    if params.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, previous_ids, params.repetition_penalty)
    if params.greedy:
        return int(logits.argmax())
    logits = logits / params.temperature
    if 0 < params.top_k < logits.shape[-1]:
        kth_best = torch.topk(logits, params.top_k).values[..., -1]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # A token stays when the mass ranked above it has not yet reached top_p; the top one always stays.
        outside_nucleus = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= params.top_p
        sorted_probs = sorted_probs.masked_fill(outside_nucleus, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return int(torch.multinomial(probs, num_samples=1, generator=generator))


def sample_rows(logits: torch.Tensor, params: Sequence[SamplingParams],
                generators: Sequence[torch.Generator | None], histories: Sequence[Sequence[int]]) -> list[int]:
    """One token per row of `logits` [rows, vocab]; plain greedy rows share one argmax (one device sync)."""
    tokens = logits.argmax(dim=-1).tolist()
    for row, row_params in enumerate(params):
        if not row_params.plain_greedy:
            tokens[row] = sample_next_token(logits[row], row_params, generators[row], histories[row])
    return tokens


def token_logprobs(logits: torch.Tensor, token_ids: Sequence[int], top: int) -> list[tuple[float, list[tuple[int, float]]]]:
    """Each row's logprob of its token in `token_ids` and its `top` most likely (id, logprob), from raw logits."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    ids = torch.as_tensor(list(token_ids), dtype=torch.long, device=logits.device)
    chosen = logprobs.gather(-1, ids.unsqueeze(-1)).squeeze(-1).tolist()
    if top <= 0:
        return [(value, []) for value in chosen]
    values, indices = torch.topk(logprobs, min(top, logprobs.shape[-1]), dim=-1)
    return [(value, list(zip(row_ids, row_values)))
            for value, row_ids, row_values in zip(chosen, indices.tolist(), values.tolist())]
