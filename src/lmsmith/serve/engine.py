"""The inference engine behind `lmsmith serve` and `lmsmith chat`.

transformers does the modelling: the causal LM's forward pass with a `DynamicCache` per sequence, so a
decode step feeds one token and reuses the keys and values of everything before it. The tokenizer renders
prompts with its chat template. The engine is split the way a continuous-batching engine is:

- `Scheduler` decides which sequences take part in the next step (FIFO admission, `max_running` at once);
- `ModelRunner` does the forward passes for those sequences and returns one row of logits each;
- `Engine` owns one worker thread that loops schedule → forward → sample → detokenize → deliver, so the
  HTTP event loop never waits on torch, and callers only submit requests and read their chunks.

A batching engine replaces the runner (one padded or paged forward for all running sequences) and raises
`max_running`; the request/chunk interface and everything above it stay as they are.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import queue
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator, Union

import torch

from lmsmith.errors import UserError
from lmsmith.serve.sampling import SamplingParams, make_generator, sample_next_token
from lmsmith.serve.text import IncrementalDetokenizer, StopStringFilter

log = logging.getLogger("lmsmith.serve")

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class Chunk:
    """A piece of an answer as it is generated; the last one carries the finish reason."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None = None  # "stop" (eos or stop string), "length", "cancelled"


