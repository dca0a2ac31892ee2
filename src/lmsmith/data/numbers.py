"""Financial amounts written in many ways (`1.2亿`, `120,000,000`, `1.2 billion`) rewritten as one plain
number (`120000000`), so the tokenizer and the model see one form for one value.

Python's `re` finds the amounts and `decimal` does the arithmetic exactly (no float rounding).

What is rewritten:
- a number followed by a Chinese magnitude (万亿, 亿, 千万, 百万, 万) or an English one (trillion,
  billion, million, thousand, bn, mn): `1.2亿` → `120000000`, `3.5 million` → `3500000`;
- `X亿Y万` as one amount: `1亿2000万` → `120000000`;
- thousands separators: `120,000,000` → `120000000`, `1,234.5%` → `1234.5%`.

What is left alone: percentages (`15.20%` stays), years and other plain integers (`2023年`), decimals
without a magnitude (`0.85元`), digits glued into a longer number (`12,3456`), and numbers written in
Chinese characters (`一亿`).
"""

from __future__ import annotations

import re
from decimal import Decimal

CHINESE_MAGNITUDES = {"万亿": 10**12, "亿": 10**8, "千万": 10**7, "百万": 10**6, "万": 10**4}
ENGLISH_MAGNITUDES = {"trillion": 10**12, "billion": 10**9, "bn": 10**9, "million": 10**6, "mn": 10**6,
                      "thousand": 10**3}

# A number not preceded by a digit or a dot (so we never start inside another number); thousands groups
# must be exactly three digits and not followed by another digit.
_NUMBER = r"(?<![\d.])(?P<int>\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?P<frac>\.\d+)?"
_AMOUNT = re.compile(
    _NUMBER
    + r"(?:(?P<cn>万亿|亿|千万|百万|万)"
    + r"|[ \u00a0]?(?P<en>trillion|billion|million|thousand|bn|mn)(?![A-Za-z]))?",
    re.IGNORECASE,
)
_YI_WAN = re.compile(r"(?<![\d.])(?P<yi>\d+(?:\.\d+)?)亿(?P<wan>\d{1,4})万(?!亿)")


def plain(value: Decimal) -> str:
    """`Decimal` → the shortest exact plain notation (`120000000`, `1234567890.1`)."""
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def _rewrite_yi_wan(match: re.Match) -> str:
    return plain(Decimal(match["yi"]) * 10**8 + Decimal(match["wan"]) * 10**4)


def _rewrite_amount(match: re.Match, chinese: bool, english: bool, separators: bool) -> str:
    digits = match["int"].replace(",", "") + (match["frac"] or "")
    if match["cn"] and chinese:
        return plain(Decimal(digits) * CHINESE_MAGNITUDES[match["cn"]])
    if match["en"] and english:
        return plain(Decimal(digits) * ENGLISH_MAGNITUDES[match["en"].lower()])
    if "," in match["int"] and separators:
        # The magnitude (if any) is kept as written when its kind of rewriting is turned off.
        rest = match.group(0)[len(match["int"]) + len(match["frac"] or ""):]
        return digits + rest
    return match.group(0)


def normalize_amounts(text: str, chinese: bool = True, english: bool = True, separators: bool = True) -> str:
    """Rewrite the financial amounts in `text` as plain numbers (see the module docstring)."""
    if chinese:
        text = _YI_WAN.sub(_rewrite_yi_wan, text)
    return _AMOUNT.sub(lambda m: _rewrite_amount(m, chinese, english, separators), text)
