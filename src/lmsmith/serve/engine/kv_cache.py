"""The KV cache: one preallocated tensor per keys and values, a slot per running sequence (torch).

Layout `[layers, slots + 1, kv_heads, max_len, head_dim]`: a slot is one sequence's whole history, so
a prompt piece or a decode token is written with one indexed store, and a prompt's attention reads its
own slot as a view, without copying. The extra last slot is scratch: padded rows of a bucketed decode
batch write and read there, so padding never touches a live sequence. Memory is allocated once; the
scheduler hands slots out and takes them back.
"""

from __future__ import annotations

import torch


class SlotKVCache:
    def __init__(self, layers: int, slots: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (layers, slots + 1, kv_heads, max_len, head_dim)
        # Zeros, not empty: masked-out keys still enter the attention product, and 0 * NaN is NaN.
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.slots = slots
        self.scratch_slot = slots
        self.max_len = max_len

    @property
    def bytes(self) -> int:
        return 2 * self.keys.numel() * self.keys.element_size()

    def write(self, layer: int, slots: torch.Tensor, positions: torch.Tensor,
              keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store token i's keys and values ([tokens, kv_heads, head_dim]) at (slots[i], positions[i])."""
        self.keys[layer][slots, :, positions] = keys
        self.values[layer][slots, :, positions] = values

    def gather(self, layer: int, slots: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `length` positions of several slots, [batch, kv_heads, length, head_dim] (a copy)."""
        return self.keys[layer][slots, :, :length], self.values[layer][slots, :, :length]

    def run(self, layer: int, first_slot: int, count: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `length` positions of slots first_slot .. first_slot + count - 1 (no copy)."""
        end = first_slot + count
        return self.keys[layer, first_slot:end, :, :length], self.values[layer, first_slot:end, :, :length]

    def view(self, layer: int, slot: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `length` positions of one slot, [1, kv_heads, length, head_dim] (no copy)."""
        return (self.keys[layer, slot, :, :length].unsqueeze(0),
                self.values[layer, slot, :, :length].unsqueeze(0))
