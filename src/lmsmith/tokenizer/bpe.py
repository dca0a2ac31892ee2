"""Train byte-level BPE, WordPiece and character tokenizers with HF `tokenizers`, wrapped as transformers
tokenizers carrying the ChatML special tokens and chat template.

Byte-level BPE uses exactly Qwen2's normalizer (NFC) and pre-tokenizer (its split regex, then byte-level
mapping without a second regex). transformers 5 builds a `Qwen2Tokenizer` for every qwen2 model folder
and puts those two components back in place of whatever was saved, so any other choice would make
`AutoTokenizer.from_pretrained(model_dir)` (and vLLM) produce different ids than training used. Qwen's
regex already splits numbers into single digits, so numbers are spelled consistently.

WordPiece and char keep their own normalizer and pre-tokenizer, which only a non-qwen2 folder preserves
(a llama-architecture model, or `PreTrainedTokenizerFast.from_pretrained`); see docs/training.md.
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable

from lmsmith.tokenizer.chat import END_OF_TEXT, IM_END, IM_START, PAD, SPECIAL_TOKENS, chatml_template

UNK = "[UNK]"  # WordPiece and char only: byte-level BPE can spell anything


def _wrap(backend, unk_token: str | None):
    """The transformers tokenizer around `backend`: ChatML eos, a pad distinct from it, chat template."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=IM_END,
        pad_token=PAD,
        bos_token=None,
        unk_token=unk_token,
        additional_special_tokens=[END_OF_TEXT, IM_START],
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = chatml_template()
    return tokenizer


def qwen2_pre_tokenization():
    """(normalizer, pre-tokenizer) exactly as transformers' `Qwen2Tokenizer` builds them."""
    from tokenizers import Regex, normalizers, pre_tokenizers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    return normalizers.NFC(), pre_tokenizer


def train_byte_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2):
    """A byte-level BPE over `texts` that `AutoTokenizer` on a qwen2 model folder reproduces exactly."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

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
    return _wrap(backend, unk_token=None)


def train_wordpiece(texts: Iterable[str], vocab_size: int, min_frequency: int = 2):
    """BERT-style WordPiece: every CJK character and digit is its own word, Latin words split into
    `##` pieces. Whitespace is not kept, so decoding is not lossless."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    backend = Tokenizer(models.WordPiece(unk_token=UNK))
    backend.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=False, lowercase=False
    )
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.BertPreTokenizer(), pre_tokenizers.Digits(individual_digits=True)]
    )
    backend.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[*SPECIAL_TOKENS, UNK],
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return _wrap(backend, unk_token=UNK)


def train_char(texts: Iterable[str], vocab_size: int, min_frequency: int = 2):
    """One token per character: the `vocab_size` most frequent characters seen at least `min_frequency`
    times; rarer characters become `[UNK]`. Lossless for every kept character, whitespace included."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    counts = Counter(character for text in texts for character in text)
    specials = [*SPECIAL_TOKENS, UNK]
    room = max(0, vocab_size - len(specials))
    kept = [c for c, n in sorted(counts.items(), key=lambda item: (-item[1], item[0])) if n >= min_frequency][:room]
    vocab = {token: index for index, token in enumerate([*specials, *sorted(kept)])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()  # characters join without separators
    backend.add_special_tokens(specials)
    return _wrap(backend, unk_token=UNK)


TRAINERS = {"byte_bpe": train_byte_bpe, "wordpiece": train_wordpiece, "char": train_char}


def train_tokenizer(kind: str, texts: list[str], vocab_size: int, min_frequency: int = 2):
    return TRAINERS[kind](texts, vocab_size=vocab_size, min_frequency=min_frequency)
