"""Cleaning operators: small classes that each rewrite (mapper) or judge (filter) one text.

A recipe lists them in order as `data.ops: [{op: NAME, ...params}]`. Each operator has a pydantic config
(its params; unknown or bad ones are rejected when the recipe is validated), a docstring and a name in
`REGISTRY`. The work is done by the standard library: `unicodedata`, `html`, `re`, and `decimal` (through
`lmsmith.data.steps.numbers`).

To add one:

    class LowercaseConfig(OpConfig):
        pass

    @register("lowercase")
    class Lowercase(Mapper):
        '''Lowercase everything.'''
        Config = LowercaseConfig

        def map(self, text: str) -> str:
            return text.lower()

Order matters: the default chain strips HTML before normalising unicode (entities turn into odd spaces),
and masks phone numbers before rewriting amounts (`138.12亿` becomes an 11-digit number).
"""

from __future__ import annotations

import html
import re
import unicodedata
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal, Optional

from pydantic import Field, ValidationError, ValidationInfo

from lmsmith.data.steps.numbers import OutputForm, PercentForm, find_approximate_amounts, normalize_amounts
from lmsmith.data.steps.pii import mask_bank_cards, mask_id_numbers
from lmsmith.schema import StrictModel

Target = Literal["corpus", "instructions", "both"]


class OpConfig(StrictModel):
    """Settings every operator has."""

    apply_to: Target = Field("both", description="Run on corpus texts, instruction messages, or both.")


class Op(ABC):
    """Base of all operators. `resolves` names the embedded noise labels this operator repairs."""

    name: ClassVar[str]
    Config: ClassVar[type[OpConfig]] = OpConfig
    resolves: ClassVar[tuple[str, ...]] = ()
    # (params, input text) shown in the operator catalog (docs/data.md) with the live output.
    example: ClassVar[tuple[dict[str, Any], str]] = ({}, "")

    def __init__(self, config: OpConfig):
        self.config = config

    def applies_to(self, kind: Literal["corpus", "instructions"]) -> bool:
        return self.config.apply_to in ("both", kind)

    def tags(self, text: str) -> list[str]:
        """What this operator saw but left as it is (one entry per occurrence), counted per step in the
        stats: e.g. an approximate amount (`500多亿`) that `normalize_numbers` keeps as written."""
        return []

    # A fitted operator learns part of its spec from the data before the stream runs (`lmsmith.data.engine`
    # fits it on the first `fit_sample` records): `fit` returns the spec fields to set, numbers or the path
    # of a file it wrote into `fit_dir`, so the workers rebuild the fitted operator from its spec alone.
    fits: ClassVar[bool] = False

    def needs_fit(self) -> bool:
        """Whether this spec still lacks what `fit` sets (False once fitted or given by hand)."""
        return False

    def fit(self, texts: list[str], rule_noisy: list[bool], fit_dir: Path) -> dict[str, Any]:
        """The spec fields to set, learnt from `texts` (each as it reaches this operator, or as it was
        when a rule dropped it) and `rule_noisy` (the rule chain, every operator that is not fitted,
        drops or empties it)."""
        raise TypeError(f"{self.name} is not a fitted operator (fits is False): the pipeline never fits it")


class Mapper(Op):
    """Rewrites a text."""

    @abstractmethod
    def map(self, text: str) -> str:
        """The rewritten text (the same string when there is nothing to change)."""


class Filter(Op):
    """Keeps or drops a whole record."""

    @abstractmethod
    def reject(self, text: str) -> Optional[str]:
        """Why the record is dropped (a short detail), or None to keep it."""


REGISTRY: dict[str, type[Op]] = {}


def register(name: str):
    """Class decorator: make an operator usable as `{op: name}` in a recipe."""

    def decorate(cls: type[Op]) -> type[Op]:
        if name in REGISTRY:
            raise ValueError(f"operator {name!r} is already registered")
        cls.name = name
        REGISTRY[name] = cls
        return cls

    return decorate


# --------------------------------------------------------------------------------------------- mappers


class UnicodeNormalizeConfig(OpConfig):
    form: Literal["NFKC", "NFC"] = Field(
        "NFKC", description="NFKC also folds full-width letters, digits and punctuation to half width."
    )
    collapse_whitespace: bool = Field(True, description="Collapse runs of spaces; keep single line breaks.")


