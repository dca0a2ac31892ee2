"""Noise detectors for the quality report: each looks at a text and says whether (and why) it is noisy.

They are written apart from the cleaning operators on purpose: the report measures what cleaning left
behind, so it must not share the operators' blind spots. Python's `re` does the pattern work and
`datasketch` (MinHash LSH over character shingles) finds near duplicates.

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

import hashlib
import re
import unicodedata
from typing import Any, Callable, Optional, Sequence

from lmsmith.console import track
from lmsmith.data.quality_resources import kind_of, text_of

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

_NOT_ALNUM = re.compile(r"[\W_]+")


def normalised(text: str) -> str:
    """Case, width, punctuation and whitespace folded away (what "the same text" means here)."""
    return _NOT_ALNUM.sub("", unicodedata.normalize("NFKC", text).casefold())


def shingles(text: str, size: int) -> set[bytes]:
    """Character `size`-grams of the normalised text (characters, so Chinese needs no segmenter)."""
    folded = normalised(text)
    if len(folded) <= size:
        return {folded.encode("utf-8")}
    return {folded[i:i + size].encode("utf-8") for i in range(len(folded) - size + 1)}


class DuplicateFinder:
    """Exact duplicates by normalised hash, near duplicates by MinHash LSH (datasketch).

    Texts are checked in order and each is compared with those seen before it, so the first of a
    group of copies is never flagged.
    """

    def __init__(self, threshold: float, shingle_size: int, num_perm: int, seed: int = 1):
        from datasketch import MinHash, MinHashLSH

        self._minhash = MinHash
        self._num_perm = num_perm
        self._seed = seed
        self._shingle_size = shingle_size
        self._threshold = threshold
        self._lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self._signatures: dict[str, Any] = {}
        self._exact: dict[str, str] = {}

    def check(self, key: str, text: str) -> tuple[Optional[str], Optional[str]]:
        """(exact_dup evidence, near_dup evidence) for this text; then remember it."""
        if key in self._signatures:
            key = f"{key}@{len(self._signatures)}"  # two rows share an id; LSH keys must be unique
        digest = hashlib.sha1(normalised(text).encode("utf-8")).hexdigest()
        if digest in self._exact:
            return f"same text as {self._exact[digest]}", None
        self._exact[digest] = key
        signature = self._minhash(num_perm=self._num_perm, seed=self._seed)
        signature.update_batch(list(shingles(text, self._shingle_size)))
        near = None
        best = 0.0
        for other in self._lsh.query(signature):
            similarity = signature.jaccard(self._signatures[other])
            if similarity >= self._threshold and similarity > best:
                best, near = similarity, f"~{similarity:.2f} Jaccard with {other}"
        self._lsh.insert(key, signature)
        self._signatures[key] = signature
        return None, near


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
    finders: dict[str, DuplicateFinder] = {}
    verdicts: list[dict[str, str]] = []
    with track(description, total=len(rows)) as bar:
        for index, row in enumerate(rows):
            text, kind = text_of(row), kind_of(row)
            found: dict[str, str] = {}
            for name, check in text_checks.items():
                evidence = check(text)
                if evidence is not None:
                    found[name] = evidence
            if kind == "corpus":
                evidence = detect_fragment(text, fragment_min_chars)
                if evidence is not None:
                    found["fragment"] = evidence
            finder = finders.get(kind)
            if finder is None:
                finder = finders[kind] = DuplicateFinder(near_dup_threshold, shingle_size, num_perm)
            exact, near = finder.check(str(row.get("id", index)), text)
            if exact:
                found["exact_dup"] = exact
            if near:
                found["near_dup"] = near
            verdicts.append(found)
            bar.advance()
    return verdicts
