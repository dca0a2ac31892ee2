"""Which sequences run in the next step and how many of their tokens: decisions only, no tensors.

One rule covers prefill and decode alike (the way vLLM's scheduler works): a sequence's computed-token
count catches up to its total token count under a per-step token budget. A sequence that is decoding
has one uncomputed token (the one just sampled), so it costs 1; a new prompt costs up to
`prefill_chunk` tokens a step until it is all in the cache. Running sequences go first, in arrival
order, so decodes never wait behind a long prompt; the budget left admits waiting requests (FIFO) while
KV slots are free. A finished sequence is released (its slot free again) before its caller hears it
finished; a cancelled one at the start of the next step.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from lmsmith.serve.engine.request import EngineError, Sequence


@dataclass(frozen=True)
class ScheduledChunk:
    """Compute tokens [start, start + count) of `seq` this step; sample after them when `samples`."""

    seq: Sequence
    start: int
    count: int

    @property
    def samples(self) -> bool:
        return self.start + self.count == self.seq.length

    @property
    def prompt_rows_wanted(self) -> int:
        """How many of this chunk's rows (from its first) predict a prompt token whose logprob is asked for."""
        if self.seq.prompt_logprobs is None:
            return 0
        return max(0, min(self.start + self.count, self.seq.num_prompt - 1) - self.start)


@dataclass
class StepPlan:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    cancelled: list[Sequence] = field(default_factory=list)  # left this step; the engine reports them

    @property
    def num_tokens(self) -> int:
        return sum(chunk.count for chunk in self.chunks)


class Scheduler:
    """Holds the waiting queue, the running list and the free KV slots; thread-safe."""

    def __init__(self, max_slots: int, max_step_tokens: int, prefill_chunk: int):
        if max_step_tokens < max_slots:
            raise ValueError("the step token budget must cover one decode per slot")
        self.max_slots = max_slots
        self.max_step_tokens = max_step_tokens
        self.prefill_chunk = prefill_chunk
        self._free_slots = list(range(max_slots))  # a heap: the lowest free slot first keeps runs repeatable
        self._waiting: deque[Sequence] = deque()
        self.queue_wait_s, self.admitted = 0.0, 0  # time admitted requests spent waiting for a slot
        self._running: list[Sequence] = []
        self._condition = threading.Condition()
        self._woken = False
        self._closed = False

    # ----- from any thread -----

    def add(self, sequence: Sequence) -> None:
        with self._condition:
            if self._closed:
                raise EngineError("the engine is shut down")
            self._waiting.append(sequence)
            self._condition.notify()

    def wake(self) -> None:
        """Make a blocked `next_step` return (with whatever work there is, maybe none)."""
        with self._condition:
            self._woken = True
            self._condition.notify()

    def close(self) -> None:
        with self._condition:
            self._closed = True
            self._condition.notify_all()

    def counts(self) -> dict[str, int]:
        with self._condition:
            return {
                "running": sum(1 for seq in self._running if not seq.finished),
                "waiting": len(self._waiting),
                "waiting_tokens": sum(seq.num_pending for seq in self._waiting),
                "kv_slots_used": self.max_slots - len(self._free_slots),
                "kv_slots_free": len(self._free_slots),
                "queue_wait_seconds_total": round(self.queue_wait_s, 6),
                "admitted_total": self.admitted,
            }

    # ----- from the engine's worker thread -----

    def next_step(self) -> StepPlan | None:
        """Block until there is work (or a wake-up); None once closed."""
        with self._condition:
            self._release_finished()
            while not self._closed and not self._woken and not self._running and not self._waiting:
                self._condition.wait()
            self._woken = False
            if self._closed:
                return None
            plan = StepPlan(cancelled=self._take_cancelled())
            plan.chunks = self._schedule()
            return plan

    def abort(self, predicate) -> list[Sequence]:
        """Remove (and free the slots of) every held sequence matching `predicate`; they are returned."""
        with self._condition:
            hit = [seq for seq in [*self._running, *self._waiting] if not seq.finished and predicate(seq)]
            if not hit:
                return hit
            self._running = [seq for seq in self._running if seq not in hit]
            self._waiting = deque(seq for seq in self._waiting if seq not in hit)
            for seq in hit:
                self._free(seq)
            return hit

    def release(self, seq: Sequence) -> None:
        """`seq` is finished: it leaves the running list and its KV slot is free from now on."""
        with self._condition:
            if seq in self._running:
                self._running.remove(seq)
            self._free(seq)

    def drain(self) -> list[Sequence]:
        """Every sequence still held (after close): the worker fails them."""
        return self.abort(lambda seq: True)

    # ----- internals (lock held) -----

    def _free(self, seq: Sequence) -> None:
        if seq.slot is not None:
            heapq.heappush(self._free_slots, seq.slot)
            seq.slot = None

    def _release_finished(self) -> None:
        still = []
        for seq in self._running:
            if seq.finished:
                self._free(seq)
            else:
                still.append(seq)
        self._running = still

    def expired(self, max_wait_s: float) -> list[Sequence]:
        """Waiting sequences older than `max_wait_s`, taken out of the queue (they never got a slot)."""
        with self._condition:
            deadline = time.monotonic() - max_wait_s
            late = [seq for seq in self._waiting if seq.arrived < deadline and not seq.finished]
            if late:
                self._waiting = deque(seq for seq in self._waiting if seq not in late)
            return late

    def _take_cancelled(self) -> list[Sequence]:
        cancelled = [seq for seq in [*self._running, *self._waiting] if seq.cancelled and not seq.finished]
        if cancelled:
            self._running = [seq for seq in self._running if not seq.cancelled]
            self._waiting = deque(seq for seq in self._waiting if not seq.cancelled)
            for seq in cancelled:
                self._free(seq)
        return cancelled

    def _schedule(self) -> list[ScheduledChunk]:
        budget = self.max_step_tokens
        decodes: list[ScheduledChunk] = []
        prefills: list[ScheduledChunk] = []
        for seq in self._running:
            if seq.num_pending == 1:
                decodes.append(ScheduledChunk(seq, seq.num_computed, 1))
                budget -= 1
        for seq in self._running:
            if seq.num_pending > 1 and budget > 0:
                count = min(seq.num_pending, budget, self.prefill_chunk)
                prefills.append(ScheduledChunk(seq, seq.num_computed, count))
                budget -= count
        while self._waiting and self._free_slots and budget > 0:
            seq = self._waiting.popleft()
            self.queue_wait_s += time.monotonic() - seq.arrived
            self.admitted += 1
            seq.slot = heapq.heappop(self._free_slots)
            self._running.append(seq)
            count = min(seq.num_pending, budget, self.prefill_chunk)
            prefills.append(ScheduledChunk(seq, seq.num_computed, count))
            budget -= count
        return decodes + prefills
