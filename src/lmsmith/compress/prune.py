"""Pruning: magnitude (unstructured), 2:4 semi-structured, and structured removal that shrinks the model.

Unstructured and 2:4 pruning zero weights in place (torch); the variant folder stores those weights
sparse (`lmsmith.compress.folder`), so the file shrinks. On CPU the matmuls stay dense. On CUDA,
`to_semi_structured` swaps 2:4 weights for torch's semi-structured sparse tensors (cuSPARSELt/CUTLASS
kernels, fp16/bf16).

Structured pruning removes whole key/value head groups and MLP channels, the same number in every
layer (HF configs hold one head count and one MLP width), chosen per layer by how much each contributed
on calibration text: the mean norm of its output times the norm of the weights that project it back.
`shrink` also drops whole layers, which is how the distill method builds its student.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from lmsmith.compress.calibrate import forward_all
from lmsmith.compress.quant import selected_linears
from lmsmith.errors import UserError

SUPPORTED = ("qwen2", "qwen3", "llama", "mistral")


def magnitude_prune(model: nn.Module, sparsity: float, include: list[str], skip: list[str]) -> list[str]:
    """Zero the `sparsity` share of smallest-magnitude weights of each selected Linear; their weight keys."""
    pruned = []
    for name, linear in selected_linears(model, include, skip):
        weight = linear.weight.data
        count = int(weight.numel() * sparsity)
        if count == 0:
            continue
        threshold = weight.abs().reshape(-1).kthvalue(count).values
        weight.masked_fill_(weight.abs() <= threshold, 0.0)
        pruned.append(f"{name}.weight")
    return pruned


def semi_structured_prune(model: nn.Module, include: list[str], skip: list[str]) -> list[str]:
    """Keep the two largest-magnitude weights of every four consecutive inputs (NVIDIA's 2:4 pattern)."""
    pruned = []
    for name, linear in selected_linears(model, include, skip):
        weight = linear.weight.data
        if weight.shape[1] % 4:
            continue
        groups = weight.reshape(-1, 4)
        smallest = groups.abs().topk(2, dim=1, largest=False).indices
        groups.scatter_(1, smallest, 0.0)
        pruned.append(f"{name}.weight")
    return pruned


def is_two_four(weight: torch.Tensor) -> bool:
    return weight.shape[1] % 4 == 0 and bool(((weight.reshape(-1, 4) != 0).sum(dim=1) <= 2).all())


def to_semi_structured(model: nn.Module, weight_names: Sequence[str]) -> int:
    """On CUDA in fp16/bf16, swap 2:4 weights for torch's semi-structured sparse tensors; how many."""
    from torch.sparse import to_sparse_semi_structured

    swapped = 0
    for name in weight_names:
        module = model.get_submodule(name.rsplit(".", 1)[0])
        weight = module.weight
        if weight.device.type != "cuda" or weight.dtype not in (torch.float16, torch.bfloat16):
            raise UserError(f"{name}: 2:4 sparse kernels need a CUDA fp16/bf16 weight, not "
                            f"{weight.device.type} {weight.dtype}; on CPU the pruned weights run dense")
        module.weight = nn.Parameter(to_sparse_semi_structured(weight.detach()), requires_grad=False)
        swapped += 1
    return swapped


# ---------------------------------------------------------------- structured


def _decoder_layers(model: nn.Module):
    if model.config.model_type not in SUPPORTED:
        raise UserError(f"structured pruning and distillation support {', '.join(SUPPORTED)} models, "
                        f"not {model.config.model_type}")
    return model.model.layers


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def importance(model: nn.Module, batches: Sequence[dict[str, torch.Tensor]]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer: the score of each key/value head group and of each MLP channel on `batches`."""
    layers = _decoder_layers(model)
    config = model.config
    dim, heads, kv_heads = head_dim(config), config.num_attention_heads, config.num_key_value_heads
    head_sums = [torch.zeros(heads) for _ in layers]
    channel_sums = [torch.zeros(config.intermediate_size) for _ in layers]
    mask: list[torch.Tensor] = []

    def watch(sums: list[torch.Tensor], index: int, per_head: bool):
        def record(module, args):
            keep = mask[0].reshape(-1).bool()
            x = args[0].reshape(-1, args[0].shape[-1])[keep].float()
            if per_head:
                sums[index] += x.reshape(x.shape[0], heads, dim).norm(dim=-1).sum(dim=0)
            else:
                sums[index] += x.abs().sum(dim=0)
        return record

    handles = []
    for index, layer in enumerate(layers):
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(watch(head_sums, index, True)))
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(watch(channel_sums, index, False)))
    forward_all(model, batches, handles, mask, "rank heads and channels")
    group_scores, channel_scores = [], []
    for index, layer in enumerate(layers):
        out_weight = layer.self_attn.o_proj.weight.detach().float()
        per_head = head_sums[index] * out_weight.reshape(out_weight.shape[0], heads, dim).norm(dim=(0, 2))
        group_scores.append(per_head.reshape(kv_heads, heads // kv_heads).sum(dim=1))
        channel_scores.append(channel_sums[index] * layer.mlp.down_proj.weight.detach().float().norm(dim=0))
    return group_scores, channel_scores


def _keep(scores: torch.Tensor, count: int) -> torch.Tensor:
    return scores.topk(count).indices.sort().values


def shrink(model: nn.Module, keep_layers: Sequence[int] | None = None, head_share: float = 0.0,
           mlp_share: float = 0.0, batches: Sequence[dict[str, torch.Tensor]] = ()) -> nn.Module:
    """A new, smaller model of the same architecture: only `keep_layers`, and in each of them the most
    important (1 - head_share) of key/value head groups and (1 - mlp_share) of MLP channels."""
    import copy

    from transformers import AutoModelForCausalLM

    layers = _decoder_layers(model)
    config = model.config
    keep_layers = list(range(len(layers))) if keep_layers is None else list(keep_layers)
    if not keep_layers or any(not 0 <= i < len(layers) for i in keep_layers) or len(set(keep_layers)) != len(keep_layers):
        raise UserError(f"keep_layers: {keep_layers} must be distinct layer indices in 0..{len(layers) - 1}")
    dim, heads, kv_heads = head_dim(config), config.num_attention_heads, config.num_key_value_heads
    per_group = heads // kv_heads
    groups_kept = kv_heads - int(kv_heads * head_share)
    channels_kept = config.intermediate_size - int(config.intermediate_size * mlp_share)
    if groups_kept < 1 or channels_kept < 1:
        raise UserError("structured pruning would remove every head or channel; lower heads/mlp")
    needs_ranking = groups_kept < kv_heads or channels_kept < config.intermediate_size
    if needs_ranking and not batches:
        raise UserError("structured pruning needs calibration text to rank heads and channels")
    group_scores, channel_scores = importance(model, batches) if needs_ranking else ([], [])

    new_config = copy.deepcopy(config)
    new_config.num_hidden_layers = len(keep_layers)
    new_config.num_key_value_heads = groups_kept
    new_config.num_attention_heads = groups_kept * per_group
    new_config.head_dim = dim
    new_config.intermediate_size = channels_kept
    if getattr(new_config, "layer_types", None):
        new_config.layer_types = [config.layer_types[i] for i in keep_layers]
    if hasattr(new_config, "max_window_layers"):
        new_config.max_window_layers = min(new_config.max_window_layers, len(keep_layers))

    source = model.state_dict()
    state: dict[str, torch.Tensor] = {}
    for name, tensor in source.items():
        if not name.startswith("model.layers."):
            state[name] = tensor
    for new_index, old_index in enumerate(keep_layers):
        groups = (_keep(group_scores[old_index], groups_kept) if groups_kept < kv_heads
                  else torch.arange(kv_heads))
        channels = (_keep(channel_scores[old_index], channels_kept) if channels_kept < config.intermediate_size
                    else torch.arange(config.intermediate_size))
        kv_rows = (groups[:, None] * dim + torch.arange(dim)).reshape(-1)
        q_heads = (groups[:, None] * per_group + torch.arange(per_group)).reshape(-1)
        q_rows = (q_heads[:, None] * dim + torch.arange(dim)).reshape(-1)
        prefix = f"model.layers.{old_index}."
        for name, tensor in source.items():
            if not name.startswith(prefix):
                continue
            local = name[len(prefix):]
            if local.startswith("self_attn.q_proj."):
                tensor = tensor[q_rows]
            elif local.startswith(("self_attn.k_proj.", "self_attn.v_proj.")):
                tensor = tensor[kv_rows]
            elif local == "self_attn.o_proj.weight":
                tensor = tensor[:, q_rows]
            elif local.startswith(("mlp.gate_proj.", "mlp.up_proj.")):
                tensor = tensor[channels]
            elif local == "mlp.down_proj.weight":
                tensor = tensor[:, channels]
            state[f"model.layers.{new_index}.{local}"] = tensor.clone()
    student = AutoModelForCausalLM.from_config(new_config, dtype=torch.float32)
    missing, unexpected = student.load_state_dict(state, strict=False)
    missing = [key for key in missing if key != "lm_head.weight" or not config.tie_word_embeddings]
    if missing or unexpected:
        raise UserError(f"could not shrink {config.model_type}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if config.tie_word_embeddings:
        student.tie_weights()
    student.generation_config = copy.deepcopy(model.generation_config)
    return student.eval()


def evenly_spaced(total: int, count: int) -> list[int]:
    """`count` layer indices from first to last, as evenly spread as whole numbers allow."""
    if count >= total:
        return list(range(total))
    if count == 1:
        return [0]
    return sorted({round(i * (total - 1) / (count - 1)) for i in range(count)})