@dataclass(frozen=True)
class Completion:
    """A whole answer, for callers that do not stream."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


class EngineError(RuntimeError):
    """Generation failed inside the engine (not the caller's fault)."""


Event = Union[Chunk, EngineError]
Sink = Callable[[Event], None]


class Sequence:
    """One request's state while the engine works on it: its cache, its tokens, its text so far."""

    def __init__(self, request_id: int, prompt_ids: list[int], params: SamplingParams, sink: Sink,
                 tokenizer: Any, device: torch.device):
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self.params = params
        self.sink = sink
        self.output_ids: list[int] = []
        self.cache: Any = None
        self.detokenizer = IncrementalDetokenizer(tokenizer)
        self.stops = StopStringFilter(params.stop)
        self.generator = make_generator(params, device)
        self.finish_reason: str | None = None
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        """Ask the engine to stop this sequence at its next step (safe from any thread, idempotent)."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)


class Scheduler:
    """Which sequences run in the next step: running ones keep their place, waiting ones join FIFO."""

    def __init__(self, max_running: int = 1):
        self.max_running = max_running
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []
        self._condition = threading.Condition()
        self._closed = False

    def add(self, sequence: Sequence) -> None:
        with self._condition:
            if self._closed:
                raise EngineError("the engine is shut down")
            self._waiting.append(sequence)
            self._condition.notify()

    def next_step(self) -> list[Sequence] | None:
        """Block until there is work; None once closed."""
        with self._condition:
            self._running = [seq for seq in self._running if not seq.finished]
            while not self._closed and not self._running and not self._waiting:
                self._condition.wait()
            if self._closed:
                return None
            while self._waiting and len(self._running) < self.max_running:
                self._running.append(self._waiting.popleft())
            return list(self._running)

    def close(self) -> None:
        with self._condition:
            self._closed = True
            self._condition.notify_all()

    def drain(self) -> list[Sequence]:
        """Every sequence still held (after close): the worker fails them."""
        with self._condition:
            left = [seq for seq in self._running if not seq.finished] + list(self._waiting)
            self._running, self._waiting = [], deque()
            return left

    def counts(self) -> dict[str, int]:
        with self._condition:
            running = sum(1 for seq in self._running if not seq.finished)
            return {"running": running, "waiting": len(self._waiting)}


class ModelRunner:
    """Forward passes: the prompt on a sequence's first step, then only its newest token."""

    def __init__(self, model: Any):
        self.model = model
        self.device = next(model.parameters()).device
        # Prefill only needs the last position's logits; skip projecting the whole prompt when possible.
        self._keeps_last_logits_only = "logits_to_keep" in inspect.signature(model.forward).parameters

    @torch.inference_mode()
    def forward(self, sequences: list[Sequence]) -> list[torch.Tensor]:
        from transformers import DynamicCache

        rows = []
        for seq in sequences:
            if seq.cache is None:
                seq.cache = DynamicCache(config=self.model.config)
                tokens = seq.prompt_ids
            else:
                tokens = seq.output_ids[-1:]
            input_ids = torch.tensor([tokens], dtype=torch.long, device=self.device)
            extra = {"logits_to_keep": 1} if self._keeps_last_logits_only else {}
            output = self.model(input_ids=input_ids, past_key_values=seq.cache, use_cache=True, **extra)
            seq.cache = output.past_key_values
            rows.append(output.logits[0, -1])
        return rows


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise UserError(f"device: {device!r} is not a torch device ({exc})") from None


class Engine:
    """Owns the model and tokenizer; generation runs on one background thread.

    Submit with `stream` (async iterator of chunks), `stream_sync` (plain iterator) or `complete`.
    Leaving a stream early cancels its request: the worker drops it at the next step.
    """

    def __init__(self, model: Any, tokenizer: Any, max_running: int = 1):
        self.model = model
        self.tokenizer = tokenizer
        self._runner = ModelRunner(model)
        self._scheduler = Scheduler(max_running=max_running)
        self._eos_ids = self._find_eos_ids(model, tokenizer)
        self.max_context: int | None = getattr(model.config, "max_position_embeddings", None)
        self._ids = itertools.count(1)
        self._stats_lock = threading.Lock()
        self._stats = {"completed": 0, "cancelled": 0, "failed": 0, "prompt_tokens": 0, "completion_tokens": 0}
        self._worker = threading.Thread(target=self._work, name="lmsmith-engine", daemon=True)
        self._worker.start()

    @classmethod
    def load(cls, model_dir: str | Path, device: str = "auto", dtype: str = "auto") -> "Engine":
        """Load an HF model folder or a compress-stage int8 folder (weights and tokenizer with a chat template)."""
        from lmsmith.generation import is_quantized_folder, load_causal_lm, load_tokenizer

        model_dir = Path(model_dir)
        target = resolve_device(device)
        try:
            tokenizer = load_tokenizer(model_dir)
            if is_quantized_folder(model_dir):
                model = load_causal_lm(model_dir)
            else:
                from transformers import AutoModelForCausalLM

                model = AutoModelForCausalLM.from_pretrained(
                    model_dir, dtype=dtype if dtype == "auto" else getattr(torch, dtype)
                )
        except (OSError, ValueError) as exc:
            raise UserError(f"{model_dir}: cannot load the model: {exc}") from None
        if not getattr(tokenizer, "chat_template", None):
            raise UserError(f"{model_dir}: the tokenizer has no chat template, so chat requests cannot be rendered")
        model.to(target).eval()
        return cls(model, tokenizer)

    @staticmethod
    def _find_eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
        ids: set[int] = set()
        for value in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(int(v) for v in value)
        return frozenset(ids)

    # ----- requests -----

    def encode_chat(self, messages: Messages) -> list[int]:
        """Prompt token ids for `messages`, ending with the assistant's turn opener."""
        from jinja2 import TemplateError

        try:
            ids = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=False
            )
        except TemplateError as exc:
            raise ValueError(f"the chat template rejected the messages: {exc}") from None
        return [int(i) for i in ids]

    def submit(self, prompt_ids: list[int], params: SamplingParams, sink: Sink) -> Sequence:
        """Queue a request; its chunks (or an EngineError) are passed to `sink` from the worker thread."""
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if self.max_context is not None and len(prompt_ids) >= self.max_context:
            raise ValueError(
                f"the prompt has {len(prompt_ids)} tokens; the model's context is {self.max_context}"
            )
        sequence = Sequence(next(self._ids), list(prompt_ids), params, sink, self.tokenizer, self._runner.device)
        self._scheduler.add(sequence)
        return sequence

    async def stream(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[Chunk]:
        """Chunks as they are generated. Closing the iterator early cancels the request."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        sequence = self.submit(prompt_ids, params, lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
        try:
            while True:
                event = await events.get()
                if isinstance(event, EngineError):
                    raise event
                yield event
                if event.finish_reason is not None:
                    return
        finally:
            sequence.cancel()

    def stream_sync(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[Chunk]:
        """`stream` for synchronous callers (the terminal chat)."""
        events: queue.Queue[Event] = queue.Queue()
        sequence = self.submit(prompt_ids, params, events.put)
        try:
            while True:
                event = events.get()
                if isinstance(event, EngineError):
                    raise event
                yield event
                if event.finish_reason is not None:
                    return
        finally:
            sequence.cancel()

    async def complete(self, prompt_ids: list[int], params: SamplingParams) -> Completion:
        parts: list[str] = []
        last: Chunk | None = None
        async for chunk in self.stream(prompt_ids, params):
            parts.append(chunk.text)
            last = chunk
        if last is None:
            raise EngineError("the engine ended the request without an answer")
        return Completion("".join(parts), last.finish_reason, last.prompt_tokens, last.completion_tokens)

    @property
    def healthy(self) -> bool:
        return self._worker.is_alive()

    def stats(self) -> dict[str, int]:
        with self._stats_lock:
            counts = dict(self._stats)
        return counts | self._scheduler.counts()

    def close(self, timeout: float = 10.0) -> None:
        """Stop the worker; requests still queued or running end with an EngineError."""
        self._scheduler.close()
        self._worker.join(timeout)

    # ----- the worker thread -----

    def _work(self) -> None:
        while True:
            running = self._scheduler.next_step()
            if running is None:
                break
            try:
                self._step(running)
            except Exception as exc:  # never let one bad step kill the server
                log.exception("engine step failed")
                for seq in running:
                    if not seq.finished:
                        self._fail(seq, exc)
        for seq in self._scheduler.drain():
            self._fail(seq, EngineError("the engine shut down before the request finished"))

    def _step(self, running: list[Sequence]) -> None:
        live = []
        for seq in running:
            if seq.cancelled:
                self._finish(seq, "cancelled")
            else:
                live.append(seq)
        if not live:
            return
        rows = self._runner.forward(live)
        for seq, logits in zip(live, rows):
            self._advance(seq, sample_next_token(logits, seq.params, seq.generator))

    def _advance(self, seq: Sequence, token: int) -> None:
        seq.output_ids.append(token)
        if token in self._eos_ids:
            self._finish(seq, "stop", seq.stops.feed(seq.detokenizer.flush()) + seq.stops.flush())
            return
        text = seq.stops.feed(seq.detokenizer.push(token))
        if seq.stops.stopped:
            self._finish(seq, "stop", text)
            return
        context_full = self.max_context is not None and seq.length >= self.max_context
        if len(seq.output_ids) >= seq.params.max_tokens or context_full:
            text += seq.stops.feed(seq.detokenizer.flush())
            reason = "stop" if seq.stops.stopped else "length"
            self._finish(seq, reason, text + seq.stops.flush())
            return
        if text:
            self._deliver(seq, Chunk(text, len(seq.prompt_ids), len(seq.output_ids)))

    def _finish(self, seq: Sequence, reason: str, text: str = "") -> None:
        seq.finish_reason = reason
        seq.cache = None  # free the KV cache now, not when the caller lets go of the sequence
        with self._stats_lock:
            self._stats["cancelled" if reason == "cancelled" else "completed"] += 1
            self._stats["prompt_tokens"] += len(seq.prompt_ids)
            self._stats["completion_tokens"] += len(seq.output_ids)
        self._deliver(seq, Chunk(text, len(seq.prompt_ids), len(seq.output_ids), reason))

    def _fail(self, seq: Sequence, exc: Exception) -> None:
        seq.finish_reason = "error"
        seq.cache = None
        with self._stats_lock:
            self._stats["failed"] += 1
        error = exc if isinstance(exc, EngineError) else EngineError(f"generation failed: {exc}")
        self._deliver(seq, error)

    def _deliver(self, seq: Sequence, event: Event) -> None:
        try:
            seq.sink(event)
        except RuntimeError:
            # The caller's event loop is gone (client disconnected, server stopping): stop working for it.
            seq.cancel()
