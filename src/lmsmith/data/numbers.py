"""Financial amounts written in many ways (`1.2亿`, `120,000,000`, `1.2 billion`, `(1,200)`) rewritten in
one form, so the tokenizer and the model see one form for one value.

Python's `re` finds the amounts and `decimal` does the arithmetic exactly (no float rounding).

What is rewritten:
- a number followed by a Chinese magnitude (万亿, 亿, 千万, 百万, 万) or an English one (trillion,
  billion, million, thousand, bn, mn): `1.2亿` → `120000000`, `3.5 million` → `3500000`;
- `X亿Y万` as one amount: `1亿2000万` → `120000000`;
- thousands separators: `120,000,000` → `120000000`, `1,234.5%` → `1234.5%`;
- accounting negatives in parentheses: `(1,234)` → `-1234`, `(1.2亿)` → `-120000000` (only when the
  number has separators, decimals or a magnitude, so `(2023)` and `(5)` stay);
- percentages written out: `15.2 percent`, `15.2 pct`, `15.2 %` → `15.2%`; optionally `15.2%` → `0.152`.

The output form is configurable: `plain` (`120000000`), `thousands` (`120,000,000`), `yi`
(`1.2亿`) or `wan` (`12000万`).

What is left alone: years and other plain integers (`2023年`), decimals without a magnitude (`0.85元`),
digits glued into a longer number (`12,3456`), and numbers written in Chinese characters (`一亿`).
"""

from __future__ import annotations

import re
from decimal import ROUND_HALF_UP, Decimal
from typing import Literal, Optional

OutputForm = Literal["plain", "thousands", "yi", "wan"]
PercentForm = Literal["keep", "fraction"]

CHINESE_MAGNITUDES = {"万亿": 10**12, "亿": 10**8, "千万": 10**7, "百万": 10**6, "万": 10**4}
ENGLISH_MAGNITUDES = {"trillion": 10**12, "billion": 10**9, "bn": 10**9, "million": 10**6, "mn": 10**6,
                      "thousand": 10**3}

# A number not preceded by a digit or a dot (so we never start inside another number); thousands groups
# must be exactly three digits and not followed by another digit.
_NUMBER = r"(?<![\d.])(?P<int>\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?P<frac>\.\d+)?"
_MAGNITUDE = (r"(?:(?P<cn>万亿|亿|千万|百万|万)"
              r"|[ \u00a0]?(?P<en>trillion|billion|million|thousand|bn|mn)(?![A-Za-z]))?")
_AMOUNT = re.compile(_NUMBER + _MAGNITUDE + r"(?P<pct>\s?%)?", re.IGNORECASE)
_YI_WAN = re.compile(r"(?<![\d.])(?P<yi>\d+(?:\.\d+)?)亿(?P<wan>\d{1,4})万(?!亿)")
# `(1,234)` / `（1.5亿）`: a bracketed amount with separators, decimals or a magnitude, nothing else inside.
_NEGATIVE = re.compile(
    r"[(（]\s*(?P<body>(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
    r"(?:万亿|亿|千万|百万|万|\s?(?:trillion|billion|million|thousand|bn|mn))?)\s*[)）]",
    re.IGNORECASE,
)
_PERCENT_WORDS = re.compile(r"(?<![\d.])(\d+(?:\.\d+)?)(?:\s?(?:percent|per cent|pct)(?![A-Za-z])|\s+%)",
                            re.IGNORECASE)
_PLAIN_PERCENT = re.compile(r"(?<![\d.])(\d+(?:\.\d+)?)%")
_DIGIT = re.compile(r"\d")


def plain(value: Decimal) -> str:
    """`Decimal` → the shortest exact plain notation (`120000000`, `1234567890.1`)."""
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def _round(value: Decimal, decimals: int) -> Decimal:
    """Half-up rounding, as financial statements round (Python's default is half-even)."""
    return value.quantize(Decimal(1).scaleb(-decimals), rounding=ROUND_HALF_UP)


def format_amount(value: Decimal, output: OutputForm = "plain", decimals: Optional[int] = None) -> str:
    """An amount in yuan (or any unit) in the requested form; `decimals` rounds yi/wan/thousands."""
    if output == "plain":
        return plain(value)
    if output == "thousands":
        if decimals is not None:
            return f"{_round(value, decimals):,.{decimals}f}"
        text = plain(value)
        whole, _, frac = text.partition(".")
        return f"{int(whole):,}" + (f".{frac}" if frac else "")
    unit, scale = ("亿", 10**8) if output == "yi" else ("万", 10**4)
    scaled = value / scale
    body = f"{_round(scaled, decimals):.{decimals}f}" if decimals is not None else plain(scaled)
    return body + unit


def _has_magnitude_or_separator(body: str) -> bool:
    return "," in body or "." in body or not body[-1].isdigit()


def _rewrite_negative(match: re.Match) -> str:
    body = match["body"]
    return f"-{body}" if _has_magnitude_or_separator(body) else match.group(0)


class _AmountRewriter:
    def __init__(self, chinese: bool, english: bool, separators: bool, output: OutputForm, decimals: Optional[int]):
        self.chinese, self.english, self.separators = chinese, english, separators
        self.output, self.decimals = output, decimals

    def yi_wan(self, match: re.Match) -> str:
        return format_amount(Decimal(match["yi"]) * 10**8 + Decimal(match["wan"]) * 10**4, self.output, self.decimals)

    def amount(self, match: re.Match) -> str:
        digits = match["int"].replace(",", "") + (match["frac"] or "")
        if match["pct"]:
            # A percentage keeps its form; only the separators go.
            if "," in match["int"] and self.separators:
                return digits + match.group(0)[len(match["int"]) + len(match["frac"] or ""):]
            return match.group(0)
        if match["cn"] and self.chinese:
            return format_amount(Decimal(digits) * CHINESE_MAGNITUDES[match["cn"]], self.output, self.decimals)
        if match["en"] and self.english:
            return format_amount(Decimal(digits) * ENGLISH_MAGNITUDES[match["en"].lower()], self.output, self.decimals)
        if "," in match["int"] and self.separators:
            # The magnitude (if any) is kept as written when its kind of rewriting is turned off.
            rest = match.group(0)[len(match["int"]) + len(match["frac"] or ""):]
            if rest:
                return digits + rest
            return format_amount(Decimal(digits), self.output, self.decimals)
        return match.group(0)


def normalize_amounts(
    text: str,
    chinese: bool = True,
    english: bool = True,
    separators: bool = True,
    negative_parentheses: bool = True,
    percent_words: bool = True,
    percent: PercentForm = "keep",
    output: OutputForm = "plain",
    decimals: Optional[int] = None,
) -> str:
    """Rewrite the financial amounts in `text` (see the module docstring)."""
    if not _DIGIT.search(text):
        return text
    rewriter = _AmountRewriter(chinese, english, separators, output, decimals)
    # Substring checks are far cheaper than a regex pass; each pattern below needs its marker.
    if negative_parentheses and ("(" in text or "（" in text):
        text = _NEGATIVE.sub(_rewrite_negative, text)
    if percent_words and ("%" in text or "pct" in text.lower() or "cent" in text.lower()):
        text = _PERCENT_WORDS.sub(r"\1%", text)
    if chinese and "亿" in text and "万" in text:
        text = _YI_WAN.sub(rewriter.yi_wan, text)
    text = _AMOUNT.sub(rewriter.amount, text)
    if percent == "fraction":
        text = _PLAIN_PERCENT.sub(lambda m: plain(Decimal(m[1]) / 100), text)
    return text
