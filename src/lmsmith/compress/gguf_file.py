"""GGUF written from our own state dict, with the `gguf` package alone: no compiled llama.cpp is needed.

F32, F16, BF16, Q8_0 and Q4_0 are computed in Python by `gguf.quants`; tensor names come from `gguf`'s
own HF-to-GGUF name map; the tokenizer (byte-level BPE: token list, merges, token types, special ids)
and the chat template go in as metadata, as llama.cpp's own converter writes them. Supported:
Qwen2, Qwen3 and Llama-family causal LMs (Mistral as llama) whose tokenizer is byte-level BPE with a
pre-tokenizer llama.cpp knows by name.

`write_gguf_lora` writes a peft LoRA adapter as llama.cpp's GGUF LoRA (`--lora`): `lora_a`/`lora_b` per
target matrix, alpha in the metadata (rsLoRA's scale folded in). `read_gguf_model(base, lora=...)`
applies such a file the way llama.cpp does (W + alpha/r · B·A), so both exports are checked the same way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lmsmith.errors import UserError

QUANTS = ("f32", "f16", "bf16", "q8_0", "q4_0")
# model_type → llama.cpp architecture name; llama's q/k rows are reordered for its interleaved rope.
ARCHITECTURES = {"qwen2": "qwen2", "qwen3": "qwen3", "llama": "llama", "mistral": "llama"}
# The pre-tokenizer regexes llama.cpp knows by name (its converter identifies them the same way).
KNOWN_PRETOKENIZERS = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "qwen2",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "llama-bpe",
}


@dataclass
class GGUFExport:
    """What was written: the file, its quantization, and the tensors kept at higher precision (and why)."""

    path: Path
    quant: str
    tensors: int
    bytes: int
    kept_higher: dict[str, str] = field(default_factory=dict)


def _qtype(quant: str):
    import gguf

    return {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
            "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0,
            "q4_0": gguf.GGMLQuantizationType.Q4_0}[quant]


def _file_type(quant: str) -> int:
    import gguf

    return {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
            "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
            "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[quant]


def _rope_theta(config) -> float:
    parameters = getattr(config, "rope_parameters", None) or {}
    kind = parameters.get("rope_type", "default")
    scaling = getattr(config, "rope_scaling", None)
    if kind not in ("default", None) or (scaling and scaling.get("rope_type", scaling.get("type")) != "default"):
        raise UserError(f"GGUF export: rope scaling {parameters or scaling} is not written by this exporter")
    theta = parameters.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise UserError("GGUF export: the config has no rope_theta")
    return float(theta)


def reorder_for_interleaved_rope(weight: np.ndarray, heads: int, inverse: bool = False) -> np.ndarray:
    """HF Llama rotates the two halves of each head; llama.cpp's llama rotates adjacent pairs. Reorder a
    q/k projection's rows (per head: first half and second half interleaved), or undo it."""
    rows = weight.shape[0]
    head_dim = rows // heads
    if inverse:
        return weight.reshape(heads, head_dim // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    return weight.reshape(heads, 2, head_dim // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _tokenizer_metadata(writer, model_dir: Path, vocab_rows: int) -> None:
    import gguf

    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"{model_dir}: GGUF export needs tokenizer.json (a fast tokenizer)")
    spec = json.loads(path.read_text(encoding="utf-8"))
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer") or {}):
        raise UserError(f"{path}: GGUF export supports byte-level BPE tokenizers (GPT-2/Qwen/Llama 3 style); this "
                        f"is {model.get('type')} with pre-tokenizer {(spec.get('pre_tokenizer') or {}).get('type')}")
    pattern = _split_regex(spec.get("pre_tokenizer") or {})
    pre = KNOWN_PRETOKENIZERS.get(pattern or "")
    if pre is None:
        raise UserError(f"{path}: llama.cpp knows pre-tokenizers by name, and the split pattern {pattern!r} is not "
                        f"one of those this exporter maps ({', '.join(sorted(set(KNOWN_PRETOKENIZERS.values())))}); "
                        "a GGUF with another name would tokenize differently")
    vocab: dict[str, int] = dict(model.get("vocab") or {})
    added = {entry["id"]: entry for entry in spec.get("added_tokens") or []}
    for token_id, entry in added.items():
        vocab[entry["content"]] = token_id
    if max(vocab.values()) >= vocab_rows:
        raise UserError(f"{path}: token id {max(vocab.values())} is beyond the model's {vocab_rows} embedding rows")
    tokens = [f"[PAD{index}]" for index in range(vocab_rows)]
    types = [gguf.TokenType.UNUSED] * vocab_rows
    for text, token_id in vocab.items():
        tokens[token_id] = text
        if token_id in added:
            types[token_id] = gguf.TokenType.CONTROL if added[token_id].get("special") else gguf.TokenType.USER_DEFINED
        else:
            types[token_id] = gguf.TokenType.NORMAL
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in model.get("merges") or []]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    config = json.loads((model_dir / "tokenizer_config.json").read_text(encoding="utf-8")) \
        if (model_dir / "tokenizer_config.json").is_file() else {}
    by_text = {text: token_id for text, token_id in vocab.items()}
    for key, add in (("eos_token", writer.add_eos_token_id), ("bos_token", writer.add_bos_token_id),
                     ("pad_token", writer.add_pad_token_id)):
        value = config.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if value in by_text:
            add(by_text[value])
    writer.add_add_bos_token(bool(config.get("add_bos_token", False)))
    template = config.get("chat_template")
    if template is None and (model_dir / "chat_template.jinja").is_file():
        template = (model_dir / "chat_template.jinja").read_text(encoding="utf-8")
    if template:
        writer.add_chat_template(template)


