"""Decode steps replayed from CUDA graphs (torch.cuda.CUDAGraph), one per (batch bucket, key-length bucket).

An eager decode step of a small model is mostly CPU time spent launching kernels; a captured graph
launches them all at once. Graphs need fixed shapes and fixed memory, so a decode batch is padded up to
the next batch bucket (padded rows use the KV cache's scratch slot) and attention reads a key length
rounded up to a bucket (masked past each row's position). Inputs are copied into static buffers before
a replay, and graphs are captured lazily, the first time a (batch, length) pair is needed.

Without CUDA (`capture=False`) the same padded, fixed-shape step runs eagerly; the tests use that to
check the bucketing and padding on CPU.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

if TYPE_CHECKING:
    from lmsmith.serve.engine.runner import StepBatch


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """1, 2, 3, 4, 6, 8, 12, 16, 24, ... (powers of two and 1.5x between), ending at `max_batch`."""
    sizes = {max_batch}
    power = 1
    while power < max_batch:
        sizes.add(power)
        if power >= 2 and power * 3 // 2 < max_batch:
            sizes.add(power * 3 // 2)
        power *= 2
    return tuple(sorted(sizes))


def bucket_for(size: int, buckets: tuple[int, ...]) -> int | None:
    """The smallest bucket that holds `size`, or None when none does."""
    for bucket in buckets:
        if bucket >= size:
            return bucket
    return None


def key_len_bucket(length: int, step: int, max_len: int) -> int:
    """`length` rounded up to a multiple of `step`, at most `max_len`."""
    return min(max_len, -(-length // step) * step)


class DecodeGraphs:
    """Runs decode-only steps in fixed shapes, from captured CUDA graphs when `capture` is set."""

    def __init__(self, forward: Callable[["StepBatch"], torch.Tensor], make_batch: Callable[..., "StepBatch"],
                 max_batch: int, key_len_step: int, max_len: int, scratch_slot: int,
                 device: torch.device, capture: bool):
        self._forward = forward
        self._make_batch = make_batch
        self.buckets = batch_buckets(max_batch)
        self.key_len_step = key_len_step
        self.max_len = max_len
        self.scratch_slot = scratch_slot
        self.capture = capture
        # Rows: token id, position, KV slot, LoRA bank row.
        self._inputs = torch.zeros(4, max_batch, dtype=torch.long, device=device)
        self._graphs: dict[tuple[int, int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = torch.cuda.graph_pool_handle() if capture else None
        self.steps = 0

    @property
    def max_batch(self) -> int:
        return self.buckets[-1]

    @property
    def captured(self) -> int:
        return len(self._graphs)

    def clear(self) -> None:
        self._graphs.clear()

    def run(self, token_ids: list[int], positions: list[int], slots: list[int], lora_rows: list[int],
            lora_version: int | None) -> torch.Tensor:
        """Logits [n, vocab] for n decode rows; `lora_version` None when no adapter bank is allocated."""
        size = len(token_ids)
        batch = bucket_for(size, self.buckets)
        if batch is None:
            raise ValueError(f"{size} rows exceed the largest decode bucket {self.max_batch}")
        key_len = key_len_bucket(max(positions) + 1, self.key_len_step, self.max_len)
        pad = batch - size
        self.steps += 1
        host = torch.tensor([
            token_ids + [0] * pad,
            positions + [0] * pad,
            slots + [self.scratch_slot] * pad,
            lora_rows + [0] * pad,
        ], dtype=torch.long)
        if not self.capture:
            self._inputs[:, :batch].copy_(host)
            return self._forward(self._static_batch(batch, key_len, lora_version is not None))[:size]
        key = (batch, key_len, -1 if lora_version is None else lora_version)
        if key not in self._graphs:
            self._graphs[key] = self._capture(batch, key_len, lora_version is not None)
        graph, logits = self._graphs[key]
        self._inputs[:, :batch].copy_(host, non_blocking=True)
        graph.replay()
        return logits[:size]

    def _static_batch(self, batch: int, key_len: int, with_lora: bool) -> "StepBatch":
        ids, positions, slots, lora_rows = self._inputs[:, :batch]
        return self._make_batch(ids, positions, slots, key_len, lora_rows if with_lora else None)

    def _capture(self, batch: int, key_len: int, with_lora: bool) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        # Warm-up really runs: point every row at the scratch slot so no live sequence's cache is written.
        self._inputs[:, :batch].zero_()
        self._inputs[2, :batch] = self.scratch_slot
        step = self._static_batch(batch, key_len, with_lora)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._forward(step)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self._forward(step)
        return graph, logits
