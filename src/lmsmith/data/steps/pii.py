"""Number-shaped personal data that can be told from amounts by its checksum: mainland resident ID
numbers (GB 11643 mod-11 check digit) and bank card numbers (Luhn). Standard-library `re` only.

A candidate that fails its checksum is left alone: a 16-digit amount is far likelier than a typo'd card.
"""

from __future__ import annotations

import re
from datetime import date

_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_CHECK = "10X98765432"
_ID_NUMBER = re.compile(r"(?<![0-9A-Za-z])\d{17}[\dXx](?![0-9A-Za-z])")
# 13-19 digits, optionally grouped by single spaces or dashes, starting like a card (3 Amex, 4 Visa,
# 5 Mastercard, 6 UnionPay); not part of a decimal, an amount or a longer number.
_CARD = re.compile(r"(?<![\d.])[3-6]\d{2,3}(?:[ -]?\d){9,15}(?![\d]|\.\d|\s*(?:元|亿|万|%|yuan|RMB))")


def id_check_digit(first17: str) -> str:
    return _ID_CHECK[sum(int(d) * w for d, w in zip(first17, _ID_WEIGHTS)) % 11]


def is_valid_id_number(number: str) -> bool:
    """An 18-character resident ID: a real birth date at positions 7-14 and the right check digit."""
    if len(number) != 18 or not number[:17].isdigit():
        return False
    try:
        born = date(int(number[6:10]), int(number[10:12]), int(number[12:14]))
    except ValueError:
        return False
    return 1900 <= born.year <= date.today().year and id_check_digit(number[:17]) == number[17].upper()


def luhn_valid(digits: str) -> bool:
    total = 0
    for index, char in enumerate(reversed(digits)):
        value = int(char)
        if index % 2 == 1:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def luhn_check_digit(body: str) -> str:
    """The digit that makes `body + digit` pass Luhn."""
    return str(next(d for d in range(10) if luhn_valid(f"{body}{d}")))


def mask_id_numbers(text: str, token: str) -> str:
    return _ID_NUMBER.sub(lambda m: token if is_valid_id_number(m.group(0)) else m.group(0), text)


def mask_bank_cards(text: str, token: str) -> str:
    def replace(match: re.Match) -> str:
        digits = re.sub(r"[ -]", "", match.group(0))
        return token if 13 <= len(digits) <= 19 and luhn_valid(digits) else match.group(0)

    return _CARD.sub(replace, text)