def _split_regex(pre_tokenizer: dict[str, Any]) -> str | None:
    parts = pre_tokenizer.get("pretokenizers") or [pre_tokenizer]
    for part in parts:
        if part.get("type") == "Split":
            pattern = part.get("pattern") or {}
            return pattern.get("Regex") or pattern.get("String")
    return None


def write_gguf(model_dir: str | Path, out_path: str | Path, quant: str = "q8_0") -> GGUFExport:
    """Write the HF model in `model_dir` (fp32/bf16 safetensors) as one GGUF file at `quant`.

    1-D tensors (norms, biases) stay F32, as llama.cpp's converter keeps them; a matrix whose rows are
    not a whole number of 32-value blocks falls back to F16 under Q8_0/Q4_0 (listed in `kept_higher`).
    """
    import gguf
    import torch
    from transformers import AutoConfig

    from lmsmith.train.model import read_pretrained

    if quant not in QUANTS:
        raise UserError(f"--quant {quant}: choose one of {', '.join(QUANTS)}")
    model_dir, out_path = Path(model_dir), Path(out_path)
    config = AutoConfig.from_pretrained(model_dir)
    arch = ARCHITECTURES.get(config.model_type)
    if arch is None:
        raise UserError(f"{model_dir}: GGUF export supports {', '.join(sorted(ARCHITECTURES))} models, not "
                        f"{config.model_type!r}")
    model = read_pretrained(model_dir, str(model_dir), dtype=torch.float32)
    state = {name: tensor.detach().float().numpy() for name, tensor in model.state_dict().items()}
    heads, kv_heads = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    layers = config.num_hidden_layers
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper().replace("-", "_")], layers)

    out_path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(out_path), arch)
    writer.add_name(model_dir.name)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(layers)
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(int(config.vocab_size))
    writer.add_file_type(_file_type(quant))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _tokenizer_metadata(writer, model_dir, int(state["model.embed_tokens.weight"].shape[0]))

    tied = bool(getattr(config, "tie_word_embeddings", False))
    qtype = _qtype(quant)
    kept: dict[str, str] = {}
    written = 0
    for hf_name, array in state.items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reads the output projection from token_embd when output.weight is absent
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UserError(f"{model_dir}: no GGUF name for tensor {hf_name}")
        if arch == "llama" and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            array = reorder_for_interleaved_rope(array, heads if "q_proj" in hf_name else kv_heads)
        tensor_type = qtype
        if array.ndim < 2:
            tensor_type = gguf.GGMLQuantizationType.F32
        elif quant in ("q8_0", "q4_0") and array.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
            tensor_type = gguf.GGMLQuantizationType.F16
            kept[name] = f"rows of {array.shape[-1]} are not whole {gguf.GGML_QUANT_SIZES[qtype][0]}-value blocks"
        if tensor_type == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, np.ascontiguousarray(array, dtype=np.float32))
        elif tensor_type == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(name, np.ascontiguousarray(array, dtype=np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(np.ascontiguousarray(array, dtype=np.float32), tensor_type),
                              raw_dtype=tensor_type)
        written += 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return GGUFExport(out_path, quant, written, out_path.stat().st_size, kept)


def _field(reader, key: str, default: Any = None) -> Any:
    found = reader.fields.get(key)
    return default if found is None else found.contents()


def write_gguf_lora(adapter_dir: str | Path, out_path: str | Path, quant: str = "f16",
                    base_model: str | Path | None = None) -> GGUFExport:
    """A plain peft LoRA adapter (linear targets only) as a GGUF LoRA for llama.cpp's `--lora`; the base
    (for the architecture) is `base_model` or the one the adapter names."""
    import math

    import gguf
    from safetensors import safe_open
    from transformers import AutoConfig

    adapter_dir, out_path = Path(adapter_dir), Path(out_path)
    if quant not in ("f32", "f16"):
        raise UserError(f"--quant {quant}: a GGUF LoRA is written as f32 or f16 (its rank rarely fills 32-value blocks)")
    settings = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    from lmsmith.train.export import llamacpp_problems

    refused = llamacpp_problems(settings)
    if refused:
        raise UserError(f"{adapter_dir}: a llama.cpp LoRA holds plain low-rank matrices; " + "; ".join(refused))
    base = Path(base_model or settings.get("base_model_name_or_path") or "")
    if not (base / "config.json").is_file():
        raise UserError(f"{adapter_dir}: its base {str(base)!r} is not a local model folder")
    config = AutoConfig.from_pretrained(base)
    arch = ARCHITECTURES.get(config.model_type)
    if arch is None:
        raise UserError(f"{base}: GGUF export supports {', '.join(sorted(ARCHITECTURES))} models")
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config.num_hidden_layers)
    rank, alpha = int(settings["r"]), float(settings["lora_alpha"])
    if settings.get("use_rslora"):
        alpha = alpha * math.sqrt(rank)  # llama.cpp scales by alpha / r; rsLoRA by alpha / sqrt(r)
    writer = gguf.GGUFWriter(str(out_path), arch)
    writer.add_string("general.type", "adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", alpha)
    dtype = np.float16 if quant == "f16" else np.float32
    written = 0
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), framework="pt") as handle:
        for key in sorted(handle.keys()):
            if ".lora_A." not in key and ".lora_B." not in key:
                raise UserError(f"{adapter_dir}: tensor {key} is not a LoRA matrix")
            part = "lora_a" if ".lora_A." in key else "lora_b"
            module = key.removeprefix("base_model.model.").split(".lora_")[0]
            name = names.get_name(module + ".weight", try_suffixes=(".weight",))
            if name is None or not module.split(".")[-1].endswith("_proj"):
                raise UserError(f"{adapter_dir}: LoRA on {module} has no llama.cpp counterpart (linear layers only)")
            array = handle.get_tensor(key).float().numpy()
            if arch == "llama" and part == "lora_b" and module.endswith(("q_proj", "k_proj")):
                array = reorder_for_interleaved_rope(array, heads if module.endswith("q_proj") else kv_heads)
            writer.add_tensor(f"{name}.{part}", np.ascontiguousarray(array, dtype=dtype))
            written += 1
    out_path.parent.mkdir(parents=True, exist_ok=True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return GGUFExport(out_path, quant, written, out_path.stat().st_size)


def read_gguf_model(path: str | Path, lora: str | Path | None = None):
    """A transformers model built from a GGUF file: config from its metadata, weights dequantized; with
    `lora`, a GGUF LoRA applied as llama.cpp applies it (W + alpha/r · B·A)."""
    import gguf
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

    reader = gguf.GGUFReader(str(path))
    arch = _field(reader, "general.architecture")
    configs = {"qwen2": Qwen2Config, "qwen3": Qwen3Config, "llama": LlamaConfig}
    if arch not in configs:
        raise UserError(f"{path}: architecture {arch!r} is not one this reader builds")
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    embedding = tensors["token_embd.weight"]
    layers = int(_field(reader, f"{arch}.block_count"))
    heads = int(_field(reader, f"{arch}.attention.head_count"))
    kv_heads = int(_field(reader, f"{arch}.attention.head_count_kv"))
    settings = dict(
        vocab_size=int(embedding.shape[1]), hidden_size=int(_field(reader, f"{arch}.embedding_length")),
        intermediate_size=int(_field(reader, f"{arch}.feed_forward_length")), num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads,
        head_dim=int(_field(reader, f"{arch}.attention.key_length")),
        max_position_embeddings=int(_field(reader, f"{arch}.context_length")),
        rms_norm_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon")),
        tie_word_embeddings="output.weight" not in tensors,
    )
    config = configs[arch](**settings)
    config.rope_parameters = {"rope_type": "default", "rope_theta": float(_field(reader, f"{arch}.rope.freq_base"))}
    if arch == "llama":
        config.attention_bias = any(name.endswith("attn_q.bias") for name in tensors)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], layers)
    state = {}
    for hf_name in model.state_dict():
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if config.tie_word_embeddings and hf_name == "lm_head.weight":
            continue
        if name not in tensors:
            raise UserError(f"{path}: tensor {name} ({hf_name}) is missing")
        tensor = tensors[name]
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        values = values.reshape([int(size) for size in reversed(tensor.shape)])
        if arch == "llama" and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            values = reorder_for_interleaved_rope(values, heads if "q_proj" in hf_name else kv_heads, inverse=True)
        state[hf_name] = torch.from_numpy(np.ascontiguousarray(values))
    if lora is not None:
        _apply_gguf_lora(state, lora, names, arch, heads, kv_heads)
    model.load_state_dict(state, strict=not config.tie_word_embeddings, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    # Buffers are not in the state dict: the rotary frequencies are rebuilt off the meta device.
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    return model.eval()


def _apply_gguf_lora(state: dict, path: str | Path, names, arch: str, heads: int, kv_heads: int) -> None:
    import gguf
    import torch

    reader = gguf.GGUFReader(str(path))
    if _field(reader, "general.type") != "adapter" or _field(reader, "adapter.type") != "lora":
        raise UserError(f"{path}: not a GGUF LoRA adapter")
    alpha = float(_field(reader, "adapter.lora.alpha"))
    tensors = {tensor.name: tensor for tensor in reader.tensors}

    def matrix(name: str) -> np.ndarray:
        tensor = tensors[name]
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        return values.reshape([int(size) for size in reversed(tensor.shape)])

    for hf_name in list(state):
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None or f"{name}.lora_a" not in tensors:
            continue
        down, up = matrix(f"{name}.lora_a"), matrix(f"{name}.lora_b")
        delta = torch.from_numpy(up @ down) * (alpha / down.shape[0])
        if arch == "llama" and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            # The file's B rows are in llama.cpp's order, as are the base rows until they are read back.
            delta = torch.from_numpy(reorder_for_interleaved_rope(
                delta.numpy(), heads if "q_proj" in hf_name else kv_heads, inverse=True))
        state[hf_name] = state[hf_name] + delta


# Max |logit difference| allowed, as a share of the largest source logit, and the least argmax agreement.
VERIFY_BOUNDS = {"f32": (1e-4, 1.0), "f16": (1e-2, 0.99), "bf16": (4e-2, 0.95), "q8_0": (5e-2, 0.9),
                 "q4_0": (None, None)}


def verify_gguf(source, tokenizer, gguf_path: Path, quant: str, lora: Path | None = None) -> dict[str, float]:
    """Compare a GGUF's logits (the model rebuilt from its metadata and dequantized weights, with `lora`
    applied) with the source model's on a probe; raise when they differ by more than the quantization
    allows. `source` is a loaded model (with its `tokenizer`) or a model folder (tokenizer None)."""
    import torch

    from lmsmith.train.export import probe_ids
    from lmsmith.train.model import load_causal_lm

    if isinstance(source, (str, Path)):
        source, tokenizer = load_causal_lm(source, source=str(source))
    ids = probe_ids(tokenizer)
    with torch.no_grad():
        expected = source.float().eval()(input_ids=ids).logits
        got = read_gguf_model(gguf_path, lora=lora)(input_ids=ids).logits
    scale = float(expected.abs().max()) or 1.0
    report = {"max_abs_logit_diff": float((got - expected).abs().max()),
              "relative_logit_diff": float((got - expected).abs().max()) / scale,
              "argmax_agreement": float((got.argmax(-1) == expected.argmax(-1)).float().mean())}
    bound, agreement = VERIFY_BOUNDS[quant]
    if bound is not None and (report["relative_logit_diff"] > bound or report["argmax_agreement"] < agreement):
        raise UserError(f"{gguf_path}: its logits differ from the source model's by {report['relative_logit_diff']:.3g} of "
                        f"the largest logit (bound {bound}) with argmax agreement {report['argmax_agreement']:.3f} "
                        f"(bound {agreement}); the export is wrong for this model, so nothing was replaced")
    return report
