"""Speed and memory switches of the training loop: a chunked linear + cross-entropy, gradient
checkpointing, Liger kernels and `torch.compile`.

The chunked loss is ours, in plain torch autograd: a vocabulary-sized logits tensor for every target
position is the largest activation of small and mid-sized models (151k × 2048 × 8 fp32 values is 10 GB
for Qwen2), and the loss never needs it whole. Gradient checkpointing is transformers'; Liger's kernels
come from `liger-kernel` when it is installed and the model is on CUDA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmsmith.console import console


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ weight.T (+ bias)` against `targets`, one row chunk at a time.

    The gradients are computed in the forward pass, chunk by chunk, from softmax − one-hot, so neither
    pass ever holds more than `chunk_size × vocab` logits; backward only scales them by the incoming
    gradient. This is the same arithmetic as `F.cross_entropy(F.linear(hidden, weight, bias), targets,
    reduction="sum")`, with fp32 softmax and gradient accumulation.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size: int, compute_dtype):
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_bias = bias is not None and ctx.needs_input_grad[2]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if need_bias else None
        w = weight.to(compute_dtype)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            h = hidden[start : start + chunk_size].to(compute_dtype)
            t = targets[start : start + chunk_size]
            logits = (h @ w.T).float()
            if bias is not None:
                logits += bias.float()
            log_norm = torch.logsumexp(logits, dim=-1)
            total += (log_norm - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if not (need_hidden or need_weight or need_bias):
                continue
            # d(loss)/d(logits) = softmax − one_hot, built in place over the logits buffer.
            grad_logits = logits.sub_(log_norm[:, None]).exp_()
            grad_logits[torch.arange(t.shape[0], device=t.device), t] -= 1.0
            if need_hidden:
                grad_hidden[start : start + chunk_size] = (grad_logits.to(compute_dtype) @ w).to(hidden.dtype)
            if need_weight:
                grad_weight += (grad_logits.to(compute_dtype).T @ h).float()
            if need_bias:
                grad_bias += grad_logits.sum(0)
        ctx.save_for_backward(*(g if g is not None else torch.empty(0) for g in (grad_hidden, grad_weight, grad_bias)))
        ctx.has = (need_hidden, need_weight, need_bias)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.has
        return (
            grad_hidden * grad_output.to(grad_hidden.dtype) if need_hidden else None,
            (grad_weight * grad_output).to(ctx.weight_dtype) if need_weight else None,
            (grad_bias * grad_output).to(ctx.weight_dtype) if need_bias else None,
            None,
            None,
            None,
        )


def chunked_linear_cross_entropy(
    hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor, chunk_size: int = 1024
) -> torch.Tensor:
    """Summed next-token loss of `head(hidden)` against `targets` without the full logits tensor.

    `hidden` is (rows, hidden_size) at the target positions only. A plain `nn.Linear` head takes the
    fused path above; any other head (a peft wrapper training some embedding rows, say) is run per chunk
    under activation checkpointing, which also keeps only one chunk of logits alive.
    """
    compute_dtype = torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type) \
        else hidden.dtype
    if type(head) is torch.nn.Linear:
        with torch.autocast(hidden.device.type, enabled=False):
            return _ChunkedLinearCrossEntropy.apply(hidden, head.weight, head.bias, targets, chunk_size, compute_dtype)

    def chunk_loss(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(head(h).float(), t, reduction="sum")

    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_size):
        total = total + torch.utils.checkpoint.checkpoint(
            chunk_loss, hidden[start : start + chunk_size], targets[start : start + chunk_size], use_reentrant=False
        )
    return total


def enable_gradient_checkpointing(model) -> None:
    """Recompute each decoder layer's activations in backward (transformers' switch): less memory, ~30% slower.

    Non-reentrant checkpointing needs no input that requires grad, so adapters over a frozen embedding work.
    """
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False


def apply_liger_kernels(model, device: torch.device) -> bool:
    """Swap in Liger's Triton kernels (RMSNorm, RoPE, SwiGLU) on CUDA when `liger-kernel` is installed."""
    if device.type != "cuda":
        return False
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except ImportError:
        return False
    base = model.get_base_model() if hasattr(model, "peft_config") else model
    try:
        # The fused linear-cross-entropy is ours (it also serves target-only positions), so Liger's is off.
        _apply_liger_kernel_to_instance(model=base, fused_linear_cross_entropy=False, cross_entropy=False)
    except (TypeError, ValueError, AttributeError) as exc:
        console.print(f"[yellow]liger kernels not applied:[/] {exc}")
        return False
    return True


def compile_layers(model) -> int:
    """Compile every decoder layer in place with `torch.compile`; module names and state dicts stay the same.

    Layers rather than the whole model: the loss path calls the decoder and the head separately, and
    one compiled graph per identical layer is compiled once and reused.
    """
    base = model.get_base_model() if hasattr(model, "peft_config") else model
    layers = getattr(base.get_decoder(), "layers", None)
    if layers is None:
        return 0
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)
