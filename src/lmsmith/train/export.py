"""Export a trained adapter: as a peft folder that peft and vLLM (`--lora-modules name=DIR`) load, and
merged into the base weights as a plain HF model folder.

peft writes the adapter (adapter_config.json + adapter_model.safetensors); this module pins down the
fields servers read (`base_model_name_or_path`, `target_modules` as plain module names) and records
the lmsmith method beside it, so a QLoRA adapter is merged into the same 4-bit-rounded weights it was
trained against.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from lmsmith.errors import UserError
from lmsmith.train.method_config import METHOD_CLASSES, QLoraMethod

ADAPTER_CONFIG = "adapter_config.json"
METHOD_FILE = "lmsmith_method.json"


def save_adapter(model, out_dir: str | Path, base_model: str | Path, method=None, tokenizer=None) -> Path:
    """Write `model`'s adapter in peft format, with `base_model` as its base and explicit target modules.

    `method` (the lmsmith method config) is recorded so `merge_adapter` can tell a QLoRA adapter apart.
    """
    if not hasattr(model, "peft_config"):
        raise UserError("export: the model has no adapter to save (full and freeze methods save whole models)")
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    config_path = out_dir / ADAPTER_CONFIG
    config = json.loads(config_path.read_text(encoding="utf-8"))
    # An absolute folder, so the adapter loads from any working directory; a hub-style id stays as given.
    local = Path(base_model).expanduser()
    config["base_model_name_or_path"] = str(local.resolve()) if local.exists() else str(base_model)
    targets = config.get("target_modules")
    if isinstance(targets, (list, tuple, set)):
        config["target_modules"] = sorted(targets)
    # peft leaves modules_to_save null unless asked; keep it that way so servers load only the adapter.
    if not config.get("modules_to_save"):
        config["modules_to_save"] = None
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
    if method is not None:
        (out_dir / METHOD_FILE).write_text(method.model_dump_json(indent=2), encoding="utf-8")
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    compatibility = adapter_compatibility(out_dir)
    (out_dir / COMPATIBILITY_FILE).write_text(json.dumps(compatibility, indent=2, ensure_ascii=False), encoding="utf-8")
    return out_dir


def probe_ids(tokenizer):
    """A short chat turn (or plain text without a template) as input ids: what exports are checked on."""
    import torch

    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "2023年营业收入同比增长多少?"}],
                                             tokenize=False, add_generation_prompt=True)
    except Exception:  # no chat template: plain text probes the weights just as well
        text = "2023年营业收入同比增长15.2%。Revenue grew 15.2% in 2023."
    return torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])


def read_method(adapter_dir: str | Path):
    """The lmsmith method recorded with an adapter, or None for an adapter from elsewhere."""
    path = Path(adapter_dir) / METHOD_FILE
    if not path.exists():
        return None
    raw = json.loads(path.read_text(encoding="utf-8"))
    for cls in METHOD_CLASSES:
        if cls.model_fields["name"].default == raw.get("name"):
            return cls.model_validate(raw)
    raise UserError(f"{path}: unknown method {raw.get('name')!r}")


def vllm_problems(adapter_dir: str | Path) -> list[str]:
    """Why vLLM's `--lora-modules` would refuse this adapter (empty when it loads)."""
    path = Path(adapter_dir) / ADAPTER_CONFIG
    if not path.exists():
        return [f"{path}: missing"]
    config = json.loads(path.read_text(encoding="utf-8"))
    problems = []
    if config.get("peft_type") != "LORA":
        problems.append(f"peft_type {config.get('peft_type')}: vLLM serves LoRA adapters only")
    if config.get("use_dora"):
        problems.append("use_dora: vLLM does not serve DoRA adapters; merge it instead")
    if config.get("trainable_token_indices"):
        problems.append("trainable_token_indices: vLLM ignores trained embedding rows; `lmsmith export --to vllm` "
                        "merges them into a copy of the base, or train with train_tokens: none")
    if config.get("modules_to_save"):
        problems.append(f"modules_to_save {config['modules_to_save']}: whole modules beside the adapter")
    if not config.get("base_model_name_or_path"):
        problems.append("base_model_name_or_path: empty")
    if not isinstance(config.get("target_modules"), list):
        problems.append("target_modules: not a list of module names")
    if not (Path(adapter_dir) / "adapter_model.safetensors").exists():
        problems.append("adapter_model.safetensors: missing")
    return problems


def llamacpp_problems(config: dict) -> list[str]:
    """Why llama.cpp's `--lora` cannot take this adapter (`adapter_config.json` as a dict) as it is: a
    llama.cpp LoRA holds plain low-rank matrices and nothing else."""
    checks = (("use_dora", "DoRA: llama.cpp applies W + BA only"),
              ("trainable_token_indices", "trained embedding rows: `lmsmith export --to gguf-lora` merges them "
                                          "into the base GGUF"),
              ("modules_to_save", "modules_to_save: whole modules beside the adapter"),
              ("rank_pattern", "rank_pattern: one rank per adapter only"),
              ("alpha_pattern", "alpha_pattern: one alpha per adapter only"))
    problems = [reason for key, reason in checks if config.get(key)]
    if config.get("peft_type") != "LORA":
        problems.insert(0, f"peft_type {config.get('peft_type')}: llama.cpp loads LoRA adapters only")
    return problems


