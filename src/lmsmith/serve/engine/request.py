"""A request's state inside the engine, and what callers get back from it.

The engine thread hands each request's consumer a `TokenDelta` per step (token ids, never text); the
consumer turns them into text `Chunk`s (`engine/output.py`, `TextAssembler`), so detokenizing and stop
strings never cost an engine step.
"""

from __future__ import annotations

import time

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional, Union

import torch

from lmsmith.serve.sampling import SamplingParams, make_generator

if TYPE_CHECKING:
    from lmsmith.serve.engine.grammar import Constraint


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the model, and the `top` most likely tokens at its position.

    Log-probabilities are of the model's own distribution (log-softmax of the raw logits), before
    temperature, top-k/top-p or the repetition penalty reshape it, as vLLM reports them by default.
    """

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), most likely first


PromptLogprobs = tuple[Optional[TokenLogprob], ...]  # one per prompt token; the first is None (nothing before it)


@dataclass(frozen=True)
class Chunk:
    """A piece of an answer as it is generated; the last one carries the finish reason.

    `logprobs`: one per token generated since the previous chunk, when the request asked for them (a
    token whose text is still held back, an unfinished character or a possible stop string, is reported
    with the chunk that releases it). `prompt_logprobs`: on the first chunk, when the request asked.
    """

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None = None  # "stop" (eos or stop string), "length", "cancelled"
    logprobs: tuple[TokenLogprob, ...] = ()
    prompt_logprobs: PromptLogprobs | None = None


@dataclass(frozen=True)
class TokenDelta:
    """One step's news for one request, from the engine thread to the request's consumer."""

    token_id: int | None  # the newest token; None when the request ended without one (cancelled)
    prompt_tokens: int
    completion_tokens: int
    # "stop": the token is an end-of-sequence token (never text); "length"; "cancelled"; or a reason the
    # consumer asked for when it ended the request itself (a stop string)
    finish_reason: str | None = None
    logprob: TokenLogprob | None = None  # of `token_id`, when the request asked for logprobs
    prompt_logprobs: PromptLogprobs | None = None  # with the request's first delta, when it asked


@dataclass(frozen=True)
class Completion:
    """A whole answer, for callers that do not stream."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    logprobs: tuple[TokenLogprob, ...] = ()
    prompt_logprobs: PromptLogprobs | None = None

    @classmethod
    def of(cls, chunks: "list[Chunk]") -> "Completion":
        """The answer that `chunks` (the last with the finish reason) spell out."""
        if not chunks or chunks[-1].finish_reason is None:
            raise EngineError("the engine ended the request without an answer")
        last = chunks[-1]
        prompt_logprobs = next((chunk.prompt_logprobs for chunk in chunks if chunk.prompt_logprobs is not None), None)
        return cls("".join(chunk.text for chunk in chunks), last.finish_reason, last.prompt_tokens,
                   last.completion_tokens, tuple(lp for chunk in chunks for lp in chunk.logprobs), prompt_logprobs)


class EngineError(RuntimeError):
    """Generation failed inside the engine (not the caller's fault); `status` is the HTTP status the API
    answers with."""

    status = 500
    retry_after_s: int | None = None


class Overloaded(EngineError):
    """Dropped because the server is saturated: the client should come back later."""

    status = 503
    retry_after_s = 1


class DeadlineExceeded(EngineError):
    """The request's own `timeout` passed before its answer was complete; its KV slot is freed."""

    status = 504


class UnknownAdapterError(ValueError):
    """A request named a LoRA adapter that is not loaded (never was, or was removed)."""


Event = Union[TokenDelta, EngineError]
Sink = Callable[[Event], None]


class Sequence:
    """One request while the engine works on it.

    `token_ids` holds the prompt followed by the answer so far; `num_computed` counts the leading tokens
    whose keys and values are in the sequence's KV slot. Each step computes some of the rest (a prompt
    piece, or the one newest token), and once all are computed the next token is sampled.
    """

    def __init__(self, request_id: int, prompt_ids: list[int], params: SamplingParams, sink: Sink,
                 device: torch.device, lora_name: str | None = None, lora_index: int = 0,
                 constraint: "Constraint | None" = None):
        self.request_id = request_id
        self.token_ids = list(prompt_ids)
        self.num_prompt = len(prompt_ids)
        self.num_computed = 0
        self.params = params
        self.sink = sink
        self.lora_name = lora_name
        self.lora_index = lora_index  # row of the adapter bank; 0 is the base model
        self.slot: int | None = None  # KV slot, assigned by the scheduler on admission
        self.generator = make_generator(params, device)
        self.constraint = constraint  # the grammar's matcher, when params.grammar asks for one
        self.finish_reason: str | None = None
        # filled while the prompt is computed, when params.prompt_logprobs asks; delivered with the first delta
        self.prompt_logprobs: list[TokenLogprob | None] | None = [None] if params.prompt_logprobs is not None else None
        self.prompt_logprobs_sent = False
        self.cancel_reason = "cancelled"
        self.arrived = time.monotonic()  # when it was submitted: the queue deadline counts from here
        self.deadline = None if params.timeout_s is None else self.arrived + params.timeout_s
        self._cancelled = threading.Event()

    def cancel(self, reason: str = "cancelled") -> None:
        """Ask the engine to drop this sequence at its next step (safe from any thread; the first reason wins).

        "cancelled" is an abandoned request; the consumer ends a request with "stop" when it sees a stop string.
        """
        if not self._cancelled.is_set():
            self.cancel_reason = reason
            self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def length(self) -> int:
        return len(self.token_ids)

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - self.num_prompt

    @property
    def num_pending(self) -> int:
        """Tokens whose keys and values are not yet in the cache."""
        return len(self.token_ids) - self.num_computed
