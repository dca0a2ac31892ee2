"""Qwen's real 151,646-token vocabulary for benchmarks, without a model hub.

The `dashscope` wheel on PyPI ships Qwen's `qwen.tiktoken` (byte-level BPE ranks); transformers'
`TikTokenConverter` turns the ranks into a fast tokenizer (merges and Qwen2's pre-tokenizer pattern),
with Qwen's three special tokens at their ids. Built once into `~/.cache/lmsmith-bench/qwen-tokenizer`.
tiktoken must be importable (`pip install tiktoken`, a langchain-openai dependency in the dev extra).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

CACHE = Path.home() / ".cache" / "lmsmith-bench" / "qwen-tokenizer"
DASHSCOPE = "dashscope==2.0.2"
QWEN2_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                 r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def qwen_tokenizer():
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if not (CACHE / "tokenizer.json").exists():
        from transformers.convert_slow_tokenizer import TikTokenConverter

        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", DASHSCOPE, "-d", tmp],
                           check=True)
            wheel = next(Path(tmp).glob("dashscope-*.whl"))
            with zipfile.ZipFile(wheel) as archive:
                ranks = Path(tmp) / "qwen.tiktoken"
                ranks.write_bytes(archive.read("dashscope/resources/qwen.tiktoken"))
            converted = TikTokenConverter(vocab_file=str(ranks), pattern=QWEN2_PATTERN,
                                          extra_special_tokens=SPECIALS).converted()
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=converted, eos_token="<|im_end|>",
                                            pad_token="<|endoftext|>")
        tokenizer.save_pretrained(CACHE)
    return AutoTokenizer.from_pretrained(CACHE)


if __name__ == "__main__":
    print(qwen_tokenizer())
