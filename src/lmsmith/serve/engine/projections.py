"""The decoder's linear projections in the form the runner calls them (torch; on CPU, oneDNN or a small C kernel).

Two changes to the model's own `nn.Linear`s, both exact up to float rounding:

- q/k/v become one matrix and gate/up another, so a layer runs four matmuls instead of seven. The
  model's modules are re-pointed at row slices of the fused matrices, so memory is not doubled and
  the model still runs on its own (the tests compare against its `generate`).
- On CPU, each matrix also gets a copy laid out for a row kernel. A decode step multiplies a few rows
  (one per running sequence) by every weight; MKL's GEMM streams the weights at about half the
  bandwidth its one-row GEMV reaches there. fp32 on AVX-512 uses `skinny.py` (weights in 32-column
  panels); other cases use oneDNN's kernel on a prepacked weight (`torch.ops.mkldnn`). One or two rows
  stay on `F.linear` (GEMV), which is fastest there. The copy costs the projections' size again in
  memory; `packed_weights` in `EngineConfig` turns it off.

Projections that are not plain `nn.Linear` (the compress stage's quantized modules) are called as
modules: q/k/v and gate/up joined into one module where that is exact (`compress.quant.concatenate`:
dynamic and weight-only INT8), else each called and their outputs concatenated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from lmsmith.serve.engine.skinny import load_skinny_kernel

# Below this many rows F.linear (a GEMV) beats the row kernels.
PACKED_MIN_ROWS = 3


def packing_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether some row kernel can run here (fp32 or bf16 on a CPU whose torch has oneDNN)."""
    return (device.type == "cpu" and dtype in (torch.float32, torch.bfloat16)
            and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


class RowKernel(Protocol):
    """A matmul for a weight laid out ahead of time (`pack`), used for steps of a few rows or more."""

    name: str

    def pack(self, weight: torch.Tensor) -> torch.Tensor: ...

    def linear(self, x: torch.Tensor, packed: torch.Tensor, out_features: int,
               bias: torch.Tensor | None) -> torch.Tensor: ...


class OneDnnKernel:
    name = "onednn"

    def __init__(self, rows_hint: int):
        self.rows_hint = rows_hint

    def pack(self, weight: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._reorder_linear_weight(weight, self.rows_hint)

    def linear(self, x: torch.Tensor, packed: torch.Tensor, out_features: int,
               bias: torch.Tensor | None) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def choose_row_kernel(device: torch.device, dtype: torch.dtype, rows_hint: int) -> RowKernel | None:
    """The skinny C kernel for fp32 where it builds, else oneDNN; None off CPU or without oneDNN."""
    if not packing_supported(device, dtype):
        return None
    if dtype == torch.float32:
        skinny = load_skinny_kernel()
        if skinny is not None:
            return skinny
    return OneDnnKernel(rows_hint)


class Projection(Protocol):
    """`x @ weight.T + bias` for `x` of shape [rows, in]."""

    out_features: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


class DenseProjection:
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, kernel: RowKernel | None):
        self.weight = weight
        self.bias = bias
        self.out_features = weight.shape[0]
        self.kernel = kernel
        self.packed: torch.Tensor | None = None
        if kernel is not None:
            self.packed = _pack_checked(kernel, weight, bias)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and x.shape[0] >= PACKED_MIN_ROWS:
            return self.kernel.linear(x, self.packed, self.out_features, self.bias)
        return F.linear(x, self.weight, self.bias)

    @property
    def packed_bytes(self) -> int:
        return 0 if self.packed is None else self.packed.numel() * self.packed.element_size()


class ModuleProjection:
    """Calls the model's own modules (any kind) and joins their outputs."""

    def __init__(self, modules: list[torch.nn.Module]):
        self.modules = modules
        self.out_features = sum(module.out_features for module in modules)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        outputs = [module(x) for module in self.modules]
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)


def _pack_checked(kernel: RowKernel, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """The kernel's copy of `weight`, or None when the kernel does not reproduce F.linear on a probe."""
    try:
        packed = kernel.pack(weight)
        probe = torch.randn(PACKED_MIN_ROWS + 6, weight.shape[1], dtype=weight.dtype)
        got = kernel.linear(probe, packed, weight.shape[0], bias)
    except RuntimeError:
        return None
    expected = F.linear(probe, weight, bias)
    tolerance = 1e-3 if weight.dtype == torch.float32 else 5e-2
    scale = expected.abs().max().clamp_min(1.0)
    return packed if bool(((got - expected).abs().max() / scale) <= tolerance) else None


def _is_plain_linear(module: torch.nn.Module) -> bool:
    return type(module) is torch.nn.Linear


@dataclass
class LayerProjections:
    """One decoder layer's projections; `qkv_sizes` and `mlp_width` split the fused outputs."""

    qkv: Projection
    qkv_sizes: tuple[int, int, int]
    o: Projection
    gate_up: Projection
    mlp_width: int
    down: Projection


def fuse(modules: list[torch.nn.Module], kernel: RowKernel | None) -> Projection:
    """One projection for `modules` side by side (outputs concatenated in order)."""
    if not all(_is_plain_linear(module) for module in modules):
        from lmsmith.compress.quant import concatenate

        joined = concatenate(modules) if len(modules) > 1 else None
        return ModuleProjection([joined] if joined is not None else modules)
    if len(modules) == 1:
        module = modules[0]
        return DenseProjection(module.weight.detach(), _detached(module.bias), kernel)
    weight = torch.cat([module.weight.detach() for module in modules])
    biases = [module.bias for module in modules]
    bias = None
    if any(b is not None for b in biases):
        bias = torch.cat([
            (b.detach() if b is not None else weight.new_zeros(module.out_features))
            for b, module in zip(biases, modules)
        ])
    _repoint(modules, weight, bias)
    return DenseProjection(weight, bias, kernel)


def _repoint(modules: list[torch.nn.Module], weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Make each module's parameters row slices of the fused tensors, so the originals can be freed."""
    start = 0
    for module in modules:
        end = start + module.out_features
        module.weight = torch.nn.Parameter(weight[start:end], requires_grad=False)
        if module.bias is not None and bias is not None:
            module.bias = torch.nn.Parameter(bias[start:end], requires_grad=False)
        start = end


def _detached(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.detach()


def build_layer_projections(layers: list[torch.nn.Module], kernel: RowKernel | None) -> list[LayerProjections]:
    """Fused projections for each decoder layer, each with `kernel`'s copy when one is given."""
    built = []
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        built.append(LayerProjections(
            qkv=fuse([attn.q_proj, attn.k_proj, attn.v_proj], kernel),
            qkv_sizes=(attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features),
            o=fuse([attn.o_proj], kernel),
            gate_up=fuse([mlp.gate_proj, mlp.up_proj], kernel),
            mlp_width=mlp.gate_proj.out_features,
            down=fuse([mlp.down_proj], kernel),
        ))
    return built