COMPATIBILITY_FILE = "lmsmith_compatibility.json"


def adapter_compatibility(adapter_dir: str | Path) -> dict[str, list[str]]:
    """Per runtime (peft, vllm, llama.cpp): why it would not load this adapter as saved (empty: it loads)."""
    config = json.loads((Path(adapter_dir) / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    return {"peft": [], "vllm": vllm_problems(adapter_dir), "llama.cpp": llamacpp_problems(config)}


def load_adapted(adapter_dir: Path, base_model: str | Path | None):
    """(the base with the adapter applied, loaded as the adapter was trained: QLoRA in 4 bits, then
    dequantized; the tokenizer, the adapter's own when it carries one)."""
    from peft import PeftModel

    from lmsmith.train.methods import dequantize_linear_layers
    from lmsmith.train.model import load_causal_lm, load_tokenizer

    if not (adapter_dir / ADAPTER_CONFIG).exists():
        raise UserError(f"{adapter_dir}: not a peft adapter folder (no {ADAPTER_CONFIG})")
    if base_model is None:
        base_model = json.loads((adapter_dir / ADAPTER_CONFIG).read_text(encoding="utf-8")).get("base_model_name_or_path")
        if not base_model or not Path(base_model).is_dir():
            raise UserError(f"{adapter_dir / ADAPTER_CONFIG}: base_model_name_or_path {base_model!r} is not a local "
                            "folder; pass the base model's folder")
    method = read_method(adapter_dir)
    base, tokenizer = load_causal_lm(base_model, source="export base model",
                                     method=method if isinstance(method, QLoraMethod) else None)
    if isinstance(method, QLoraMethod):
        dequantize_linear_layers(base)
    if (adapter_dir / "tokenizer_config.json").exists() or (adapter_dir / "tokenizer.json").exists():
        tokenizer = load_tokenizer(adapter_dir, source=str(adapter_dir))
    return PeftModel.from_pretrained(base, adapter_dir), tokenizer


def merge_adapter(adapter_dir: str | Path, out_dir: str | Path, base_model: str | Path | None = None) -> Path:
    """Load the base as the adapter was trained on it, apply the adapter, fold it in and save a plain
    fp32 HF folder with the adapter's tokenizer (its chat template included).

    `base_model` defaults to the adapter's `base_model_name_or_path`. A QLoRA adapter's base is loaded
    in 4 bits exactly as training loaded it and dequantized, so the adapter lands on the weights it was
    trained against; any other base is loaded in fp32.
    """
    from lmsmith.train.model import save_causal_lm, set_generation_tokens

    adapted, tokenizer = load_adapted(Path(adapter_dir), base_model)
    merged = adapted.merge_and_unload()
    set_generation_tokens(merged, tokenizer)
    out_dir = Path(out_dir)
    save_causal_lm(merged, tokenizer, out_dir)
    return out_dir


def split_token_rows(adapter_dir: str | Path, out_dir: str | Path, base_model: str | Path | None = None) -> tuple[Path, Path]:
    """An adapter vLLM serves, from one that also trained embedding rows (peft trainable tokens, lmsmith's
    default `train_tokens: used`): the rows merged into a copy of the base (`out_dir/base`), the LoRA
    weights alone beside it (`out_dir/adapter`, whose base is that copy). Returns (base copy, adapter).

    peft does the merging: each trainable-token layer is merged into its embedding, then the LoRA layers
    are removed unmerged (`unload`). The two together compute what the original adapter does.
    """
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer
    from safetensors.torch import load_file, save_file

    from lmsmith.train.model import save_causal_lm, set_generation_tokens

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    adapted, tokenizer = load_adapted(adapter_dir, base_model)
    for module in adapted.modules():
        if isinstance(module, TrainableTokensLayer):
            module.merge()
    base = adapted.unload()
    set_generation_tokens(base, tokenizer)
    save_causal_lm(base, tokenizer, out_dir / "base")
    adapter_out = out_dir / "adapter"
    shutil.copytree(adapter_dir, adapter_out)
    config = json.loads((adapter_out / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    config.pop("trainable_token_indices", None)
    config["base_model_name_or_path"] = str((out_dir / "base").resolve())
    (adapter_out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
    if isinstance(read_method(adapter_out), QLoraMethod):
        # The copy holds the dequantized 4-bit weights: loading it in full precision is what QLoRA trained on.
        (adapter_out / METHOD_FILE).unlink()
    weights = adapter_out / "adapter_model.safetensors"
    state = load_file(str(weights))
    save_file({name: tensor for name, tensor in state.items() if "trainable_tokens" not in name}, str(weights),
              metadata={"format": "pt"})
    return out_dir / "base", adapter_out