_INVISIBLE = re.compile("[\u200b-\u200d\u2060\ufeff\u00ad]")
_SPACES = re.compile(r"[^\S\n]+")
_SPACE_AROUND_NEWLINE = re.compile(r" ?\n ?")
_BLANK_LINES = re.compile(r"\n{3,}")


@register("unicode_normalize")
class UnicodeNormalize(Mapper):
    """Unicode normal form (NFKC: full width → half width, `１２．５` → `12.5`, `，` → `,`), invisible
    characters removed, whitespace runs collapsed to one space, at most one blank line in a row."""

    Config = UnicodeNormalizeConfig
    example = ({}, "营收１２．３５亿元，\u3000同比增长（预计）")

    def map(self, text: str) -> str:
        # The check is ~100× cheaper than normalising, and most text already is normal.
        if not unicodedata.is_normalized(self.config.form, text):
            text = unicodedata.normalize(self.config.form, text)
        text = _INVISIBLE.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))
        if self.config.collapse_whitespace:
            text = _SPACES.sub(" ", text)
            if "\n" in text:
                text = _SPACE_AROUND_NEWLINE.sub("\n", text)
                text = _BLANK_LINES.sub("\n\n", text)
            text = text.strip()
        return text


class StripHtmlConfig(OpConfig):
    pass


_SCRIPT_OR_STYLE = re.compile(r"<(script|style)\b[^>]*>.*?</\1\s*>", re.IGNORECASE | re.DOTALL)
_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
_LINE_BREAK_TAG = re.compile(r"<\s*(?:br|/p|/div|/li|/h[1-6]|/tr)\b[^>]*>\n?", re.IGNORECASE)
# A tag starts with a letter (or `/letter`), so `3 < 5` and `<10亿` are not tags.
_TAG = re.compile(r"</?[A-Za-z][^<>]*>")
_ENTITY = re.compile(r"&(?:#\d+|#x[0-9a-fA-F]+|[A-Za-z]+);")


@register("strip_html")
class StripHtml(Mapper):
    """Remove HTML remnants: tags (block tags become line breaks), comments, scripts and styles, and
    decode entities (`&nbsp;` → space, `&amp;` → `&`)."""

    Config = StripHtmlConfig
    resolves = ("html",)
    example = ({}, '<div class="note"><p>营业收入&nbsp;12.35亿元</p><script>track()</script></div>')

    def map(self, text: str) -> str:
        if "<" not in text and "&" not in text:
            return text
        stripped = _SCRIPT_OR_STYLE.sub("", text)
        stripped = _COMMENT.sub("", stripped)
        stripped = _LINE_BREAK_TAG.sub("\n", stripped)
        stripped = _TAG.sub("", stripped)
        if _ENTITY.search(stripped):
            stripped = html.unescape(stripped).replace("\u00a0", " ")
        return stripped.strip() if stripped != text else text


class NormalizeNumbersConfig(OpConfig):
    chinese_units: bool = Field(True, description="Rewrite 万/亿 amounts: 1.2亿 → 120000000.")
    english_units: bool = Field(True, description="Rewrite million/billion amounts: 1.2 billion → 1200000000.")
    thousands_separators: bool = Field(True, description="Drop thousands separators: 1,200 → 1200.")
    negative_parentheses: bool = Field(True, description="Accounting negatives: (1,234) → -1234.")
    percent_words: bool = Field(True, description="15 percent / 15 pct / 15 % → 15%.")
    percent: PercentForm = Field("keep", description="keep: 15.2% stays; fraction: 15.2% → 0.152.")
    output: OutputForm = Field(
        "plain", description="Form of a rewritten amount: plain 120000000, thousands 120,000,000, yi 1.2亿, wan 12000万."
    )
    decimals: Optional[int] = Field(None, ge=0, le=8, description="Round yi/wan/thousands output to this many decimals.")


