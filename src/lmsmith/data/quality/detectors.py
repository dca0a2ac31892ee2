"""Noise detectors for the quality report: each looks at a text and says whether (and why) it is noisy.

They are written apart from the cleaning operators on purpose: the report measures what cleaning left
behind, so it must not share the operators' blind spots (the near-duplicate detector shares only the
MinHash machinery, `lmsmith.data.minhash`, run on character shingles whatever the cleaning's settings).
Python's `re` does the pattern work.

| detector | flags a text that ... |
| --- | --- |
| `html` | holds an HTML tag, comment or entity |
| `pii` | holds a mainland mobile number, an e-mail, a resident ID (checksum checked) or a bank card (Luhn) |
| `mixed_numbers` | writes amounts in two or more styles (亿, 万, plain, million/billion, separators) or in full width |
| `boilerplate` | holds a disclaimer, copyright notice or "follow us" line |
| `fragment` | (corpus only) is short, or does not end like a sentence |
| `exact_dup` | has the same normalised text as an earlier one |
| `near_dup` | is a near duplicate (estimated Jaccard ≥ threshold) of an earlier one that is not an exact copy |
"""

from __future__ import annotations

import re
from typing import Any, Callable, Optional, Sequence

from lmsmith.console import track
from lmsmith.data.minhash import MinHasher, NearDupIndex, estimated_jaccard
from lmsmith.data.record import dedup_key, row_kind, row_text

DETECTORS = ("html", "pii", "mixed_numbers", "boilerplate", "fragment", "exact_dup", "near_dup")

# ------------------------------------------------------------------------------------------------ html

_HTML = re.compile(
    r"</?(?:p|div|span|br|a|b|i|em|strong|table|tr|td|th|li|ul|ol|h[1-6]|img|script|style|font)\b[^<>]*>"
    r"|<!--|&(?:nbsp|amp|lt|gt|quot|copy|reg|#\d{2,5}|#x[0-9a-fA-F]{2,4});",
    re.IGNORECASE,
)


def detect_html(text: str) -> Optional[str]:
    match = _HTML.search(text)
    return match.group(0) if match else None


# ------------------------------------------------------------------------------------------------- pii

_MOBILE = re.compile(r"(?<!\d)(?<!\d\.)(?<!RMB )(?:\+?86[- ]?)?1[3-9]\d(?:[- ]?\d{4}){2}(?!\d|\.\d)(?!\s*(?:元|亿|万|yuan))")
_EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
_RESIDENT_ID = re.compile(r"(?<!\d)\d{17}[\dXx](?!\d)")
_BANK_CARD = re.compile(r"(?<!\d)(?<!\d\.)[3-6]\d{3}(?:[ -]?\d{4}){3}(?:\d{1,3})?(?!\d|\.\d)(?!\s*(?:元|亿|万))")
_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_CHECK = "10X98765432"


def resident_id_valid(number: str) -> bool:
    """The ISO 7064 MOD 11-2 check character of an 18-character mainland resident ID."""
    total = sum(int(digit) * weight for digit, weight in zip(number[:17], _ID_WEIGHTS))
    return _ID_CHECK[total % 11] == number[17].upper()


def luhn_valid(number: str) -> bool:
    digits = [int(c) for c in number if c.isdigit()]
    total = 0
    for index, digit in enumerate(reversed(digits)):
        if index % 2 == 1:
            digit = digit * 2 - 9 if digit > 4 else digit * 2
        total += digit
    return total % 10 == 0


def detect_pii(text: str) -> Optional[str]:
    for pattern, valid in ((_EMAIL, None), (_MOBILE, None), (_RESIDENT_ID, resident_id_valid), (_BANK_CARD, luhn_valid)):
        for match in pattern.finditer(text):
            if valid is None or valid(match.group(0)):
                return match.group(0)
    return None


# -------------------------------------------------------------------------------------- mixed numbers

# An amount: a number (any width, maybe with separators) and a magnitude or currency next to it.
_AMOUNT = re.compile(
    r"(?P<rmb>RMB\s?)?(?P<num>[\d０-９]+(?:[,，][\d０-９]{3})*(?:[.．][\d０-９]+)?)\s?"
    r"(?P<unit>万亿|亿|千万|百万|万|trillion|billion|million|bn|mn)?(?P<yuan>元)?"
)
_FULL_WIDTH_DIGIT = re.compile("[０-９]")


def _amount_style(match: re.Match) -> Optional[tuple[str, bool]]:
    """(magnitude style, written with thousands separators) of one amount, or None for a bare number."""
    number, unit = match["num"], match["unit"]
    if not (match["rmb"] or match["yuan"] or unit):
        return None  # a year, a count: not an amount
    separators = bool(re.search(r"[,，][\d０-９]{3}", number))
    if _FULL_WIDTH_DIGIT.search(number):
        return "full_width", separators
    if unit in ("万亿", "亿"):
        return "yi", separators
    if unit in ("千万", "百万", "万"):
        return "wan", separators
    if unit:
        return "english_magnitude", separators
    integer = re.split(r"[.．]", number)[0].replace(",", "").replace("，", "")
    return ("plain", separators) if len(integer) >= 5 else None  # `0.85元` (per share) is no big amount


