"""One interface, two backends, for running a batch function over a stream of batches, in order.

- `LocalExecutor`: the standard library's `multiprocessing` with N worker processes (N = 1 runs in
  the calling process). At most `2 × N` batches are in flight, so memory stays flat however long the
  stream is.
- `RayExecutor`: Ray tasks, one a batch, on a local Ray or a cluster; the same window of `2 × N` batches
  in flight and results taken in order, so the driver never holds more than the window (a Ray Data
  dataset of a shard's batches held the whole shard in the driver).

The batch function is any picklable top-level `fn(payload, batch) -> result`; the operators run
unchanged inside it on either backend.
"""

from __future__ import annotations

import multiprocessing
import os
from abc import ABC, abstractmethod
from collections import deque
from typing import Any, Callable, Iterable, Iterator, Literal

BatchFn = Callable[[Any, Any], Any]
ExecutorKind = Literal["local", "ray"]


class Executor(ABC):
    """Maps `fn(payload, batch)` over batches and yields the results in input order."""

    kind: str
    workers: int

    @abstractmethod
    def map_batches(self, fn: BatchFn, payload: Any, batches: Iterable[Any]) -> Iterator[Any]:
        """Results of `fn(payload, batch)` for each batch of one shard, in order."""

    def close(self) -> None:
        """Release workers."""

    def __enter__(self) -> "Executor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LocalExecutor(Executor):
    kind = "local"

    def __init__(self, workers: int = 1):
        self.workers = max(1, workers)
        self._pool = None

    def _get_pool(self):
        if self._pool is None:
            self._pool = multiprocessing.get_context("fork" if os.name == "posix" else "spawn").Pool(self.workers)
        return self._pool

    def map_batches(self, fn: BatchFn, payload: Any, batches: Iterable[Any]) -> Iterator[Any]:
        if self.workers == 1:
            for batch in batches:
                yield fn(payload, batch)
            return
        pool = self._get_pool()
        pending: deque = deque()
        for batch in batches:
            pending.append(pool.apply_async(fn, (payload, batch)))
            if len(pending) >= 2 * self.workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool.join()
            self._pool = None


def _run_batch(fn: BatchFn, payload: Any, batch: Any) -> Any:
    return fn(payload, batch)


class RayExecutor(Executor):
    """Ray backend. Connects to `address` (a running cluster, as `ray.init(address=...)` takes it) or
    starts a local instance with `workers` CPUs when Ray is not initialised yet. Ray reuses its worker
    processes, so a batch function that caches its setup per process (the operators) builds it once each."""

    kind = "ray"

    def __init__(self, workers: int = 2, address: str | None = None):
        import ray

        self.workers = max(1, workers)
        self._started = False
        if not ray.is_initialized():
            if address:
                ray.init(address=address, include_dashboard=False, log_to_driver=False)
            else:
                ray.init(num_cpus=self.workers, include_dashboard=False, log_to_driver=False)
            self._started = True
        self._task = ray.remote(num_cpus=1)(_run_batch)

    def map_batches(self, fn: BatchFn, payload: Any, batches: Iterable[Any]) -> Iterator[Any]:
        import ray

        payload_ref = ray.put(payload)
        pending: deque = deque()
        for batch in batches:
            pending.append(self._task.remote(fn, payload_ref, batch))
            if len(pending) >= 2 * self.workers:
                yield ray.get(pending.popleft())
        while pending:
            yield ray.get(pending.popleft())

    def close(self) -> None:
        if self._started:
            import ray

            ray.shutdown()
            self._started = False


def make_executor(kind: ExecutorKind = "local", workers: int = 1, ray_address: str | None = None) -> Executor:
    if kind == "local":
        if ray_address:
            raise ValueError("ray_address is set but the executor is local; use executor: ray")
        return LocalExecutor(workers)
    if kind == "ray":
        return RayExecutor(workers, ray_address)
    raise ValueError(f"unknown executor {kind!r}; use local or ray")
