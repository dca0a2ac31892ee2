"""Random-init benchmark models (nothing is downloaded): the presets the serving and engine benchmarks share.

`build_model(folder, preset)` writes a random Qwen2 and a byte-level BPE tokenizer with a ChatML template,
trained here on finance words; only torch, tokenizers and transformers are needed (the device image has them).
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    # The 108M model of the stack notes: hidden 1024, 8 layers; the MLP width brings it to ~108M parameters.
    # Requests of 128 prompt + 256 new tokens, as in the stack notes' transformers CB measurements.
    "cpu": dict(hidden=1024, layers=8, heads=16, kv_heads=8, target_params=108e6, device="cpu", dtype="float32",
                num_requests=32, concurrency=8, request_rate=math.inf, prompt_tokens=128, max_tokens=256,
                hf_requests=8),
    # Qwen2-0.5B's architecture (hidden 896, 24 layers, 14 heads / 2 KV heads, MLP 4864, its 151,936-row
    # tied embedding: the head is a quarter of the weights), bf16.
    "gpu": dict(hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, vocab=151936, tied=True,
                device="cuda", dtype="bfloat16",
                num_requests=1024, concurrency=256, request_rate=math.inf, prompt_tokens=128, max_tokens=256),
}
WORDS = ["营业收入", "同比增长", "归母净利润", "毛利率", "经营活动现金流量净额", "资产负债率", "研发投入", "公司",
         "报告期内", "主营业务", "星辰科技", "华信银行", "天宇储能", "revenue", "margin", "growth", "quarter",
         "cash", "flow", "assets", "the", "company", "reported", "billion", "yuan", "2023", "12.5%", "。", ","]
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def sample_text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def build_model(folder: Path, preset: dict[str, Any], seed: int = 0) -> int:
    """A random Qwen2 and a ChatML BPE tokenizer in `folder`; returns the parameter count."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    rng = random.Random(seed)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=4096, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((sample_text(rng, 40) for _ in range(4000)), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        additional_special_tokens=["<|im_start|>"])
    tokenizer.chat_template = CHATML
    # The GPU preset keeps the real vocabulary size: ids past the tokenizer's decode to nothing, usage still counts them.
    vocab = max(len(tokenizer), preset.get("vocab", 0))
    hidden, layers = preset["hidden"], preset["layers"]
    intermediate = preset.get("intermediate") or _mlp_width_for(preset, vocab)
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=preset["heads"],
                         num_key_value_heads=preset["kv_heads"], max_position_embeddings=2048,
                         tie_word_embeddings=preset.get("tied", False), eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def _mlp_width_for(preset: dict[str, Any], vocab: int) -> int:
    """The MLP width (a multiple of 128) that brings the model nearest `target_params`."""
    hidden, layers = preset["hidden"], preset["layers"]
    head_dim = hidden // preset["heads"]
    attention = 2 * hidden * hidden + 2 * hidden * preset["kv_heads"] * head_dim
    per_layer_target = (preset["target_params"] - 2 * vocab * hidden) / layers - attention
    return max(128, round(per_layer_target / (3 * hidden) / 128) * 128)