@register("normalize_numbers")
class NormalizeNumbers(Mapper):
    """Write every financial amount as one plain number (`1.2亿`, `120,000,000` and `120 million` all
    become `120000000`). Percentages, years and plain decimals are left alone; approximate amounts
    (`数千亿`, `500多亿`, `近百亿`) stay as written and are counted as `approximate_amount` tags in the
    data stage's stats; see `lmsmith.data.steps.numbers`."""

    Config = NormalizeNumbersConfig
    resolves = ("mixed_numbers",)
    example = ({}, "营收1.2亿元，净利润(3,500)万元，up 15 percent; revenue of RMB 1.2 billion")

    def map(self, text: str) -> str:
        return normalize_amounts(
            text,
            chinese=self.config.chinese_units,
            english=self.config.english_units,
            separators=self.config.thousands_separators,
            negative_parentheses=self.config.negative_parentheses,
            percent_words=self.config.percent_words,
            percent=self.config.percent,
            output=self.config.output,
            decimals=self.config.decimals,
        )

    def tags(self, text: str) -> list[str]:
        if not self.config.chinese_units:
            return []
        return ["approximate_amount"] * len(find_approximate_amounts(text))


class MaskPiiConfig(OpConfig):
    phone_token: str = Field("[PHONE]", description="Replaces a mainland China mobile number.")
    email_token: str = Field("[EMAIL]", description="Replaces an e-mail address.")
    id_token: str = Field("[ID]", description="Replaces an 18-digit resident ID number whose checksum is valid.")
    card_token: str = Field("[CARD]", description="Replaces a 13-19 digit bank card number that passes Luhn.")
    phones: bool = Field(True, description="Mask mobile numbers.")
    emails: bool = Field(True, description="Mask e-mail addresses.")
    id_numbers: bool = Field(True, description="Mask resident ID numbers.")
    bank_cards: bool = Field(True, description="Mask bank card numbers.")


# A mainland mobile number: 1[3-9] and 9 more digits, optionally +86 and 3-4-4 grouping. Not when it is
# part of a longer number or followed by a currency/magnitude (then it is an amount).
_CN_MOBILE = re.compile(
    r"(?<!\d)(?<!\d\.)(?:\+?86[- ]?)?1[3-9]\d(?:[- ]?\d{4}){2}(?!\d|\.\d|\s*(?:元|亿|万|yuan|RMB))"
)
_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")


@register("mask_pii")
class MaskPii(Mapper):
    """Mask personal data: e-mail addresses, resident ID numbers (checksum validated), bank card numbers
    (Luhn validated) and mainland China mobile numbers (`13812345678`, `138-1234-5678`,
    `+86 13812345678`). Numbers that fail their checksum are left alone. Run it before
    `normalize_numbers`."""

    Config = MaskPiiConfig
    resolves = ("pii",)
    example = ({}, "联系王先生13812345678，邮箱wang@example.com，身份证11010519491231002X，卡号6222 0212 3456 7890 128")

    def map(self, text: str) -> str:
        config = self.config
        if config.emails and "@" in text:
            text = _EMAIL.sub(config.email_token, text)
        if not any(c.isdigit() for c in text):
            return text
        if config.id_numbers:
            text = mask_id_numbers(text, config.id_token)
        if config.bank_cards:
            text = mask_bank_cards(text, config.card_token)
        if config.phones:
            text = _CN_MOBILE.sub(config.phone_token, text)
        return text


DEFAULT_BOILERPLATE = (
    "仅供参考", "不构成任何投资建议", "不构成投资建议", "投资有风险", "入市需谨慎", "免责声明", "版权所有",
    "未经授权", "转载请注明", "©", "扫码关注", "关注我们的公众号", "点击阅读原文",
    "for reference only", "does not constitute investment advice", "not investment advice", "disclaimer",
    "all rights reserved", "reproduction without permission",
)


class RemoveBoilerplateConfig(OpConfig):
    keywords: list[str] = Field(
        default_factory=lambda: list(DEFAULT_BOILERPLATE),
        description="A sentence containing any of these (case-insensitive) is removed.",
    )
    extra_keywords: list[str] = Field(default_factory=list, description="Added to `keywords`.")


# Sentence ends: Chinese end punctuation, a line break, or an English end mark followed by a space (so
# the dot in `12.35` never splits).
_SENTENCE_END = re.compile(r"(?<=[。！？!?\n])|(?<=[.!?])(?= )")


@register("remove_boilerplate")
class RemoveBoilerplate(Mapper):
    """Remove boilerplate sentences (disclaimers, copyright notices, "follow our account") found by
    keyword. A text that was nothing but boilerplate ends up empty and is dropped."""

    Config = RemoveBoilerplateConfig
    resolves = ("boilerplate",)
    example = ({}, "营业收入12.35亿元。本报告仅供参考，不构成任何投资建议。")

    def __init__(self, config: RemoveBoilerplateConfig):
        super().__init__(config)
        keywords = [k for k in [*config.keywords, *config.extra_keywords] if k]
        self._pattern = re.compile("|".join(re.escape(k) for k in keywords), re.IGNORECASE) if keywords else None

    def map(self, text: str) -> str:
        if self._pattern is None or not self._pattern.search(text):
            return text
        kept = [s for s in _SENTENCE_END.split(text) if not self._pattern.search(s)]
        return re.sub(r"\n{3,}", "\n\n", "".join(kept)).strip()


