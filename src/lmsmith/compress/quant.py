"""Quantized and reduced-precision Linear modules for inference, and the swap that installs them.

The kernels are torch's own:
- `int8` (dynamic W8A8): fbgemm's int8 GEMM, `torch.ops.quantized.linear_dynamic`, activations quantized
  per call from their own range;
- `static_int8` (W8A8): fbgemm's `torch.ops.quantized.linear`, activations quantized with ranges fixed by
  calibration (`lmsmith.compress.calibrate`), optional SmoothQuant scales applied to the input;
- `int8_weight` / `int4_weight`: ATen's `_weight_int8pack_mm` and `_weight_int4pack_mm_for_cpu`, with
  bf16 activations (their fp32-activation paths are many times slower on CPU);
- `bf16` / `fp16`: the weight stored in that dtype, the matmul done in it.
fbgemm's ops run on x86 CPUs only; the weight-only int4 op has a CUDA twin (`_weight_int4pack_mm`) with
another packing, which is not wired here.

Every module keeps its weights as plain tensors in buffers (int8 values, scales, zero points), so a
variant is saved with safetensors, never pickle; the packed kernel form is rebuilt lazily on first use.
"""

from __future__ import annotations

import abc
import fnmatch
import warnings
from typing import Callable, Iterator, Optional

import torch
from torch import nn

# torch marks quantized tensors deprecated; fbgemm's int8 GEMM is still the fastest CPU int8 path without
# torch.compile (docs/compression.md), so lmsmith uses them knowingly and silences exactly these warnings.
for _message in (r".*quantize_per_tensor.*deprecated.*", r".*torch\.ao\.quantization is deprecated.*"):
    warnings.filterwarnings("ignore", message=_message)

INT8_MAX = 127
ACT_QMAX = 127  # fbgemm's activations use 7 bits (reduce_range): no u8·s8 pair-sum overflow without VNNI


def linear_modules(model: nn.Module) -> Iterator[tuple[str, nn.Linear]]:
    for name, module in model.named_modules():
        if type(module) is nn.Linear:
            yield name, module


def matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def selected_linears(model: nn.Module, include: list[str], skip: list[str]) -> list[tuple[str, nn.Linear]]:
    return [(name, module) for name, module in linear_modules(model)
            if matches(name, include) and not matches(name, skip)]


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def quantize_weight(weight: torch.Tensor, per_channel: bool, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(int8 values, float32 scales, int64 zero points) with one scale per output row or one in all."""
    w = weight.detach().float()
    if per_channel:
        low, high = w.amin(dim=1), w.amax(dim=1)
    else:
        low, high = w.amin().reshape(1), w.amax().reshape(1)
    if symmetric:
        scale = torch.maximum(high.abs(), low.abs()).clamp_min(1e-12) / INT8_MAX
        zero = torch.zeros_like(scale, dtype=torch.int64)
    else:
        low, high = low.clamp(max=0), high.clamp(min=0)  # zero must be exactly representable
        scale = ((high - low) / 255).clamp_min(1e-12)
        zero = (-128 - torch.round(low / scale)).clamp(-128, 127).to(torch.int64)
    rows = (lambda t: t[:, None]) if per_channel else (lambda t: t)
    values = torch.clamp(torch.round(w / rows(scale)) + rows(zero), -128, 127).to(torch.int8)
    return values, scale.float(), zero


def dequantize_weight(values: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    rows = (lambda t: t[:, None]) if scale.numel() > 1 else (lambda t: t)
    return (values.float() - rows(zero).float()) * rows(scale)


def activation_qparams(low: float, high: float, symmetric: bool) -> tuple[float, int]:
    """(scale, zero point) of quint8 activations covering [low, high] in fbgemm's 7-bit range."""
    low, high = min(low, 0.0), max(high, 0.0)
    if symmetric:
        bound = max(abs(low), abs(high), 1e-8)
        return 2 * bound / ACT_QMAX, (ACT_QMAX + 1) // 2
    scale = max((high - low) / ACT_QMAX, 1e-8)
    return scale, int(min(max(round(-low / scale), 0), ACT_QMAX))


class QuantizedLinear(nn.Module, abc.ABC):
    """Base: flattens the leading dimensions, keeps the kernel's packed form out of the state dict."""

    kind = ""

    def __init__(self, in_features: int, out_features: int, has_bias: bool):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("bias", torch.zeros(out_features) if has_bias else None)
        self._packed = None

    def settings(self) -> dict:
        """What, besides the tensor shapes, rebuilds this module before its state is loaded."""
        return {}

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_packed"] = None  # kernel handles are rebuilt, never copied
        return state

    def _load_from_state_dict(self, *args, **kwargs):
        self._packed = None
        super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed is None:
            self._packed = self.pack()
        flat = x.reshape(-1, self.in_features)
        return self.matmul(flat).reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    @abc.abstractmethod
    def pack(self):
        """The kernel's form of the weights (built once, on first use)."""

    @abc.abstractmethod
    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """`x` (rows × in_features) times the weights, bias included."""

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kind={self.kind}"


class _Int8WeightMixin:
    def _int8_buffers(self, rows: int, channels: int) -> None:
        self.register_buffer("weight_int8", torch.zeros(self.out_features, self.in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(rows))
        self.register_buffer("weight_zero", torch.zeros(rows, dtype=torch.int64))

    def _store(self, weight: torch.Tensor, bias: Optional[torch.Tensor], per_channel: bool, symmetric: bool) -> None:
        values, scale, zero = quantize_weight(weight, per_channel, symmetric)
        self.weight_int8.copy_(values)
        self.weight_scale.copy_(scale)
        self.weight_zero.copy_(zero)
        if bias is not None:
            self.bias.copy_(bias.detach().float())

    def _quantized_weight(self) -> torch.Tensor:
        if self.weight_scale.numel() > 1:
            return torch._make_per_channel_quantized_tensor(
                self.weight_int8, self.weight_scale.double(), self.weight_zero, 0)
        return torch._make_per_tensor_quantized_tensor(
            self.weight_int8, float(self.weight_scale), int(self.weight_zero))


class DynamicInt8Linear(_Int8WeightMixin, QuantizedLinear):
    kind = "int8"

    def __init__(self, in_features: int, out_features: int, has_bias: bool, per_channel: bool = True):
        super().__init__(in_features, out_features, has_bias)
        self.per_channel = per_channel
        self._int8_buffers(out_features if per_channel else 1, in_features)

    def settings(self) -> dict:
        return {"per_channel": self.per_channel}

    @classmethod
    def from_linear(cls, linear: nn.Linear, per_channel: bool = True) -> "DynamicInt8Linear":
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, per_channel)
        module._store(linear.weight, linear.bias, per_channel, symmetric=True)
        return module

    def pack(self):
        return torch.ops.quantized.linear_prepack(self._quantized_weight(), self.bias)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(x.float().contiguous(), self._packed, True)


class StaticInt8Linear(_Int8WeightMixin, QuantizedLinear):
    kind = "static_int8"

    def __init__(self, in_features: int, out_features: int, has_bias: bool, per_channel: bool = True,
                 smooth: bool = False):
        super().__init__(in_features, out_features, has_bias)
        self.per_channel, self.smooth = per_channel, smooth
        self._int8_buffers(out_features if per_channel else 1, in_features)
        self.register_buffer("input_scale", torch.ones(()))
        self.register_buffer("input_zero", torch.zeros((), dtype=torch.int64))
        self.register_buffer("output_scale", torch.ones(()))
        self.register_buffer("output_zero", torch.zeros((), dtype=torch.int64))
        # x / s enters the int8 GEMM; W · diag(s) was quantized instead of W (SmoothQuant).
        self.register_buffer("input_divisor", torch.ones(in_features) if smooth else None)

    def settings(self) -> dict:
        return {"per_channel": self.per_channel, "smooth": self.smooth}

    @classmethod
    def from_linear(cls, linear: nn.Linear, input_range: tuple[float, float], output_range: tuple[float, float],
                    per_channel: bool, symmetric: bool, divisor: Optional[torch.Tensor] = None) -> "StaticInt8Linear":
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, per_channel,
                     smooth=divisor is not None)
        weight = linear.weight.detach().float()
        if divisor is not None:
            weight = weight * divisor[None, :]
            module.input_divisor.copy_(divisor)
        module._store(weight, linear.bias, per_channel, symmetric)
        for prefix, (low, high) in (("input", input_range), ("output", output_range)):
            qscale, qzero = activation_qparams(low, high, symmetric)
            getattr(module, f"{prefix}_scale").fill_(qscale)
            getattr(module, f"{prefix}_zero").fill_(qzero)
        return module

    def pack(self):
        packed = torch.ops.quantized.linear_prepack(self._quantized_weight(), self.bias)
        return (packed, float(self.input_scale), int(self.input_zero), float(self.output_scale),
                int(self.output_zero))

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        packed, in_scale, in_zero, out_scale, out_zero = self._packed
        x = x.float()
        if self.input_divisor is not None:
            x = x / self.input_divisor
        quantized = torch.quantize_per_tensor(x.contiguous(), in_scale, in_zero, torch.quint8)
        return torch.ops.quantized.linear(quantized, packed, out_scale, out_zero).dequantize()


