"""Financial amounts written in many ways (`1.2亿`, `120,000,000`, `1.2 billion`, `(1,200)`) rewritten in
one form, so the tokenizer and the model see one form for one value.

Python's `re` finds the amounts and `decimal` does the arithmetic exactly (no float rounding).

What is rewritten:
- a number followed by a Chinese magnitude (万亿, 千亿, 百亿, 十亿, 亿, 千万, 百万, 十万, 万) or an
  English one (trillion, billion, million, thousand, bn, mn): `1.2亿` → `120000000`, `3千亿` →
  `300000000000`, `3.5 million` → `3500000`. One space between the number and the Chinese magnitude is
  allowed (a space, a no-break space U+00A0/U+202F, a thin space or an ideographic space): `7.1 亿元` →
  `710000000元`, as `7.1亿元`. With that space the magnitude must be followed by a unit, a currency or a
  joining word (`UNITS_AFTER_SPACE`) or by no Chinese character, and the number must not be a bare
  six-digit integer: `300014 亿纬锂能`, `000002 万科A`, `2023 万得` are a code or a year and a name.
  A magnitude that starts a listed company name (`COMPANY_NAMES`) is never one: `300014亿纬锂能` stays;
- `X亿Y万` as one amount: `1亿2000万` → `120000000`;
- a range whose magnitude is written once, on its upper end: `1-3亿元` → `100000000-300000000元` (also
  with `~`, `～`, `–`, `—`, `−`, `－`, `至`, `到`); only when the lower end is not above the upper one, so
  `2023-5亿` reads as a year and an amount;
- thousands separators: `120,000,000` → `120000000`, `1,234.5%` → `1234.5%`;
- negatives: a minus sign (ASCII `-`, U+2212 `−`, full-width `－`) before an amount that is rewritten is
  kept as an ASCII `-` (`−118.35 亿元` → `-11835000000元`; `yi` form `-118.35亿元`, `thousands`
  `-11,835,000,000元`, `wan` `-1183500万元`: every form writes the sign first). The minus is a sign
  unless the character before it is a digit, a letter (ASCII or full width), a Chinese numeral or unit
  (〇一二三四五六七八九十百千万亿两元), `.`, `%`, a closing bracket or another dash or tilde: then it
  joins two things (`2020-2023`, `1-3亿元`, `A-1`, `1亿元-3亿元`) and is left as written. So at the start
  of the text, after whitespace, an opening bracket, punctuation (`：:，,；;、`) or a word (`净利润-1.2亿`,
  `为-3亿`) it is a sign. A bare number is never rewritten, so its minus stays as written (`−5`);
- accounting negatives in parentheses: `(1,234)` → `-1234`, `(1.2亿)` → `-120000000` (only when the
  number has separators, decimals or a magnitude, so `(2023)` and `(5)` stay);
- percentages written out: `15.2 percent`, `15.2 pct`, `15.2 %` → `15.2%`; optionally `15.2%` → `0.152`.

The output form is configurable: `plain` (`120000000`), `thousands` (`120,000,000`), `yi`
(`1.2亿`) or `wan` (`12000万`).

Approximate amounts are left as written and reported by `find_approximate_amounts` (the span and the
word that makes it approximate, one of `APPROXIMATE_MARKERS`). An amount is approximate when the text
does not fix its value:
- `数` (several) and `几` (a few) before a magnitude: `数千亿元`, `数亿`, `几十亿`, `十几亿`;
- `多` and `余` (more than, as in "500-odd") inside or after it: `500多亿元`, `500余亿`, `5亿多元`,
  `3万余元`, `十多亿`, `百余亿` (`余额`, balance, is not a hedge); `来` (about) between a number and its
  magnitude: `30来万`. Writing `5亿多` as `500000000多` would change its meaning (500000000-odd), so it
  stays;
- a bound word before a bare magnitude word, with no numeral: `近`/`将近`/`接近` (nearly), `超`/`超过`,
  `逾`, `过`, `破` (over), `约`/`大约` (about), `上` (as many as): `近百亿`, `超万亿`, `上千亿`, `逾千亿`,
  `过亿`.
The same bound words before a number in digits do not make it approximate: the number is exact and is
rewritten, the word stays in front of it (`近500亿` → `近50000000000`, `约1.2亿` → `约120000000`,
`超1.5万亿` → `超1500000000000`).

What is left alone: years and other plain integers (`2023年`), decimals without a magnitude (`0.85元`),
digits glued into a longer number (`12,3456`), numbers written in Chinese characters (`一亿`, `三千万`),
company names containing a magnitude (`亿纬锂能`, `亿晶光电`, `亿联网络`) and approximate amounts.
"""

from __future__ import annotations

