"""The engine: a continuous-batching loop on one worker thread, and the methods callers use.

One step is three calls, as in vLLM's engine core: the scheduler decides (which sequences, how many of
their tokens), the runner executes (one forward pass for all of them), and the engine applies the
output (sample, check end-of-sequence and length, hand each request its new token); the scheduler sees
the result at the next step, when finished sequences leave and free their KV slots. Requests join and
leave at every step.

Callers submit from any thread; token deltas come back through a sink (an asyncio queue for `stream`,
a plain queue for `stream_sync`), and the consumer, not the engine thread, turns them into text and
watches for stop strings (`TextAssembler`), ending the request when one appears. Admin calls that
change the model's state (LoRA adapters) run on the worker thread between steps, so no step ever sees
half an adapter.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator, TypeVar

import torch

from lmsmith.errors import UserError
from lmsmith.serve.engine.config import EngineConfig
from lmsmith.serve.engine.grammar import Constraint, GrammarError, GrammarTokens, mask_rows
from lmsmith.serve.engine.lora import LoraInfo, read_peft_adapter
from lmsmith.serve.engine.request import (
    Chunk,
    Completion,
    DeadlineExceeded,
    EngineError,
    Event,
    Overloaded,
    Sequence,
    Sink,
    TokenDelta,
    TokenLogprob,
    UnknownAdapterError,
)
from lmsmith.serve.engine.output import TextAssembler
from lmsmith.serve.engine.runner import ModelRunner
from lmsmith.serve.engine.scheduler import ScheduledChunk, Scheduler
from lmsmith.serve.sampling import SamplingParams, sample_rows, token_logprobs

log = logging.getLogger("lmsmith.serve")

Messages = list[dict[str, str]]
T = TypeVar("T")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise UserError(f"device: {device!r} is not a torch device ({exc})") from None


class Engine:
    """Owns the model, the tokenizer, the KV cache and the worker thread that generates.

    Requests:
    - `stream(prompt_ids, params, lora=None)`: async iterator of `Chunk`s; leaving it early cancels the
      request, which frees its KV slot at the next step.
    - `stream_sync(...)`: the same for synchronous callers; `complete(...)`: one `Completion`.
    - `lora` names a loaded adapter; an unknown name raises `UnknownAdapterError` (a ValueError).
    - `encode_chat(messages)`: prompt ids from the chat template.

    Adapters: `add_lora(name, path)` loads a peft LoRA folder (UserError when it does not fit),
    `remove_lora(name)` unloads it (requests still using it end with an EngineError), `loras()` lists them.

    `stats()`: completed/cancelled/failed requests, prompt and completion tokens, running and waiting
    sequences, the last step's batch size, tokens and milliseconds, KV slots used/free/total, steps,
    loaded adapters, CUDA graphs captured, decode steps run in bucketed (graph) shapes, and the bytes of
    the CPU row kernels' weight copies.
    """

    def __init__(self, model: Any, tokenizer: Any, config: EngineConfig | None = None):
        self.model = model
        self.tokenizer = tokenizer
        device = next(model.parameters()).device
        self.config = (config or EngineConfig()).resolve(
            device.type, getattr(model.config, "max_position_embeddings", None)
        )
        self._runner = ModelRunner(model, self.config)
        self._scheduler = Scheduler(self.config.max_slots, self.config.max_step_tokens, self.config.prefill_chunk)
        self._eos_ids = self._find_eos_ids(model, tokenizer)
        logits_width = int(getattr(model.config, "vocab_size", None) or self.vocab_size)
        self._grammar_tokens = GrammarTokens(tokenizer, logits_width, self._eos_ids)
        self.max_context: int = self.config.max_model_len
        self._ids = itertools.count(1)
        self._commands: queue.SimpleQueue[tuple[Callable[[], Any], Future]] = queue.SimpleQueue()
        self._lora_lock = threading.Lock()  # guards the name -> bank row map read by submitters
        self._lora_rows: dict[str, int] = {}
        self._stats_lock = threading.Lock()
        self._stats: dict[str, float] = {
            "completed": 0, "cancelled": 0, "failed": 0, "prompt_tokens": 0, "completion_tokens": 0,
            "steps": 0, "last_batch_size": 0, "last_step_tokens": 0, "last_step_ms": 0.0,
        }
        self._worker = threading.Thread(target=self._work, name="lmsmith-engine", daemon=True)
        self._worker.start()

    @classmethod
    def load(cls, model_dir: str | Path, device: str = "auto", dtype: str = "auto",
             config: EngineConfig | None = None) -> "Engine":
        """Load an HF model folder or a compress-stage variant folder (weights and tokenizer with a chat template)."""
        from lmsmith.compress.folder import is_compressed_folder
        from lmsmith.generation import load_causal_lm, load_tokenizer

        model_dir = Path(model_dir)
        target = resolve_device(device)
        try:
            tokenizer = load_tokenizer(model_dir)
            if is_compressed_folder(model_dir):
                from lmsmith.compress.quant import QuantizedLinear

                model = load_causal_lm(model_dir)
                if any(isinstance(module, QuantizedLinear) for module in model.modules()):
                    # fbgemm's and ATen's int8/int4 CPU kernels: it runs on CPU, in the dtypes it was saved in.
                    if device == "auto":
                        target = torch.device("cpu")
                    if target.type != "cpu" or dtype != "auto":
                        raise UserError(f"{model_dir}: a quantized variant runs on CPU with its saved dtypes; "
                                        f"drop --device {device} / --dtype {dtype}")
                elif dtype != "auto":  # a pruned variant stored sparse: dense weights once loaded
                    model.to(getattr(torch, dtype))
            else:
                from lmsmith.train.model import read_pretrained

                model = read_pretrained(model_dir, str(model_dir),
                                        dtype=dtype if dtype == "auto" else getattr(torch, dtype))
        except (OSError, ValueError) as exc:
            raise UserError(f"{model_dir}: cannot load the model: {exc}") from None
        if not getattr(tokenizer, "chat_template", None):
            raise UserError(f"{model_dir}: the tokenizer has no chat template, so chat requests cannot be rendered")
        model.to(target).eval()
        return cls(model, tokenizer, config)

    @staticmethod
    def _find_eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
        from lmsmith.train.model import stop_token_ids

        # A served model stops where its config and its chat template say; lmsmith's own models list the
        # document separator in their generation config already.
        return frozenset(int(token) for token in stop_token_ids(tokenizer, model, separator=False))

    @property
    def vocab_size(self) -> int:
        """Token ids a prompt may hold: the rows of the embedding."""
        return int(self.model.get_input_embeddings().num_embeddings)

    # ----- requests -----

    def encode_chat(self, messages: Messages, tools: list[dict[str, Any]] | None = None) -> list[int]:
        """Prompt token ids for `messages` (and the `tools` the model may call), ending with the assistant's
        turn opener."""
        from jinja2 import TemplateError

        if tools and not self.renders_tools:
            raise ValueError("tools: this model's chat template does not show tools to the model, so it cannot "
                             "call them; serve a model whose template renders `tools` (lmsmith's ChatML does)")
        try:
            ids = self.tokenizer.apply_chat_template(
                messages, tools=tools or None, add_generation_prompt=True, tokenize=True, return_dict=False
            )
        except TemplateError as exc:
            raise ValueError(f"the chat template rejected the messages: {exc}") from None
        return [int(i) for i in ids]

    @property
    def renders_tools(self) -> bool:
        """Whether the chat template shows a request's `tools` to the model."""
        return "tools" in (getattr(self.tokenizer, "chat_template", None) or "")

    def constrain(self, grammar: str) -> Constraint:
        """A matcher for `grammar` (GrammarError, a ValueError, when it does not compile). The first call
        wraps the tokenizer for llguidance (about a second on a large vocabulary): call it off the event loop."""
        return self._grammar_tokens.matcher(grammar)

    def submit(self, prompt_ids: list[int], params: SamplingParams, sink: Sink, lora: str | None = None,
               constraint: Constraint | None = None) -> Sequence:
        """Queue a request; its `TokenDelta`s (or an EngineError) are passed to `sink` from the worker thread.

        A request whose params carry a grammar is constrained by it: pass the matcher from `constrain`, or
        it is compiled here."""
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if len(prompt_ids) >= self.max_context:
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens; the model's context is {self.max_context}")
        lora_index = 0
        if lora is not None:
            with self._lora_lock:
                if lora not in self._lora_rows:
                    raise UnknownAdapterError(f"no LoRA adapter named {lora!r} is loaded")
                lora_index = self._lora_rows[lora]
        if params.grammar is not None and constraint is None:
            constraint = self.constrain(params.grammar)
        sequence = Sequence(next(self._ids), list(prompt_ids), params, sink, self._runner.device, lora, lora_index,
                            constraint)
        self._scheduler.add(sequence)
        return sequence

    async def stream(self, prompt_ids: list[int], params: SamplingParams, lora: str | None = None,
                     constraint: Constraint | None = None) -> AsyncIterator[Chunk]:
        """Chunks as they are generated. Closing the iterator early cancels the request."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        assembler = TextAssembler(self.tokenizer, params.stop)
        sequence = self.submit(prompt_ids, params, lambda event: loop.call_soon_threadsafe(events.put_nowait, event),
                               lora, constraint)
        try:
            while True:
                chunk = self._assemble(sequence, assembler, await events.get())
                if chunk is not None:
                    yield chunk
                    if chunk.finish_reason is not None:
                        return
        finally:
            self._cancel(sequence)

    def stream_sync(self, prompt_ids: list[int], params: SamplingParams, lora: str | None = None) -> Iterator[Chunk]:
        """`stream` for synchronous callers (the terminal chat)."""
        events: queue.Queue[Event] = queue.Queue()
        assembler = TextAssembler(self.tokenizer, params.stop)
        sequence = self.submit(prompt_ids, params, events.put, lora)
        try:
            while True:
                chunk = self._assemble(sequence, assembler, events.get())
                if chunk is not None:
                    yield chunk
                    if chunk.finish_reason is not None:
                        return
        finally:
            self._cancel(sequence)

    def _assemble(self, sequence: Sequence, assembler: TextAssembler, event: Event) -> Chunk | None:
        """The consumer's half of a step: text for the caller, and an early end when a stop string shows."""
        if isinstance(event, EngineError):
            raise event
        chunk = assembler.feed(event)
        if assembler.stopped_early:
            sequence.cancel("stop")
            self._scheduler.wake()
        return chunk

    async def complete(self, prompt_ids: list[int], params: SamplingParams, lora: str | None = None) -> Completion:
        return Completion.of([chunk async for chunk in self.stream(prompt_ids, params, lora)])

    def _cancel(self, sequence: Sequence) -> None:
        if not sequence.finished:
            sequence.cancel()
            self._scheduler.wake()  # free its slot now, even if the worker is idle

    # ----- LoRA adapters -----

    def add_lora(self, name: str, path: str | Path) -> LoraInfo:
        """Load a peft LoRA adapter under `name`; requests pick it with `lora=name`."""
        if not name:
            raise ValueError("an adapter needs a name")
        with self._lora_lock:
            if name in self._lora_rows:
                raise ValueError(f"a LoRA adapter named {name!r} is already loaded")
        weights = read_peft_adapter(name, path, self._runner.projection_shapes(),  # file I/O off the worker
                                    self._runner.token_space())

        def install() -> LoraInfo:
            row = self._runner.install_lora(weights)
            with self._lora_lock:
                self._lora_rows[name] = row
            return weights.info

        return self._on_worker(install)

    def remove_lora(self, name: str) -> None:
        """Unload adapter `name`; new requests for it fail, running ones end with an EngineError."""
        with self._lora_lock:
            if name not in self._lora_rows:
                raise UnknownAdapterError(f"no LoRA adapter named {name!r} is loaded")
            del self._lora_rows[name]  # from here on, submits for it fail

        def uninstall() -> None:
            for seq in self._scheduler.abort(lambda seq: seq.lora_name == name):
                self._fail(seq, EngineError(f"the LoRA adapter {name!r} was removed"))
            self._runner.lora.remove(name)

        self._on_worker(uninstall)

    def loras(self) -> list[LoraInfo]:
        """The loaded adapters, by name."""
        with self._lora_lock:
            names = sorted(self._lora_rows)
        infos = self._runner.lora.infos
        return [infos[name] for name in names if name in infos]

    def _on_worker(self, work: Callable[[], T]) -> T:
        if not self._worker.is_alive():
            raise EngineError("the engine is shut down")
        future: Future = Future()
        self._commands.put((work, future))
        self._scheduler.wake()
        return future.result()

    # ----- state -----

    @property
    def healthy(self) -> bool:
        return self._worker.is_alive()

    def stats(self) -> dict[str, Any]:
        with self._stats_lock:
            counts: dict[str, Any] = dict(self._stats)
        counts |= self._scheduler.counts()
        counts["kv_slots_total"] = self.config.max_slots
        counts["loras"] = len(self._lora_rows)
        graphs = self._runner.graphs
        counts["cuda_graphs"] = graphs.captured if graphs is not None else 0
        counts["bucketed_decode_steps"] = graphs.steps if graphs is not None else 0
        counts["packed_weight_bytes"] = self._runner.packed_weight_bytes
        return counts

    def close(self, timeout: float = 10.0) -> None:
        """Stop the worker; requests still queued or running end with an EngineError."""
        self._scheduler.close()
        self._worker.join(timeout)

    # ----- the worker thread -----

    def _work(self) -> None:
        """The worker thread. Should the loop itself fail (outside a step, which fails only its own
        requests), every held request fails at once rather than hang, and the engine reports unhealthy."""
        try:
            self._work_loop()
        except BaseException:
            log.exception("the engine's worker stopped")
            self._scheduler.close()
            for seq in self._scheduler.drain():
                self._fail(seq, EngineError("the engine stopped unexpectedly (the server log has why)"))

    def _work_loop(self) -> None:
        while True:
            self._run_commands()
            self._drop_overdue()  # before planning, so no step computes for a request already dropped
            plan = self._scheduler.next_step()
            if plan is None:
                break
            for seq in plan.cancelled:
                self._finish(seq, seq.cancel_reason)
            if self.config.max_queue_wait_s is not None:
                for seq in self._scheduler.expired(self.config.max_queue_wait_s):
                    self._fail(seq, Overloaded(f"the server is overloaded: the request waited over "
                                               f"{self.config.max_queue_wait_s:g} s for a slot; retry later"))
            if not plan.chunks:
                continue
            try:
                self._step(plan.chunks)
            except Exception as exc:  # never let one bad step kill the server
                log.exception("engine step failed")
                failed = {id(chunk.seq) for chunk in plan.chunks}
                for seq in self._scheduler.abort(lambda seq: id(seq) in failed):
                    self._fail(seq, exc)
        self._run_commands()
        for seq in self._scheduler.drain():
            self._fail(seq, EngineError("the engine shut down before the request finished"))

    def _drop_overdue(self) -> None:
        now = time.monotonic()
        for seq in self._scheduler.abort(lambda seq: seq.deadline is not None and seq.deadline < now):
            self._fail(seq, DeadlineExceeded(f"the request's timeout of {seq.params.timeout_s:g} s passed before "
                                             f"its answer was complete ({seq.num_output} tokens made)"))

    def _run_commands(self) -> None:
        while True:
            try:
                work, future = self._commands.get_nowait()
            except queue.Empty:
                return
            try:
                future.set_result(work())
            except BaseException as exc:
                future.set_exception(exc)

    def _step(self, chunks: list[ScheduledChunk]) -> None:
        started = time.perf_counter()
        step = self._runner.execute(chunks)
        for chunk in chunks:
            chunk.seq.num_computed = chunk.start + chunk.count
        row = len(step.sampling)
        for chunk, count in step.prompt:
            self._record_prompt_logprobs(chunk, step.logits[row:row + count])
            row += count
        if step.sampling:
            logits = step.logits[:len(step.sampling)]
            seqs = [chunk.seq for chunk in step.sampling]
            constrained = [(row, seq.constraint) for row, seq in enumerate(seqs) if seq.constraint is not None]
            tokens = sample_rows(
                mask_rows(logits, constrained) if constrained else logits,
                [seq.params for seq in seqs], [seq.generator for seq in seqs],
                [seq.token_ids if seq.params.repetition_penalty != 1.0 else () for seq in seqs],
            )
            for index, (seq, token) in enumerate(zip(seqs, tokens)):
                if seq.params.max_tokens == 0:  # the prompt is computed; nothing to generate
                    self._finish(seq, "length")
                    continue
                logprob = None
                if seq.params.logprobs is not None:
                    [(value, top)] = token_logprobs(logits[index:index + 1], [token], seq.params.logprobs)
                    logprob = TokenLogprob(token, value, tuple(top))
                if seq.constraint is not None:
                    try:
                        seq.constraint.consume(token)
                    except GrammarError as exc:  # the mask allowed it, so this is a bug: fail this request only
                        self._fail(seq, exc)
                        continue
                self._advance(seq, token, logprob)
        with self._stats_lock:
            self._stats["steps"] += 1
            self._stats["last_batch_size"] = len(chunks)
            self._stats["last_step_tokens"] = sum(chunk.count for chunk in chunks)
            self._stats["last_step_ms"] = round((time.perf_counter() - started) * 1000, 3)

    @staticmethod
    def _record_prompt_logprobs(chunk: ScheduledChunk, logits: torch.Tensor) -> None:
        seq = chunk.seq
        assert seq.prompt_logprobs is not None and seq.params.prompt_logprobs is not None
        targets = seq.token_ids[chunk.start + 1:chunk.start + 1 + logits.shape[0]]
        for token, (value, top) in zip(targets, token_logprobs(logits, targets, seq.params.prompt_logprobs)):
            seq.prompt_logprobs.append(TokenLogprob(token, value, tuple(top)))

    def _advance(self, seq: Sequence, token: int, logprob: TokenLogprob | None = None) -> None:
        seq.token_ids.append(token)
        if token in self._eos_ids:
            self._finish(seq, "stop", token, logprob)
        elif seq.num_output >= seq.params.max_tokens or seq.length >= self.max_context:
            self._finish(seq, "length", token, logprob)
        else:
            self._deliver(seq, TokenDelta(token, seq.num_prompt, seq.num_output, logprob=logprob,
                                          prompt_logprobs=self._take_prompt_logprobs(seq)))

    @staticmethod
    def _take_prompt_logprobs(seq: Sequence) -> tuple[TokenLogprob | None, ...] | None:
        """The prompt's logprobs, once (with the request's first delta)."""
        if seq.prompt_logprobs is None or seq.prompt_logprobs_sent:
            return None
        seq.prompt_logprobs_sent = True
        return tuple(seq.prompt_logprobs)

    def _finish(self, seq: Sequence, reason: str, token: int | None = None, logprob: TokenLogprob | None = None) -> None:
        seq.finish_reason = reason
        self._scheduler.release(seq)  # the KV slot is free before the caller hears the request ended
        with self._stats_lock:
            self._stats["cancelled" if reason == "cancelled" else "completed"] += 1
            self._stats["prompt_tokens"] += seq.num_prompt
            self._stats["completion_tokens"] += seq.num_output
        self._deliver(seq, TokenDelta(token, seq.num_prompt, seq.num_output, reason, logprob,
                                      self._take_prompt_logprobs(seq)))

    def _fail(self, seq: Sequence, exc: Exception) -> None:
        seq.finish_reason = "error"
        self._scheduler.release(seq)
        with self._stats_lock:
            self._stats["failed"] += 1
        if not isinstance(exc, EngineError):
            # The cause goes to the server log; a client sees no internals.
            log.error("request %s failed", seq.request_id, exc_info=exc)
        error = exc if isinstance(exc, EngineError) else EngineError("generation failed (the server log has why)")
        self._deliver(seq, error)

    def _deliver(self, seq: Sequence, event: Event) -> None:
        try:
            seq.sink(event)
        except RuntimeError:
            # The caller's event loop is gone (client disconnected, server stopping): stop working for it.
            seq.cancel()