class WeightInt8Linear(_Int8WeightMixin, QuantizedLinear):
    kind = "int8_weight"

    def __init__(self, in_features: int, out_features: int, has_bias: bool):
        super().__init__(in_features, out_features, has_bias)
        self._int8_buffers(out_features, in_features)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "WeightInt8Linear":
        module = cls(linear.in_features, linear.out_features, linear.bias is not None)
        module._store(linear.weight, linear.bias, per_channel=True, symmetric=True)
        return module

    def pack(self):
        return self.weight_scale.to(torch.bfloat16)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        out = torch._weight_int8pack_mm(x.to(torch.bfloat16).contiguous(), self.weight_int8, self._packed)
        return out if self.bias is None else out + self.bias.to(out.dtype)


class WeightInt4Linear(QuantizedLinear):
    """Asymmetric INT4 per group of `group_size` inputs; two values per stored byte."""

    kind = "int4_weight"

    def __init__(self, in_features: int, out_features: int, has_bias: bool, group_size: int = 64):
        super().__init__(in_features, out_features, has_bias)
        self.group_size = group_size
        groups = in_features // group_size
        self.register_buffer("weight_int4", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("group_scale", torch.ones(out_features, groups))
        self.register_buffer("group_min", torch.zeros(out_features, groups))

    def settings(self) -> dict:
        return {"group_size": self.group_size}

    @staticmethod
    def fits(linear: nn.Linear, group_size: int) -> bool:
        return linear.in_features % group_size == 0 and linear.out_features % 8 == 0

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int) -> "WeightInt4Linear":
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size)
        w = linear.weight.detach().float().reshape(linear.out_features, -1, group_size)
        low, high = w.amin(-1), w.amax(-1)
        scale = ((high - low) / 15).clamp_min(1e-12)
        values = torch.round((w - low[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8)
        values = values.reshape(linear.out_features, -1)
        module.weight_int4.copy_(values[:, 0::2] | (values[:, 1::2] << 4))
        module.group_scale.copy_(scale)
        module.group_min.copy_(low)
        if linear.bias is not None:
            module.bias.copy_(linear.bias.detach().float())
        return module

    def unpacked(self) -> torch.Tensor:
        values = torch.empty(self.out_features, self.in_features, dtype=torch.uint8)
        values[:, 0::2] = self.weight_int4 & 0xF
        values[:, 1::2] = self.weight_int4 >> 4
        return values

    def dequantized(self) -> torch.Tensor:
        values = self.unpacked().float().reshape(self.out_features, -1, self.group_size)
        return (values * self.group_scale[..., None] + self.group_min[..., None]).reshape(self.out_features, -1)

    def pack(self):
        packed = torch._convert_weight_to_int4pack_for_cpu(self.unpacked().to(torch.int32), 1)
        # The kernel computes (q - 8) · scale + zero, so its zero is our minimum plus eight steps.
        zeros = self.group_min + 8 * self.group_scale
        scales_and_zeros = torch.stack([self.group_scale.t(), zeros.t()], dim=-1).to(torch.bfloat16).contiguous()
        return packed, scales_and_zeros

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        packed, scales_and_zeros = self._packed
        out = torch._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16).contiguous(), packed, self.group_size,
                                                scales_and_zeros)
        return out if self.bias is None else out + self.bias.to(out.dtype)


