"""Shared fixtures: a tiny Qwen2 model and a byte-level BPE tokenizer built locally (no hub)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Servers the tests start keep their key store here, never in the user's ~/.lmsmith.
os.environ["LMSMITH_STATE_DIR"] = __import__("tempfile").mkdtemp(prefix="lmsmith-state-")
# File hashes remembered by lmsmith.hash_cache go to a temporary file, never into the user's ~/.cache.
os.environ["LMSMITH_HASH_CACHE"] = os.path.join(
    __import__("tempfile").mkdtemp(prefix="lmsmith-hash-cache-"), "file-hashes.json")

from pathlib import Path

import pytest


SAMPLE_TEXTS = [
    "星辰科技2023年营业收入为12.5亿元,同比增长15.2%。",
    "归母净利润3.1亿元,毛利率为42.3%,经营活动现金流量净额为2.8亿元。",
    "The company reported revenue of 1.2 billion yuan in 2023, up 8.5% year over year.",
    "请计算2023年营业收入的同比增长率。",
    "华信银行2022年总资产为520亿元,资产负债率为61.2%。",
] * 20


def build_tiny_tokenizer(vocab_size: int = 600):
    """A byte-level BPE with ChatML special tokens, trained on a few finance sentences.

    It uses Qwen2's normalizer and pre-tokenizer, so `AutoTokenizer` (which builds a `Qwen2Tokenizer`
    for a qwen2 model folder) reproduces its ids exactly.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(SAMPLE_TEXTS, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        bos_token=None,
        unk_token=None,
        additional_special_tokens=["<|endoftext|>", "<|im_start|>"],
    )
    from lmsmith.tokenizer.chat import chatml_template

    fast.chat_template = chatml_template()
    return fast


def build_tiny_model(tokenizer, hidden_size: int = 64, layers: int = 2, seed: int = 0, max_positions: int = 512):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        initializer_range=0.2,  # varied greedy outputs, so tests can tell answers apart
    )
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def train_tiny_model(tokenizer, texts: list[str], seed: int, steps: int, lr: float = 3e-3):
    """A tiny model fitted to `texts` (full batch, AdamW), in eval mode."""
    import torch

    batch = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    model = build_tiny_model(tokenizer, seed=seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(steps):
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A saved HF folder: random tiny Qwen2 + tokenizer with chat template."""
    path = tmp_path_factory.mktemp("tiny_model")
    model = build_tiny_model(tiny_tokenizer)
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """A throwaway redis-server on a free port (no persistence), stopped after the session."""
    import shutil
    import socket
    import subprocess
    import time

    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed: run scripts/ensure_redis.sh")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    workdir = tmp_path_factory.mktemp("redis")
    process = subprocess.Popen(
        [binary, "--port", str(port), "--save", "", "--appendonly", "no", "--bind", "127.0.0.1", "--dir", str(workdir)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    pytest.fail("redis-server did not start")
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(timeout=10)


def fresh_minute(margin_s: float = 15.0) -> None:
    """Sleep into the next clock minute when fewer than `margin_s` seconds remain in this one, so a burst
    checked against per-minute limits (fixed windows) does not straddle two windows."""
    import time

    left = 60 - time.time() % 60
    if left < margin_s:
        time.sleep(left + 0.05)
