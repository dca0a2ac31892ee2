"""Build a tiny Qwen2 causal LM from scratch, or load a local HF folder (transformers does the work).

A checkpoint is loaded as its training method needs it: QLoRA's base directly in 4 bits
(bitsandbytes through `from_pretrained(quantization_config=...)`, so the full-precision weights never
sit in memory together), a frozen base under bf16 training in bf16, everything else in fp32.
transformers initialises on the meta device and streams the safetensors in, so no random
initialisation is paid for before the weights arrive.
"""

from __future__ import annotations

from pathlib import Path

from lmsmith.errors import UserError
from lmsmith.tokenizer.chat import END_OF_TEXT
from lmsmith.train.config import TinyModelConfig


def special_token_id(tokenizer, token: str) -> int | None:
    """The id of `token` if the vocabulary holds it (a tokenizer from elsewhere may lack ours)."""
    return tokenizer.get_vocab().get(token)


def end_of_turn_ids(tokenizer) -> list[int]:
    """The special tokens the chat template puts right after an assistant's answer (<|im_end|>,
    <|eot_id|>, eos...): a model tuned on that template ends its answers with them."""
    if not getattr(tokenizer, "chat_template", None):
        return []
    marker = "\u2063answer\u2063"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "q"}, {"role": "assistant", "content": marker}], tokenize=False)
    except Exception:  # a template that needs other roles or fields: fall back to the eos alone
        return []
    after = text.split(marker, 1)[1] if marker in text else ""
    special = set(tokenizer.all_special_ids)
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    found = []
    for token in ids:
        if token not in special:
            break
        found.append(token)
    return found


def stop_token_ids(tokenizer, model=None, separator: bool = True) -> list[int]:
    """Ids that end generation: the eos, the chat template's end of turn, any the checkpoint's generation
    config already names, and (`separator`) the document separator a pretrained base emits."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    configured = [configured] if isinstance(configured, int) else list(configured or [])
    document_end = special_token_id(tokenizer, END_OF_TEXT) if separator else None
    for token in (*end_of_turn_ids(tokenizer), *configured, document_end):
        if token is not None and token not in ids:
            ids.append(token)
    return ids


def build_tiny_model(config: TinyModelConfig, tokenizer):
    """A randomly initialised `Qwen2ForCausalLM` sized for `tokenizer` (seed torch before calling)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    model_config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=config.tie_word_embeddings,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = Qwen2ForCausalLM(model_config)
    set_generation_tokens(model, tokenizer)
    return model


def set_generation_tokens(model, tokenizer) -> None:
    """Make `generate` stop at every stop token and pad with the tokenizer's pad id."""
    model.generation_config.eos_token_id = stop_token_ids(tokenizer, model)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None


def load_tokenizer(path: str | Path, source: str | None = None):
    """The tokenizer saved in an HF folder, exactly as saved.

    `tokenizer.json` is loaded as the generic fast tokenizer: `AutoTokenizer` would pick a class from the
    model's `config.json`, and `Qwen2Tokenizer` then replaces the saved pre-tokenizer with Qwen's own,
    changing the ids of a tokenizer trained here. A tokenizer without a pad token (Llama's) pads with
    its eos: labels come from masks, never from comparing ids with the pad id, so that is safe.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = Path(path)
    where = source or str(path)
    if not (path / "tokenizer_config.json").exists() and not (path / "tokenizer.json").exists():
        raise UserError(f"{where}: no tokenizer files in {path}")
    try:
        if (path / "tokenizer.json").is_file():
            tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
        else:
            tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as exc:
        raise UserError(f"{where}: cannot load the tokenizer in {path}: {exc}") from None
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise UserError(f"{where}: the tokenizer has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def read_pretrained(path: Path, where: str, **settings):
    """`AutoModelForCausalLM.from_pretrained`, with unreadable or truncated weights a one-line `UserError`."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(path, **settings)
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{where}: cannot load the model weights in {path}: {first_line}") from None


def stored_dtype(path: Path):
    """The dtype a checkpoint's weights are stored in (config.json), float32 when it does not say."""
    import json

    import torch

    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def finish_4bit_load(model) -> None:
    """After quantizing from the stored dtype: everything else in fp32, and no tensor left pointing
    into the memory-mapped checkpoint.

    The 4-bit codes of a bf16 or fp16 weight equal those of its exact fp32 upcast, so quantizing from
    the stored dtype saves a full-precision copy per tensor; its quant state is told to dequantize to
    fp32, which makes the weights bit-identical to quantizing the fp32 upcast. Embeddings and norms
    still point into the mapped file, and while the mapping is open every page that quantizing read
    stays in the resident set: copying them closes it.
    """
    import gc

    import bitsandbytes as bnb
    import torch

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                module.weight.quant_state.dtype = torch.float32
            for param in module.parameters(recurse=False):
                if param.dtype.is_floating_point:
                    param.data = param.data.to(torch.float32, copy=True)
            for name, buffer in list(module._buffers.items()):
                if buffer is not None and buffer.dtype.is_floating_point:
                    module._buffers[name] = buffer.to(torch.float32, copy=True)
    gc.collect()
    release_freed_heap()


def release_freed_heap() -> None:
    """Hand the full-precision copies that quantizing freed back to the OS (glibc keeps freed heap)."""
    import ctypes
    import ctypes.util

    libc = ctypes.util.find_library("c")
    try:
        ctypes.CDLL(libc).malloc_trim(0)
    except (OSError, AttributeError, TypeError):  # not glibc: nothing to trim
        pass


def load_dtype(method, precision: str = "fp32"):
    """The dtype a base is loaded in: bf16 for a frozen base under bf16 training (half the memory,
    and autocast computes in bf16 anyway), else fp32, which full and layer-freeze training update."""
    import torch

    frozen_base = method is not None and method.name not in ("full", "freeze")
    return torch.bfloat16 if frozen_base and precision == "bf16" else torch.float32


def load_causal_lm(path: str | Path, source: str | None = None, method=None, precision: str = "fp32"):
    """(model, tokenizer) from a local HF causal-LM folder, loaded as `method` trains it.

    QLoRA bases are quantized to 4 bits while loading; other methods get `load_dtype`. Truncated or
    unreadable weights are a `UserError` naming the folder.
    """
    path = Path(path)
    where = source or str(path)
    if not (path / "config.json").exists():
        raise UserError(f"{where}: not an HF model folder (no config.json in {path})")
    tokenizer = load_tokenizer(path, source)
    settings: dict = {"dtype": load_dtype(method, precision)}
    if method is not None and method.name == "qlora":
        from lmsmith.train.methods import bnb_config

        settings = {"dtype": stored_dtype(path), "quantization_config": bnb_config(method), "device_map": "cpu"}
    model = read_pretrained(path, where, **settings)
    if "quantization_config" in settings:
        finish_4bit_load(model)
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        raise UserError(
            f"{where}: the tokenizer has {len(tokenizer)} tokens but the model only "
            f"{model.get_input_embeddings().num_embeddings} embeddings"
        )
    set_generation_tokens(model, tokenizer)
    return model, tokenizer


def check_fits(length: int, model, field: str) -> None:
    """Refuse sequences longer than the model's position table (`field` names the setting)."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and length > limit:
        raise UserError(f"{field}: {length} exceeds the model's max_position_embeddings ({limit})")


def save_causal_lm(model, tokenizer, path: Path) -> None:
    """Weights (safetensors), config, generation config and tokenizer in one loadable folder."""
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