import re
from decimal import ROUND_HALF_UP, Decimal
from typing import Literal, NamedTuple, Optional

OutputForm = Literal["plain", "thousands", "yi", "wan"]
PercentForm = Literal["keep", "fraction"]

# Longest first: the regex alternation takes the first that matches.
CHINESE_MAGNITUDES = {"万亿": 10**12, "千亿": 10**11, "百亿": 10**10, "十亿": 10**9, "亿": 10**8,
                      "千万": 10**7, "百万": 10**6, "十万": 10**5, "万": 10**4}
ENGLISH_MAGNITUDES = {"trillion": 10**12, "billion": 10**9, "bn": 10**9, "million": 10**6, "mn": 10**6,
                      "thousand": 10**3}
# Listed companies whose name starts with a magnitude: never read as `<number>亿` / `<number>万`.
COMPANY_NAMES = ("亿纬锂能", "亿晶光电", "亿联网络", "亿帆医药", "亿利洁能", "亿嘉和", "亿华通", "亿通科技",
                 "亿田智能", "亿道信息", "万科A", "万华化学", "万向钱潮", "万达电影", "万丰奥威", "万润股份",
                 "万通发展", "万业企业", "万兴科技", "万孚生物", "万集科技")
APPROXIMATE_MARKERS = ("数", "几", "多", "余", "来", "近", "将近", "接近", "超", "超过", "逾", "过", "破",
                       "约", "大约", "上")

_CN = "|".join(CHINESE_MAGNITUDES)
_EN = "trillion|billion|million|thousand|bn|mn"
_NOT_A_NAME = "(?!" + "|".join(COMPANY_NAMES) + ")"
_CN_MAGNITUDE = _NOT_A_NAME + "(?:" + _CN + ")"
_GAP = "[ \u00a0\u202f\u2009\u3000]"  # one space between a number and its Chinese magnitude
# After a spaced magnitude (`7.1 亿元`) comes a unit, a currency, a joining word, or no Chinese character at
# all; `2023 万得` (Wind, a data vendor) and `300014 亿纬锂能` are a number and a name.
UNITS_AFTER_SPACE = "元美港欧日英韩股人户吨只张份辆台次个家条套件笔平头册左以的和与及或至到"
_AFTER_GAP = "(?(gap)(?:(?=[" + UNITS_AFTER_SPACE + "])|(?![\u3400-\u4dbf\u4e00-\u9fff])))"
_MINUS = "-\u2212\uff0d"
# A minus is a sign unless what precedes it makes it a joiner (a range, a date, a code).
_SIGN = (r"(?:(?<![0-9A-Za-z\uff10-\uff19\uff21-\uff3a\uff41-\uff5a〇一二三四五六七八九十百千万亿两元.%％)）\]】"
         r"\-\u2212\uff0d\u2013\u2014~～])(?P<sign>[" + _MINUS + "]))?")
# A cheap first test (a digit or a minus here), which also lets `re` skip ahead quickly.
_STARTS_SIGNED = "(?=[" + _MINUS + "\\d])"
_BODY = r"(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?"

# A number not preceded by a digit or a dot (so we never start inside another number); thousands groups
# must be exactly three digits and not followed by another digit.
_NUMBER = r"(?<![\d.])(?P<int>\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?P<frac>\.\d+)?"
_MAGNITUDE = (r"(?:(?P<gap>" + _GAP + r")?" + _NOT_A_NAME + r"(?P<cn>" + _CN + r")" + _AFTER_GAP
              + r"|[ \u00a0]?(?P<en>" + _EN + r")(?![A-Za-z]))?")
_AMOUNT = re.compile(_STARTS_SIGNED + _SIGN + _NUMBER + _MAGNITUDE + r"(?P<pct>\s?%)?", re.IGNORECASE)
_YI_WAN = re.compile(_STARTS_SIGNED + _SIGN + r"(?<![\d.])(?P<yi>\d+(?:\.\d+)?)" + _GAP + r"?亿(?P<wan>\d{1,4})"
                     + _GAP + r"?万(?!亿)")