# --------------------------------------------------------------------------------------------- filters


class MinLengthConfig(OpConfig):
    chars: int = Field(50, ge=1, description="Drop texts shorter than this many characters (spaces excluded).")


@register("min_length")
class MinLength(Filter):
    """Drop texts shorter than `chars` characters, not counting whitespace (fragments, empty pages)."""

    Config = MinLengthConfig
    example = ({"chars": 10}, "短句。")

    def reject(self, text: str) -> Optional[str]:
        length = sum(map(len, text.split()))  # split() drops every whitespace run, in C
        return f"{length} chars < {self.config.chars}" if length < self.config.chars else None


# ---------------------------------------------------------------------------------------------- specs

DEFAULT_OPS: tuple[dict[str, Any], ...] = (
    {"op": "strip_html"},
    {"op": "unicode_normalize"},
    {"op": "remove_boilerplate"},
    {"op": "mask_pii"},
    {"op": "normalize_numbers"},
    {"op": "min_length", "chars": 50, "apply_to": "corpus"},
)


def validate_op_spec(spec: Any, info: Optional[ValidationInfo] = None) -> dict[str, Any]:
    """Check `{op: NAME, ...params}` and return it with every default filled in.

    File parameters (`InputPath`) resolve against the recipe's folder when `info` carries it (a recipe's
    `data.ops`), and are stored absolute. Raises ValueError naming the operator and the offending parameter.
    """
    if not isinstance(spec, dict):
        raise ValueError(f"expected a mapping like {{op: strip_html}}, got {spec!r}")
    name = spec.get("op")
    if name not in REGISTRY:
        known = ", ".join(sorted(REGISTRY))
        shown = "missing 'op'" if name is None else f"unknown operator {name!r}"
        raise ValueError(f"{shown}; available: {known}")
    params = {k: v for k, v in spec.items() if k != "op"}
    try:
        config = REGISTRY[name].Config.model_validate(params, context=info.context if info is not None else None)
    except ValidationError as exc:
        problems = []
        for problem in exc.errors():
            field = ".".join(str(part) for part in problem["loc"])
            message = "unknown parameter" if problem["type"] == "extra_forbidden" else problem["msg"]
            problems.append(f"{name}.{field}: {message.removeprefix('Value error, ')}")
        raise ValueError("; ".join(problems)) from None
    return {"op": name, **config.model_dump(mode="json")}


def op_kind(cls: type[Op]) -> str:
    return "filter" if issubclass(cls, Filter) else "mapper"


def build_op(spec: dict[str, Any]) -> Op:
    cls = REGISTRY[spec["op"]]
    return cls(cls.Config.model_validate({k: v for k, v in spec.items() if k != "op"}))


def build_ops(specs: list[dict[str, Any]]) -> list[Op]:
    return [build_op(validate_op_spec(spec)) for spec in specs]


def rewriter(specs: list[dict[str, Any]], kind: Literal["corpus", "instructions"]) -> Callable[[str], str]:
    """The rewriting operators (mappers) of `specs` that apply to `kind`, as one text-to-text function:
    what eval items go through so they read the way the training text did."""
    mappers = [op for op in build_ops(specs) if isinstance(op, Mapper) and op.applies_to(kind)]

    def rewrite(text: str) -> str:
        for op in mappers:
            text = op.map(text)
        return text

    return rewrite


def describe_ops() -> dict[str, str]:
    """Name → first docstring line of every registered operator (for `--help`-style listings)."""
    return {name: (cls.__doc__ or "").strip().split("\n")[0] for name, cls in sorted(REGISTRY.items())}


# The rest of the catalog registers itself on import; imported last because those modules subclass the
# bases above.
from lmsmith.data.steps import filters as _filters  # noqa: E402,F401
from lmsmith.data.steps import mappers as _mappers  # noqa: E402,F401
from lmsmith.data.steps import learned as _learned  # noqa: E402,F401
