"""The folder a compressed variant is saved in, and loading it back.

A variant folder is an HF folder (config, generation config, tokenizer) plus:
- `lmsmith_compressed.json`: which Linear modules are which quantized kind (`lmsmith.compress.quant`)
  with their settings, which weights are stored sparse, which keys are tied;
- `model.safetensors`: every tensor of the state dict as plain tensors (safetensors, no pickle). A
  pruned weight listed as sparse is stored as its non-zero values plus a one-bit-per-weight mask, so
  unstructured and 2:4 pruning shrink the file, not just the model's zero count.

A variant with nothing quantized and nothing sparse (a distilled student, structured pruning) is a plain
HF folder, which `save_pretrained` writes and any HF tool loads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from lmsmith.compress.quant import QuantizedLinear, skeleton
from lmsmith.errors import UserError

MARKER = "lmsmith_compressed.json"
FORMAT = "lmsmith-compressed"
VERSION = 1
WEIGHTS = "model.safetensors"
MASK_SUFFIX = ".__mask"
VALUES_SUFFIX = ".__values"


def is_compressed_folder(path: Path) -> bool:
    return (Path(path) / MARKER).is_file()


def quantized_modules(model: torch.nn.Module) -> dict[str, dict[str, Any]]:
    return {name: {"kind": module.kind, "settings": module.settings()}
            for name, module in model.named_modules() if isinstance(module, QuantizedLinear)}


def encode_sparse(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(non-zero values in row-major order, the mask packed eight weights per byte)."""
    flat = tensor.reshape(-1)
    mask = flat != 0
    padded = torch.nn.functional.pad(mask, (0, (-mask.numel()) % 8)).reshape(-1, 8).to(torch.uint8)
    bits = (padded << torch.arange(8, dtype=torch.uint8)).sum(dim=1, dtype=torch.uint8)
    return flat[mask].contiguous(), bits


def decode_sparse(values: torch.Tensor, bits: torch.Tensor, shape: list[int]) -> torch.Tensor:
    count = 1
    for size in shape:
        count *= size
    mask = ((bits[:, None] >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(-1)[:count].bool()
    dense = torch.zeros(count, dtype=values.dtype)
    dense[mask] = values
    return dense.reshape(shape)


def save_variant(model: torch.nn.Module, tokenizer, folder: Path, sparse: list[str] = ()) -> Path:
    """Write `model` to `folder`: `save_pretrained` when nothing is quantized or sparse, else our format.

    `sparse` names weights (state-dict keys) stored as values + mask."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    modules = quantized_modules(model)
    tokenizer.save_pretrained(folder)
    if not modules and not sparse:
        model.save_pretrained(folder)
        return folder
    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    owners: dict[tuple[int, torch.dtype, tuple], str] = {}
    shapes: dict[str, list[int]] = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape))
        if tensor.numel() and key in owners:  # tied weights are stored once
            aliases[name] = owners[key]
            continue
        owners[key] = name
        tensor = tensor.detach().contiguous()
        if name in sparse:
            values, bits = encode_sparse(tensor)
            tensors[name + VALUES_SUFFIX], tensors[name + MASK_SUFFIX] = values, bits
            shapes[name] = list(tensor.shape)
        else:
            tensors[name] = tensor
    save_file(tensors, str(folder / WEIGHTS), metadata={"format": FORMAT})
    marker = {"format": FORMAT, "version": VERSION, "modules": modules, "sparse": shapes, "aliases": aliases,
              "torch": torch.__version__}
    (folder / MARKER).write_text(json.dumps(marker, indent=2), encoding="utf-8")
    return folder


def load_variant(path: Path) -> torch.nn.Module:
    """Rebuild the float model from the config, swap in the saved module kinds, load the saved state."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    marker_path = path / MARKER
    try:
        marker = json.loads(marker_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{marker_path}: unreadable ({exc})") from None
    if marker.get("format") != FORMAT or marker.get("version") != VERSION:
        raise UserError(f"{marker_path}: not a {FORMAT} v{VERSION} folder (format {marker.get('format')!r}, "
                        f"version {marker.get('version')!r}); recompress with this lmsmith")
    config = AutoConfig.from_pretrained(path)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    from lmsmith.compress.quant import set_module

    for name, spec in marker["modules"].items():
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            raise UserError(f"{marker_path}: module {name} is not in the model {config.model_type}") from None
        set_module(model, name, skeleton(spec["kind"], linear, spec.get("settings", {})))
    state = load_file(str(path / WEIGHTS))
    for name, shape in marker.get("sparse", {}).items():
        state[name] = decode_sparse(state.pop(name + VALUES_SUFFIX), state.pop(name + MASK_SUFFIX), shape)
    expected = set(model.state_dict())
    missing = expected - set(state) - set(marker.get("aliases", {}))
    unexpected = set(state) - expected
    if missing or unexpected:
        raise UserError(f"{path / WEIGHTS}: does not match {marker_path} (missing {sorted(missing)[:3]}, "
                        f"unexpected {sorted(unexpected)[:3]})")
    model.load_state_dict(state, strict=False)
    for name, owner in marker.get("aliases", {}).items():
        target, _, attr = name.rpartition(".")
        source_module, _, source_attr = owner.rpartition(".")
        setattr(model.get_submodule(target), attr, getattr(model.get_submodule(source_module), source_attr))
    generation_config = path / "generation_config.json"
    if generation_config.is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(path)
    return model.eval()