# `1-3亿`: the magnitude of the upper end applies to both.
_RANGE = re.compile(
    r"(?=\d)(?<![\d.,])(?P<lo>" + _BODY + r")"
    r"(?P<to>" + _GAP + r"?(?:[-\u2212\uff0d\u2013\u2014~～]|至|到)" + _GAP + r"?)"
    r"(?P<hi>" + _BODY + r")"
    r"(?:(?P<gap>" + _GAP + r")?(?P<cn>" + _CN_MAGNITUDE + r")" + _AFTER_GAP
    + r"|[ \u00a0]?(?P<en>" + _EN + r")(?![A-Za-z]))",
    re.IGNORECASE,
)
_RANGE_JOINERS = ("-", "\u2212", "\uff0d", "\u2013", "\u2014", "~", "～", "至", "到")
# `(1,234)` / `（1.5亿）`: a bracketed amount with separators, decimals or a magnitude, nothing else inside.
_NEGATIVE = re.compile(
    r"[(（]\s*(?P<body>(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
    r"(?:" + _GAP + r"?" + _CN_MAGNITUDE + r"|\s?(?:" + _EN + r"))?)\s*[)）]",
    re.IGNORECASE,
)
_PERCENT_WORDS = re.compile(r"(?<![\d.])(\d+(?:\.\d+)?)(?:\s?(?:percent|per cent|pct)(?![A-Za-z])|\s+%)",
                            re.IGNORECASE)
_PLAIN_PERCENT = re.compile(r"(?<![\d.])(\d+(?:\.\d+)?)%")
_DIGIT = re.compile(r"\d")

# Approximate amounts, one alternative per kind (see the module docstring); the named group `m<n>` holds
# the word that makes it approximate. `万分之` (per ten thousand) is a ratio, not an amount.
_DIGITS = r"(?<![\d.])(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?"
_CN_NUMERAL = "[〇零一二三四五六七八九十两百千]"
_END = r"(?!分之)"
_APPROXIMATE = re.compile(
    # 500多亿, 3千多亿, 30来万, 1亿2000多万
    r"(?:" + _DIGITS + "亿)?" + _DIGITS + r"[十百千]?(?P<m1>[多余来])[十百千]?" + _CN_MAGNITUDE + _END
    # 5亿多, 3万余 (not 余额)
    + r"|(?:" + _DIGITS + "亿)?" + _DIGITS + _GAP + "?" + _CN_MAGNITUDE + r"(?P<m2>多|余(?!额))"
    # 十多亿, 百余亿, 十几亿, 三百多万, 一亿多
    + r"|(?<!" + _CN_NUMERAL + ")" + _CN_NUMERAL + r"+(?:(?P<m3>[多余几来])[十百千]?" + _CN_MAGNITUDE + _END
    + r"|" + _CN_MAGNITUDE + r"(?P<m4>多|余(?!额)))"
    # 数千亿, 数亿, 几十亿
    + r"|(?P<m5>[数几])[十百千]?" + _CN_MAGNITUDE + _END
    # 近百亿, 超万亿, 上千亿, 逾千亿, 过亿
    + r"|(?P<m6>将近|接近|超过|大约|[近超逾过破约上])[十百千]?" + _CN_MAGNITUDE + _END
)

_APPROXIMATE_HINT = re.compile("[多余来几数近超逾过破约上][十百千]{0,2}[万亿]|[万亿][多余]")
# Every character an approximate amount can be made of.
_APPROXIMATE_CHARS = frozenset("0123456789,.亿万十百千〇零一二三四五六七八九两多余来数几将接近超过大约逾破上"
                               " \u00a0\u202f\u2009\u3000")
_LOOKBACK = 64  # the most characters an approximate amount starts before its marker (`1,234.5亿2000多万`)


class ApproximateAmount(NamedTuple):
    """An approximate amount left as written: `text[start:end]` and the word that makes it approximate."""

    start: int
    end: int
    text: str
    marker: str


def find_approximate_amounts(text: str) -> list[ApproximateAmount]:
    """The approximate amounts in `text` (`数千亿`, `500多亿`, `近百亿`...), which `normalize_amounts`
    leaves as written, in order."""
    if "亿" not in text and "万" not in text:
        return []
    # Every approximate amount holds a marker next to a magnitude; a scan for those is fast, the full
    # pattern is only tried at the few places just before one.
    found: list[ApproximateAmount] = []
    done = 0
    for hint in _APPROXIMATE_HINT.finditer(text):
        # A match is made of amount characters only, so it starts inside the run of them ending here.
        start = hint.start()
        while start > done and hint.start() - start < _LOOKBACK and text[start - 1] in _APPROXIMATE_CHARS:
            start -= 1
        while start < hint.end():
            match = _APPROXIMATE.match(text, start)
            if match is None:
                start += 1
                continue
            marker = next(value for value in match.groupdict().values() if value)
            found.append(ApproximateAmount(match.start(), match.end(), match.group(0), marker))
            done = start = match.end()
    return found


def plain(value: Decimal) -> str:
    """`Decimal` → the shortest exact plain notation (`120000000`, `1234567890.1`, `-5`)."""
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def _round(value: Decimal, decimals: int) -> Decimal:
    """Half-up rounding, as financial statements round (Python's default is half-even); never `-0.00`."""
    rounded = value.quantize(Decimal(1).scaleb(-decimals), rounding=ROUND_HALF_UP)
    return abs(rounded) if rounded == 0 else rounded


