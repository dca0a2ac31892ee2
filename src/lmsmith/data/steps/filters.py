"""Filters beyond `min_length`: length in characters or tokens, language (an offline script-ratio
heuristic for zh/en), special-character ratio, character and word n-gram repetition, a word blacklist,
regex keep/drop, and perplexity under a local causal LM (transformers, loaded lazily, optional).

Each `reject` returns a short detail naming the measured value and the limit, or None to keep.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import Field, field_validator, model_validator

from lmsmith.data.steps import Filter, OpConfig, register
from lmsmith.errors import UserError
from lmsmith.paths import InputPath

# A CJK ideograph, kana or hangul counts as one token; a run of Latin letters/digits as one word.
_TOKEN = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af\uf900-\ufaff]|[^\W_]+")
_WORD = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]|[^\W\d_]+|\d+(?:\.\d+)?")


def count_tokens(text: str) -> int:
    """Tokenizer-free token count: CJK characters one each, other words one each."""
    return len(_TOKEN.findall(text))


class LengthConfig(OpConfig):
    unit: Literal["chars", "tokens"] = Field("chars", description="chars: non-space characters; tokens: see `tokenizer`.")
    min: int = Field(1, ge=0, description="Drop texts shorter than this.")
    max: Optional[int] = Field(None, ge=1, description="Drop texts longer than this (no limit when unset).")
    tokenizer: Optional[InputPath] = Field(
        None,
        description="An HF tokenizer folder or tokenizer.json to count tokens with; unset: CJK characters "
        "and words count one each.",
    )

    @model_validator(mode="after")
    def _ordered(self) -> "LengthConfig":
        if self.max is not None and self.max < self.min:
            raise ValueError(f"max ({self.max}) is below min ({self.min})")
        return self


@register("length")
class Length(Filter):
    """Keep texts whose length (non-space characters, or tokens) lies in [min, max]."""

    Config = LengthConfig
    example = ({"unit": "tokens", "min": 8}, "营收增长5%。")

    def __init__(self, config: LengthConfig):
        super().__init__(config)
        self._tokenizer = None
        if config.unit == "tokens" and config.tokenizer:
            from tokenizers import Tokenizer

            path = Path(config.tokenizer)
            file = path / "tokenizer.json" if path.is_dir() else path
            if not file.exists():
                raise UserError(f"length.tokenizer: {file} not found")
            self._tokenizer = Tokenizer.from_file(str(file))

    def measure(self, text: str) -> int:
        if self.config.unit == "chars":
            return len(text) - sum(1 for c in text if c.isspace())
        if self._tokenizer is not None:
            return len(self._tokenizer.encode(text, add_special_tokens=False).ids)
        return count_tokens(text)

    def reject(self, text: str) -> Optional[str]:
        size, unit = self.measure(text), self.config.unit
        if size < self.config.min:
            return f"{size} {unit} < {self.config.min}"
        if self.config.max is not None and size > self.config.max:
            return f"{size} {unit} > {self.config.max}"
        return None


_HAN_CHAR = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")
_KANA = re.compile(r"[\u3040-\u30ff]")
_HANGUL = re.compile(r"[\uac00-\ud7af]")
_LATIN = re.compile(r"[A-Za-z\u00c0-\u024f]")
_ENGLISH_WORDS = frozenset(
    "the of and to in is was for that on with as by at from are were it its this be has have had an or "
    "which year revenue net profit company".split()
)


def guess_language(text: str) -> tuple[str, float]:
    """(language, confidence) among zh, en, ja, ko and other, from the share of each script's letters
    and, for Latin script, of common English words. Offline and dependency-free."""
    han = len(_HAN_CHAR.findall(text))
    kana = len(_KANA.findall(text))
    hangul = len(_HANGUL.findall(text))
    latin = len(_LATIN.findall(text))
    letters = sum(1 for c in text if c.isalpha())
    if not letters:
        return "other", 0.0
    if kana and kana + han >= 0.5 * letters and kana >= 0.1 * (kana + han):
        return "ja", (kana + han) / letters
    if hangul >= 0.5 * letters:
        return "ko", hangul / letters
    # Chinese financial text mixes in Latin tickers and units, so Han characters weigh double.
    if han and 2 * han >= latin and han + latin >= 0.6 * letters:
        return "zh", min(1.0, 2 * han / (2 * han + latin))
    if latin >= 0.6 * letters:
        words = re.findall(r"[A-Za-z]+", text.lower())
        english = sum(1 for w in words if w in _ENGLISH_WORDS) / max(1, len(words))
        if english >= 0.08 or len(words) < 4:
            return "en", latin / letters
    return "other", 1 - (han + latin) / letters


class LanguageConfig(OpConfig):
    languages: list[str] = Field(default_factory=lambda: ["zh", "en"], description="Languages to keep (zh, en, ja, ko).")
    min_confidence: float = Field(0.5, ge=0, le=1, description="Drop when the guess is less sure than this.")


@register("language")
class Language(Filter):
    """Keep texts in the listed languages, identified offline from the share of Han, kana, hangul and
    Latin letters and of common English words (`lmsmith.data.steps.filters.guess_language`)."""

    Config = LanguageConfig
    example = ({}, "Выручка компании выросла на 12 процентов.")

    def reject(self, text: str) -> Optional[str]:
        language, confidence = guess_language(text)
        if language not in self.config.languages:
            return f"language {language} not in {self.config.languages}"
        if confidence < self.config.min_confidence:
            return f"language {language} confidence {confidence:.2f} < {self.config.min_confidence}"
        return None


class SpecialCharactersConfig(OpConfig):
    max_ratio: float = Field(0.25, ge=0, le=1, description="Drop when more than this share of non-space characters are special.")


# Punctuation that ordinary prose (and numbers) use; anything else non-alphanumeric counts as special.
_ORDINARY = frozenset(".,;:!?%()-'\"/，。；：！？、（）《》“”‘’—…·")


@register("special_characters")
class SpecialCharacters(Filter):
    """Drop texts dominated by symbols, emoji, box drawing or markup debris: the share of non-space
    characters that are neither letters, digits nor ordinary punctuation."""

    Config = SpecialCharactersConfig
    example = ({}, "★★★【】###@@@ 营收 ###$$$***")

    def reject(self, text: str) -> Optional[str]:
        visible = [c for c in text if not c.isspace()]
        if not visible:
            return None
        special = sum(1 for c in visible if not c.isalnum() and c not in _ORDINARY)
        ratio = special / len(visible)
        return f"special-character ratio {ratio:.2f} > {self.config.max_ratio}" if ratio > self.config.max_ratio else None


def repetition_ratio(units: list[str], n: int) -> float:
    """Share of n-gram occurrences that belong to an n-gram seen more than once."""
    if len(units) < n:
        return 0.0
    grams = Counter(tuple(units[i:i + n]) if n > 1 else units[i] for i in range(len(units) - n + 1))
    total = sum(grams.values())
    return sum(count for count in grams.values() if count > 1) / total


class CharRepetitionConfig(OpConfig):
    n: int = Field(10, ge=1, description="Character n-gram size.")
    max_ratio: float = Field(0.5, ge=0, le=1, description="Drop above this repeated-n-gram share.")


@register("char_repetition")
class CharRepetition(Filter):
    """Drop texts whose character n-grams repeat too much (copy-paste loops, tables of the same row)."""

    Config = CharRepetitionConfig
    example = ({}, "公司业绩良好。" * 6)

    def reject(self, text: str) -> Optional[str]:
        ratio = repetition_ratio(list(text), self.config.n)
        return f"char {self.config.n}-gram repetition {ratio:.2f} > {self.config.max_ratio}" if ratio > self.config.max_ratio else None


class WordRepetitionConfig(OpConfig):
    n: int = Field(3, ge=1, description="Word n-gram size (a CJK character counts as a word).")
    max_ratio: float = Field(0.5, ge=0, le=1, description="Drop above this repeated-n-gram share.")


@register("word_repetition")
class WordRepetition(Filter):
    """Drop texts whose word n-grams repeat too much (`buy now buy now buy now`); CJK characters count
    as words, so it works on Chinese too."""

    Config = WordRepetitionConfig
    example = ({}, "click here to buy now click here to buy now click here to buy now")

    def reject(self, text: str) -> Optional[str]:
        ratio = repetition_ratio(_WORD.findall(text.lower()), self.config.n)
        return f"word {self.config.n}-gram repetition {ratio:.2f} > {self.config.max_ratio}" if ratio > self.config.max_ratio else None


class BlacklistConfig(OpConfig):
    words: list[str] = Field(default_factory=list, description="Words or phrases (case-insensitive).")
    file: Optional[InputPath] = Field(None, description="A text file with one more word per line.")
    min_hits: int = Field(1, ge=1, description="Drop when at least this many occurrences are found.")


@register("blacklist")
class Blacklist(Filter):
    """Drop texts containing blacklisted words or phrases (spam, gambling, adult terms)."""

    Config = BlacklistConfig
    example = ({"words": ["代开发票", "博彩"]}, "专业代开发票，联系微信。")

    def __init__(self, config: BlacklistConfig):
        super().__init__(config)
        words = list(config.words)
        if config.file:
            try:
                words += Path(config.file).read_text(encoding="utf-8").splitlines()
            except OSError as exc:
                raise UserError(f"blacklist.file: {config.file}: {exc.strerror}") from None
        words = sorted({w.strip().lower() for w in words if w.strip()}, key=len, reverse=True)
        self._pattern = re.compile("|".join(re.escape(w) for w in words), re.IGNORECASE) if words else None

    def reject(self, text: str) -> Optional[str]:
        if self._pattern is None:
            return None
        hits = self._pattern.findall(text)
        if len(hits) >= self.config.min_hits:
            return f"blacklisted: {', '.join(sorted(set(h.lower() for h in hits)))}"
        return None


class RegexFilterConfig(OpConfig):
    pattern: str = Field(..., description="A Python regular expression, searched anywhere in the text.")
    action: Literal["keep", "drop"] = Field("drop", description="drop: drop matching texts; keep: keep only matching ones.")
    ignore_case: bool = Field(False, description="Match case-insensitively.")

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, pattern: str) -> str:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"invalid regular expression: {exc}") from None
        return pattern


@register("regex_filter")
class RegexFilter(Filter):
    """Keep or drop texts by a regular expression (e.g. drop `^\\s*目录` tables of contents, keep only
    texts mentioning `营业收入`)."""

    Config = RegexFilterConfig
    example = ({"pattern": "^目录", "action": "drop"}, "目录\n第一节 重要提示……1")

    def __init__(self, config: RegexFilterConfig):
        super().__init__(config)
        self._regex = re.compile(config.pattern, re.IGNORECASE if config.ignore_case else 0)

    def reject(self, text: str) -> Optional[str]:
        matched = self._regex.search(text) is not None
        if self.config.action == "drop" and matched:
            return f"matches /{self.config.pattern}/"
        if self.config.action == "keep" and not matched:
            return f"does not match /{self.config.pattern}/"
        return None


class PerplexityConfig(OpConfig):
    model: InputPath = Field(..., description="A local HF causal-LM folder (loaded once per worker, on CPU).")
    max_perplexity: Optional[float] = Field(
        None, gt=0, description="Drop texts the model finds more surprising than this; or set `quantile`.")
    quantile: Optional[float] = Field(
        None, gt=0, lt=1,
        description="Fit `max_perplexity` before the stream runs: this quantile of the perplexities of the fit "
        "sample's texts the rules keep (0.95 drops what is more surprising than 95% of them).",
    )
    max_tokens: int = Field(512, ge=8, description="Score only the first this many tokens.")

    @model_validator(mode="after")
    def _one_limit(self) -> "PerplexityConfig":
        if (self.max_perplexity is None) == (self.quantile is None):
            raise ValueError("set exactly one of max_perplexity (a fixed limit) or quantile (a limit fitted on "
                             f"the first records), got max_perplexity={self.max_perplexity}, quantile={self.quantile}")
        return self


@register("perplexity")
class Perplexity(Filter):
    """Drop texts whose perplexity under a given local language model exceeds a limit (garbled or
    off-domain text): a fixed `max_perplexity`, or a `quantile` fitted on the first records (a fitted
    step, see above). Needs torch and transformers; the model loads on first use."""

    Config = PerplexityConfig
    fits = True

    def __init__(self, config: PerplexityConfig):
        super().__init__(config)
        if not Path(config.model).is_dir():
            raise UserError(f"perplexity.model: {config.model} is not a model folder")
        self._loaded = None

    def _load(self):
        if self._loaded is None:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(self.config.model)
            model = AutoModelForCausalLM.from_pretrained(self.config.model).eval()
            self._loaded = (tokenizer, model)
        return self._loaded

    def perplexity(self, text: str) -> float:
        import torch

        tokenizer, model = self._load()
        ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=self.config.max_tokens)["input_ids"]
        if ids.shape[1] < 2:
            return float("inf")
        with torch.no_grad():
            loss = model(input_ids=ids, labels=ids).loss
        return math.exp(min(float(loss), 50.0))

    def needs_fit(self) -> bool:
        return self.config.max_perplexity is None

    def fit(self, texts: list[str], rule_noisy: list[bool], fit_dir: Path) -> dict[str, Any]:
        import numpy as np

        kept = [text for text, noisy in zip(texts, rule_noisy) if not noisy] or texts
        values = [value for value in map(self.perplexity, kept) if math.isfinite(value)]
        if not values:
            raise UserError("perplexity.quantile: no text of the fit sample could be scored (too short?)")
        limit = float(np.quantile(np.array(values), self.config.quantile))
        return {"max_perplexity": float(f"{limit:.6g}"), "quantile": None}

    def reject(self, text: str) -> Optional[str]:
        if self.config.max_perplexity is None:
            raise UserError("perplexity: max_perplexity is not fitted yet (a quantile is fitted by the data "
                            "pipeline before the stream runs)")
        value = self.perplexity(text)
        return f"perplexity {value:.1f} > {self.config.max_perplexity}" if value > self.config.max_perplexity else None
