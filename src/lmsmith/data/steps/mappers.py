"""Mappers beyond the basic chain in `lmsmith.data.steps`: mojibake repair (ftfy), traditional → simplified
Chinese (zhconv, pure Python), width folding, whitespace, and a terminology map read from YAML.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import Field

from lmsmith.data.steps import Mapper, OpConfig, register
from lmsmith.errors import UserError
from lmsmith.paths import InputPath


class FixMojibakeConfig(OpConfig):
    uncurl_quotes: bool = Field(False, description="Also turn curly quotes into straight ones.")
    fix_latin_ligatures: bool = Field(True, description="Also spell out ligatures: ﬁ → fi.")


@register("fix_mojibake")
class FixMojibake(Mapper):
    """Repair text that was decoded with the wrong codec (`è\\x90¥ä¸\\x9aæ\\x94¶å\\x85¥` → `营业收入`,
    `companyâ€™s` → `company's`) with ftfy. Unicode normal forms and HTML entities are left to
    `unicode_normalize` and `strip_html`."""

    Config = FixMojibakeConfig
    example = ({}, "The companyâ€™s revenue: è\x90¥ä¸\x9aæ\x94¶å\x85¥")

    def __init__(self, config: FixMojibakeConfig):
        super().__init__(config)
        import ftfy

        self._fix = ftfy.fix_text
        self._config = ftfy.TextFixerConfig(
            unescape_html=False, normalization=None, fix_character_width=False, fix_line_breaks=False,
            uncurl_quotes=config.uncurl_quotes, fix_latin_ligatures=config.fix_latin_ligatures, explain=False,
        )

    def map(self, text: str) -> str:
        if text.isascii():
            return text
        return self._fix(text, self._config)


class ToSimplifiedConfig(OpConfig):
    variant: Literal["zh-hans", "zh-cn"] = Field(
        "zh-hans",
        description="zh-hans converts characters only; zh-cn also mainland wording (軟體 → 软件).",
    )


# CJK ideographs; a text without any has nothing to convert.
_HAN = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")


@register("to_simplified")
class ToSimplified(Mapper):
    """Traditional → simplified Chinese (`營業收入同比增長` → `营业收入同比增长`) with zhconv's
    conversion tables. Text in other scripts is not touched."""

    Config = ToSimplifiedConfig
    example = ({}, "營業收入同比增長12.5%，歸屬於母公司股東的淨利潤")

    def map(self, text: str) -> str:
        if not _HAN.search(text):
            return text
        import zhconv

        return zhconv.convert(text, self.config.variant)


class FullToHalfWidthConfig(OpConfig):
    ideographic_space: bool = Field(True, description="Also turn the ideographic space U+3000 into a space.")


_FULL_WIDTH = {code: code - 0xFEE0 for code in range(0xFF01, 0xFF5F)}


@register("full_to_half_width")
class FullToHalfWidth(Mapper):
    """Fold full-width ASCII (`ＡＢＣ１２３，（）`) to half width, and nothing else: unlike NFKC it keeps
    circled numbers, superscripts and compatibility ideographs as they are."""

    Config = FullToHalfWidthConfig
    example = ({}, "营收１２．３５亿元（ＹｏＹ＋５％）\u3000①")

    def __init__(self, config: FullToHalfWidthConfig):
        super().__init__(config)
        self._table = dict(_FULL_WIDTH)
        if config.ideographic_space:
            self._table[0x3000] = 0x20

    def map(self, text: str) -> str:
        return text.translate(self._table)


class NormalizeWhitespaceConfig(OpConfig):
    keep_newlines: bool = Field(True, description="Keep single line breaks (and one blank line); else join lines.")


_RUNS = re.compile(r"[^\S\n]+")
_EDGE_SPACE = re.compile(r" ?\n ?")
_MANY_NEWLINES = re.compile(r"\n{3,}")
_ZERO_WIDTH = re.compile("[\u200b-\u200d\u2060\ufeff]")


@register("normalize_whitespace")
class NormalizeWhitespace(Mapper):
    """Collapse whitespace: tabs, non-breaking and ideographic spaces become one space, zero-width
    characters go, line ends are trimmed and at most one blank line remains."""

    Config = NormalizeWhitespaceConfig
    example = ({}, "营业收入\t\t12亿元\u00a0\u00a0\n\n\n\n同比 增长\u200b")

    def map(self, text: str) -> str:
        text = _ZERO_WIDTH.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))
        if not self.config.keep_newlines:
            return " ".join(text.split())
        text = _RUNS.sub(" ", text)
        text = _EDGE_SPACE.sub("\n", text)
        return _MANY_NEWLINES.sub("\n\n", text).strip()


DEFAULT_TERMS = "finance_terms.yaml"


class TerminologyConfig(OpConfig):
    dictionary: Optional[InputPath] = Field(
        None, description="A YAML file mapping variant → canonical term (used with the default unless use_default is false)."
    )
    use_default: bool = Field(True, description="Start from the finance dictionary shipped in lmsmith/data/resources.")
    extra: dict[str, str] = Field(default_factory=dict, description="More variant → term pairs, applied last.")


def load_terms(path: Optional[str | Path] = None) -> dict[str, str]:
    """A terminology YAML (variant: term) → dict; the shipped default when `path` is None."""
    if path is None:
        text = resources.files("lmsmith.data").joinpath("resources", DEFAULT_TERMS).read_text(encoding="utf-8")
        where = f"lmsmith/data/resources/{DEFAULT_TERMS}"
    else:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise UserError(f"{path}: cannot read the terminology dictionary: {exc.strerror}") from None
        where = str(path)
    try:
        data: Any = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        line = exc.problem_mark.line + 1 if getattr(exc, "problem_mark", None) else 1
        raise UserError(f"{where}:{line}: invalid YAML") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        raise UserError(f"{where}: expected a mapping of variant: term strings")
    return data


@register("terminology")
class Terminology(Mapper):
    """Replace term variants by one canonical term from a YAML dictionary (the shipped finance list
    maps `归母净利润` → `净利润`, `同比增减` → `同比增长率`, `营收` → `营业收入`). The longest variant wins
    where several overlap."""

    Config = TerminologyConfig
    example = ({}, "归母净利润同比增减12.5%，营收创新高")

    def __init__(self, config: TerminologyConfig):
        super().__init__(config)
        terms: dict[str, str] = load_terms() if config.use_default else {}
        if config.dictionary:
            terms.update(load_terms(config.dictionary))
        terms.update(config.extra)
        self.terms = {variant: term for variant, term in terms.items() if variant and variant != term}
        ordered = sorted(self.terms, key=len, reverse=True)
        self._pattern = re.compile("|".join(re.escape(v) for v in ordered)) if ordered else None

    def map(self, text: str) -> str:
        if self._pattern is None:
            return text
        def replace(match: re.Match) -> str:
            term = self.terms[match.group(0)]
            # `净利` → `净利润` must not turn an existing `净利润` into `净利润润`.
            return match.group(0) if text.startswith(term, match.start()) else term

        return self._pattern.sub(replace, text)