def format_amount(value: Decimal, output: OutputForm = "plain", decimals: Optional[int] = None) -> str:
    """An amount in yuan (or any unit) in the requested form; `decimals` rounds yi/wan/thousands. A
    negative amount is written with `-` first in every form (`-120000000`, `-120,000,000`, `-1.2亿`)."""
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


def _is_stock_code(match: re.Match) -> bool:
    """`300014 亿纬锂能`: a bare six-digit integer, a space, then a magnitude character."""
    return bool(match["gap"]) and not match["frac"] and len(match["int"]) == 6 and match["int"].isdigit()


class _AmountRewriter:
    def __init__(self, chinese: bool, english: bool, separators: bool, output: OutputForm, decimals: Optional[int]):
        self.chinese, self.english, self.separators = chinese, english, separators
        self.output, self.decimals = output, decimals

    def format(self, value: Decimal) -> str:
        return format_amount(value, self.output, self.decimals)

    def yi_wan(self, match: re.Match) -> str:
        value = Decimal(match["yi"]) * 10**8 + Decimal(match["wan"]) * 10**4
        return self.format(-value if match["sign"] else value)

    def range(self, match: re.Match) -> str:
        if match["cn"]:
            if not self.chinese:
                return match.group(0)
            scale = CHINESE_MAGNITUDES[match["cn"]]
        else:
            if not self.english:
                return match.group(0)
            scale = ENGLISH_MAGNITUDES[match["en"].lower()]
        low, high = Decimal(match["lo"].replace(",", "")), Decimal(match["hi"].replace(",", ""))
        if low > high:  # `2023-5亿`: a year, then an amount; the amount pass handles it
            return match.group(0)
        return self.format(low * scale) + match["to"] + self.format(high * scale)

    def amount(self, match: re.Match) -> str:
        digits = match["int"].replace(",", "") + (match["frac"] or "")
        sign = "-" if match["sign"] else ""
        # What follows the number (a magnitude, a percent sign), kept when the number alone is rewritten.
        rest = match.string[match.end("frac") if match["frac"] else match.end("int"):match.end()]
        if match["pct"]:
            # A percentage keeps its form; only the separators go.
            return sign + digits + rest if "," in match["int"] and self.separators else match.group(0)
        if match["cn"] and self.chinese:
            if _is_stock_code(match):
                return match.group(0)
            value = Decimal(digits) * CHINESE_MAGNITUDES[match["cn"]]
            return self.format(-value if sign else value)
        if match["en"] and self.english:
            value = Decimal(digits) * ENGLISH_MAGNITUDES[match["en"].lower()]
            return self.format(-value if sign else value)
        if "," in match["int"] and self.separators:
            # The magnitude (if any) is kept as written when its kind of rewriting is turned off.
            if rest:
                return sign + digits + rest
            return self.format(-Decimal(digits) if sign else Decimal(digits))
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
    """Rewrite the financial amounts in `text` (see the module docstring); approximate amounts
    (`find_approximate_amounts`) are left as written."""
    if not _DIGIT.search(text):
        return text
    rewriter = _AmountRewriter(chinese, english, separators, output, decimals)
    options = (rewriter, negative_parentheses, percent_words, percent)
    approximate = find_approximate_amounts(text)
    if not approximate:
        return _normalize_span(text, *options)
    pieces, done = [], 0
    for found in approximate:
        pieces.append(_normalize_span(text[done:found.start], *options))
        pieces.append(found.text)
        done = found.end
    pieces.append(_normalize_span(text[done:], *options))
    return "".join(pieces)


def _normalize_span(
    text: str, rewriter: _AmountRewriter, negative_parentheses: bool, percent_words: bool, percent: PercentForm
) -> str:
    if not _DIGIT.search(text):
        return text
    # Substring checks are far cheaper than a regex pass; each pattern below needs its marker.
    if negative_parentheses and ("(" in text or "（" in text):
        text = _NEGATIVE.sub(_rewrite_negative, text)
    if percent_words and ("%" in text or "pct" in text.lower() or "cent" in text.lower()):
        text = _PERCENT_WORDS.sub(r"\1%", text)
    if any(joiner in text for joiner in _RANGE_JOINERS):
        text = _RANGE.sub(rewriter.range, text)
    if rewriter.chinese and "亿" in text and "万" in text:
        text = _YI_WAN.sub(rewriter.yi_wan, text)
    text = _AMOUNT.sub(rewriter.amount, text)
    if percent == "fraction":
        text = _PLAIN_PERCENT.sub(lambda m: plain(Decimal(m[1]) / 100), text)
    return text
