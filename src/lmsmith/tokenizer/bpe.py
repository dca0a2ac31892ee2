"""Train a byte-level BPE tokenizer with HF `tokenizers` and wrap it as a transformers tokenizer.

Byte-level means every string (Chinese included) is representable without an unknown token. The text is
NFC-normalised and pre-split with Qwen2's pattern, which also puts every digit in a token of its own, so
numbers are always spelled the same way and a small model can copy them digit by digit. Matching Qwen2
matters beyond taste: transformers loads the tokenizer of a qwen2 model folder as `Qwen2Tokenizer`, which
imposes exactly this normaliser and pre-tokenizer, so any other choice would change the ids between the
tokenizer stage and the saved models.
"""

from __future__ import annotations

from typing import Iterable

from lmsmith.tokenizer.chat import END_OF_TEXT, IM_END, IM_START, PAD, SPECIAL_TOKENS, chatml_template


def qwen2_pre_tokenization():
    """(normalizer, pre-tokenizer) identical to the ones `Qwen2Tokenizer` installs."""
    from tokenizers import Regex, normalizers, pre_tokenizers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    return normalizers.NFC(), pre_tokenizer


def train_byte_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2):
    """A `PreTrainedTokenizerFast` with ChatML special tokens and chat template, trained on `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.normalizer, backend.pre_tokenizer = qwen2_pre_tokenization()
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=IM_END,
        pad_token=PAD,
        bos_token=None,
        unk_token=None,
        additional_special_tokens=[END_OF_TEXT, IM_START],
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = chatml_template()
    return tokenizer


def fertility(tokenizer, texts: list[str]) -> float | None:
    """Tokens per character over `texts` (lower means the vocabulary fits the domain better)."""
    characters = sum(len(text) for text in texts)
    if characters == 0:
        return None
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return sum(len(ids) for ids in encoded) / characters
