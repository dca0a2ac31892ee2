"""Data-parallel and sharded training: which process trains on what, and how their sums are combined.

accelerate sets up the processes (`accelerate launch` with a file from `configs/accelerate/`: DDP,
FSDP2, DeepSpeed ZeRO-2/3) and wraps the model; a plain `python` run is one process and the same code.
Each optimiser step of a `StepPlan` holds `grad_accum_steps × world_size` micro-batches and process `r`
trains on micro-batches `r, r + world, ...`, so a global batch means the same examples at any world size.

Token counts are summed over all processes before the backward pass: each process divides its loss
sum by the global target count and multiplies by the world size, because DDP and FSDP average the
gradients of the processes. The result is the gradient of the per-token mean over the whole global
batch, the same as one process would compute.

`fsdp2_shard` applies torch's `fully_shard` directly, for runs launched without accelerate's FSDP
plugin; accelerate only offers FSDP on accelerators, and this path also serves CPU processes over gloo.
"""

from __future__ import annotations

from typing import Sequence, TypeVar

import torch

T = TypeVar("T")


def make_accelerator():
    """The accelerate handle of this process. Mixed precision comes from `accelerate launch` settings
    when given; otherwise the loop applies its own autocast (so one process can train at several
    precisions, which accelerate's process-wide state would refuse)."""
    from accelerate import Accelerator

    return Accelerator(cpu=not torch.cuda.is_available())


def local_share(items: Sequence[T], accelerator) -> list[T]:
    """This process's micro-batches of one optimiser step."""
    if accelerator is None or accelerator.num_processes == 1:
        return list(items)
    return list(items[accelerator.process_index :: accelerator.num_processes])


def all_sum(values: Sequence[float], accelerator) -> list[float]:
    """Element-wise sum of `values` over every process (one collective for the whole list)."""
    if accelerator is None or accelerator.num_processes == 1:
        return list(values)
    tensor = torch.tensor(list(values), dtype=torch.float64, device=accelerator.device)
    torch.distributed.all_reduce(tensor)
    return tensor.tolist()


def fsdp2_shard(module: torch.nn.Module, layers: Sequence[torch.nn.Module]) -> torch.nn.Module:
    """Shard each decoder layer, then the rest (embeddings, final norm, head) as the root group.

    Parameters live as DTensor shards between steps and are gathered for each layer's forward and
    backward; gradients are reduce-scattered and averaged over processes, as with DDP.
    """
    from torch.distributed.fsdp import fully_shard

    for layer in layers:
        fully_shard(layer)
    fully_shard(module)
    return module


def full_value(value) -> torch.Tensor:
    """A DTensor (a sharded norm or parameter) as the full tensor; plain tensors pass through."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value
