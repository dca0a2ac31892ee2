"""One interface, two backends, for running a batch function over a stream of batches, in order.

- `LocalExecutor`: the standard library's `multiprocessing` with N worker processes (N = 1 runs in
  the calling process). At most `2 × N` batches are in flight, so memory stays flat however long the
  stream is.
- `RayExecutor`: Ray Data. Each shard (about 1 GB of input, see `PipelineConfig.shard_bytes`) becomes
  a dataset of pickled batches, mapped with `map_batches` by the same function, order preserved.

The batch function is any picklable top-level `fn(payload, batch) -> result`; the operators run
unchanged inside it on either backend.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
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


class _RayBatchUDF:
    """The callable Ray Data runs on each worker: unpickle a batch, run `fn`, pickle the result."""

    def __init__(self, fn: BatchFn, payload: Any):
        self.fn, self.payload = fn, payload

    def __call__(self, rows: Any) -> dict[str, list[bytes]]:
        # pyarrow batches keep the pickles as exact bytes (numpy would pad and strip them).
        blobs = rows.column("batch").to_pylist()
        return {"result": [pickle.dumps(self.fn(self.payload, pickle.loads(blob))) for blob in blobs]}


class RayExecutor(Executor):
    """Ray Data backend. Connects to `address` (a running cluster) or starts a local instance with
    `workers` CPUs when Ray is not initialised yet."""

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
        import ray.data

        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True
        context.enable_progress_bars = False

    def map_batches(self, fn: BatchFn, payload: Any, batches: Iterable[Any]) -> Iterator[Any]:
        import ray.data

        items = [{"batch": pickle.dumps(batch)} for batch in batches]
        if not items:
            return
        dataset = ray.data.from_items(items, override_num_blocks=min(len(items), 4 * self.workers))
        mapped = dataset.map_batches(
            _RayBatchUDF,
            fn_constructor_kwargs={"fn": fn, "payload": payload},
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=self.workers),
            batch_format="pyarrow",
        )
        for row in mapped.iter_rows():
            yield pickle.loads(row["result"])

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