class CastLinear(QuantizedLinear):
    """The weight (and bias) stored in bf16 or fp16; the input is cast to it and the output back."""

    def __init__(self, in_features: int, out_features: int, has_bias: bool, dtype: str = "bf16"):
        super().__init__(in_features, out_features, has_bias)
        self.dtype_name = dtype
        self.kind = dtype
        torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch_dtype))
        if has_bias:
            self.bias = self.bias.to(torch_dtype)

    def settings(self) -> dict:
        return {"dtype": self.dtype_name}

    @classmethod
    def from_linear(cls, linear: nn.Linear, dtype: str) -> "CastLinear":
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, dtype)
        module.weight.copy_(linear.weight.detach())
        if linear.bias is not None:
            module.bias.copy_(linear.bias.detach())
        return module

    def pack(self):
        return True

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x.to(self.weight.dtype), self.weight, self.bias)


def concatenate(modules: list[nn.Module]) -> Optional[QuantizedLinear]:
    """One module computing `modules` side by side (outputs concatenated), when that is exact: dynamic
    INT8 with per-channel weights (activations are quantized from the shared input, weights per row) and
    weight-only INT8. The originals' int8 rows become views of the joined tensors and drop their packed
    copies, so memory is not doubled. None for any other mix."""
    kinds = {type(module) for module in modules}
    if len(kinds) != 1 or kinds.pop() not in (DynamicInt8Linear, WeightInt8Linear):
        return None
    first = modules[0]
    if isinstance(first, DynamicInt8Linear) and not all(module.per_channel for module in modules):
        return None
    has_bias = any(module.bias is not None for module in modules)
    joined = type(first).__new__(type(first))
    QuantizedLinear.__init__(joined, first.in_features, sum(m.out_features for m in modules), has_bias)
    if isinstance(first, DynamicInt8Linear):
        joined.per_channel = True
    joined.register_buffer("weight_int8", torch.cat([m.weight_int8 for m in modules]))
    joined.register_buffer("weight_scale", torch.cat([m.weight_scale for m in modules]))
    joined.register_buffer("weight_zero", torch.cat([m.weight_zero for m in modules]))
    if has_bias:
        joined.bias = torch.cat([m.bias if m.bias is not None else torch.zeros(m.out_features) for m in modules])
    start = 0
    for module in modules:
        end = start + module.out_features
        module.weight_int8 = joined.weight_int8[start:end]
        module._packed = None
        start = end
    return joined


MODULE_KINDS: dict[str, Callable[..., QuantizedLinear]] = {
    "int8": DynamicInt8Linear,
    "static_int8": StaticInt8Linear,
    "int8_weight": WeightInt8Linear,
    "int4_weight": WeightInt4Linear,
    "bf16": lambda i, o, b, **s: CastLinear(i, o, b, dtype="bf16"),
    "fp16": lambda i, o, b, **s: CastLinear(i, o, b, dtype="fp16"),
}


def skeleton(kind: str, linear: nn.Linear, settings: dict) -> QuantizedLinear:
    """An empty module of `kind` shaped like `linear`, to load a saved state into."""
    if kind not in MODULE_KINDS:
        raise ValueError(f"unknown quantized module kind {kind!r}")
    return MODULE_KINDS[kind](linear.in_features, linear.out_features, linear.bias is not None, **settings)


def convert(linear: nn.Linear, precision: str, group_size: int = 64) -> Optional[QuantizedLinear]:
    """`linear` in a weight-only or cast precision (no calibration needed); None for fp32 or a shape the
    kernel cannot take (INT4 needs whole groups along the input)."""
    if precision == "fp32":
        return None
    if precision == "int8":
        return DynamicInt8Linear.from_linear(linear)
    if precision == "int8_weight":
        return WeightInt8Linear.from_linear(linear)
    if precision == "int4_weight":
        return WeightInt4Linear.from_linear(linear, group_size) if WeightInt4Linear.fits(linear, group_size) else None
    if precision in ("bf16", "fp16"):
        return CastLinear.from_linear(linear, precision)
    raise ValueError(f"precision {precision!r} needs calibration; it is not a per-module choice")
