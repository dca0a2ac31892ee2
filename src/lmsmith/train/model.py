"""Build a tiny Qwen2 causal LM from scratch, or load a local HF folder (transformers does the work)."""

from __future__ import annotations

from pathlib import Path

from lmsmith.errors import UserError
from lmsmith.tokenizer.chat import END_OF_TEXT, ensure_chat_template
from lmsmith.train.config import TinyModelConfig


def special_token_id(tokenizer, token: str) -> int | None:
    """The id of `token` if the vocabulary holds it (a tokenizer from elsewhere may lack ours)."""
    return tokenizer.get_vocab().get(token)


def stop_token_ids(tokenizer) -> list[int]:
    """Ids that end generation: the chat eos, and the document separator a pretrained base emits."""
    ids = [tokenizer.eos_token_id]
    separator = special_token_id(tokenizer, END_OF_TEXT)
    if separator is not None and separator not in ids:
        ids.append(separator)
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
    model.generation_config.eos_token_id = stop_token_ids(tokenizer)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None


def load_tokenizer(path: str | Path, source: str | None = None):
    """The tokenizer saved in an HF folder, with a chat template fit for answer-only loss."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not (path / "tokenizer_config.json").exists() and not (path / "tokenizer.json").exists():
        raise UserError(f"{source or path}: no tokenizer files in {path}")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        raise UserError(f"{source or path}: the tokenizer has no pad token")
    ensure_chat_template(tokenizer, source or str(path))
    return tokenizer


def load_causal_lm(path: str | Path, source: str | None = None):
    """(model, tokenizer) from a local HF causal-LM folder, float32, ready for CPU training."""
    import torch
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").exists():
        raise UserError(f"{source or path}: not an HF model folder (no config.json in {path})")
    tokenizer = load_tokenizer(path, source)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        raise UserError(
            f"{source or path}: the tokenizer has {len(tokenizer)} tokens but the model only "
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