def amount_styles(text: str) -> set[str]:
    """The styles the text's amounts are written in: a magnitude style each (`yi`, `wan`,
    `english_magnitude`, `plain`, `full_width`), plus `separators` / `no_separators` for amounts of four
    or more integer digits."""
    styles: set[str] = set()
    for match in _AMOUNT.finditer(text):
        found = _amount_style(match)
        if found is None:
            continue
        style, separators = found
        styles.add(style)
        integer_digits = len(re.split(r"[.．]", match["num"])[0].replace(",", "").replace("，", ""))
        if integer_digits >= 4:
            styles.add("separators" if separators else "no_separators")
    return styles


def detect_mixed_numbers(text: str) -> Optional[str]:
    """Amounts in two magnitude styles, with and without separators, or in full-width digits."""
    styles = amount_styles(text)
    magnitudes = styles - {"separators", "no_separators"}
    if "full_width" in styles or len(magnitudes) >= 2 or {"separators", "no_separators"} <= styles:
        return "+".join(sorted(styles))
    return None


# --------------------------------------------------------------------------------------- boilerplate

_BOILERPLATE = re.compile(
    r"免责声明|仅供参考|不构成[^。]{0,6}投资建议|投资有风险|入市需谨慎|风险自担|版权所有|(?:禁止|严禁|未经授权)[^。]{0,6}转载"
    r"|转载请注明|扫码关注|关注[^。]{0,6}公众号|点击阅读原文"
    r"|disclaimer|for reference only|(?:does not|do not) constitute[^.]{0,20}advice|all rights reserved"
    r"|reproduction without permission",
    re.IGNORECASE,
)


def detect_boilerplate(text: str) -> Optional[str]:
    match = _BOILERPLATE.search(text)
    return match.group(0) if match else None


# ------------------------------------------------------------------------------------------ fragment

_TRAILING_TAGS = re.compile(r"(?:\s*<[^<>]*>)+\s*$")
_SENTENCE_END = tuple("。！？.!?）)”\"」")


def detect_fragment(text: str, min_chars: int) -> Optional[str]:
    # Trailing markup is not the end of the prose (that is the html detector's business).
    stripped = _TRAILING_TAGS.sub("", text).strip()
    length = sum(1 for c in stripped if not c.isspace())
    if length < min_chars:
        return f"{length} chars"
    if not stripped.endswith(_SENTENCE_END):
        return f"ends with {stripped[-8:]!r}"
    return None


# ---------------------------------------------------------------------------------------- duplicates


def find_duplicates(texts: Sequence[tuple[str, str]], threshold: float, shingle_size: int,
                    num_perm: int) -> list[tuple[Optional[str], Optional[str]]]:
    """(exact_dup evidence, near_dup evidence) for each (id, text), in order: exact copies by the
    normalised-text key, near copies by MinHash clusters over character shingles
    (`lmsmith.data.minhash`); the first of a group of copies is never flagged."""
    found: list[tuple[Optional[str], Optional[str]]] = [(None, None)] * len(texts)
    first_of: dict[str, str] = {}
    unique: list[int] = []
    for position, (key, text) in enumerate(texts):
        digest = dedup_key(text)
        if digest in first_of:
            found[position] = (f"same text as {first_of[digest]}", None)
        else:
            first_of[digest] = key
            unique.append(position)
    if len(unique) < 2:
        return found
    hasher = MinHasher(num_perm, "char", char_ngram=shingle_size)
    signatures = hasher.signatures([texts[position][1] for position in unique])
    with NearDupIndex(threshold, num_perm) as index:
        index.add(signatures)
        keeper = index.clusters().keeper
    for row, kept in enumerate(keeper.tolist()):
        if kept != row:
            similarity = float(estimated_jaccard(signatures[row:row + 1], signatures[kept:kept + 1])[0])
            found[unique[row]] = (None, f"~{similarity:.2f} Jaccard with {texts[unique[kept]][0]} (same cluster)")
    return found


def run_detectors(
    rows: Sequence[dict[str, Any]],
    fragment_min_chars: int,
    near_dup_threshold: float,
    shingle_size: int,
    num_perm: int,
    description: str,
) -> list[dict[str, str]]:
    """For every row, detector name → evidence for each detector that fires (an empty dict: clean).

    Duplicates are looked for within each kind (corpus, instructions) separately.
    """
    text_checks: dict[str, Callable[[str], Optional[str]]] = {
        "html": detect_html,
        "pii": detect_pii,
        "mixed_numbers": detect_mixed_numbers,
        "boilerplate": detect_boilerplate,
    }
    verdicts: list[dict[str, str]] = []
    by_kind: dict[str, list[int]] = {}
    with track(description, total=len(rows)) as bar:
        for index, row in enumerate(rows):
            text, kind = row_text(row), row_kind(row)
            found: dict[str, str] = {}
            for name, check in text_checks.items():
                evidence = check(text)
                if evidence is not None:
                    found[name] = evidence
            if kind == "corpus":
                evidence = detect_fragment(text, fragment_min_chars)
                if evidence is not None:
                    found["fragment"] = evidence
            by_kind.setdefault(kind, []).append(index)
            verdicts.append(found)
            bar.advance()
    for positions in by_kind.values():
        pairs = [(str(rows[i].get("id", i)), row_text(rows[i])) for i in positions]
        for i, (exact, near) in zip(positions, find_duplicates(pairs, near_dup_threshold, shingle_size, num_perm)):
            if exact:
                verdicts[i]["exact_dup"] = exact
            if near:
                verdicts[i]["near_dup"] = near
    return verdicts
