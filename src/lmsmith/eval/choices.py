"""Multiple choice by generation: which option letter a free-text answer states, and how often none is.

Chinese and English answers state their choice in many ways ("答案是C", "选C。", "应选A", "故选 B",
"The answer is (B)", "Option D"). `extract_choice` reads only such statements, and when several are made
the last one wins ("答案是A……不对，答案应该是D" is D). Letters that are part of a word never count, so
"CPA考试中…答案：B" is B, not C (OpenCompass' `first_capital_postprocess` reads it as C). Without any
statement, a reply that names exactly one standalone letter ("B", "（C）", "D. 12.5亿元") is that letter;
one that names several ("C和D都不对") is an extraction failure, counted, never guessed. Plain `re` and
`unicodedata` do the work.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

LETTERS = "ABCD"


@lru_cache(maxsize=16)
def _patterns(letters: str) -> tuple[re.Pattern, re.Pattern]:
    letter = f"(?P<letter>[{re.escape(letters)}])(?![A-Za-z])"
    opening = r"[\s:：]*[\(（【\[「]?\s*"
    statements = [
        # 答案是C / 正确答案为：C / 答案应该是 D / 答案选B
        r"答案\s*(?:应该|应当|应|就|即|则)?\s*(?:是|为|选|选择)?" + opening + letter,
        # 应选A / 故选B / 选择 C / 选项D正确 / 我选C, but not 排除选项A / 不选B
        r"(?<!排除)(?<!不)(?<!非)(?:选择|选项|选)" + opening + letter,
        # the answer is (B) / Answer: C / answer would be D
        r"(?i:answer)\s*(?i:is|would\s+be|should\s+be|=)?" + opening + letter,
        # option C / choice (D)
        r"(?i:option|choice)" + opening + letter,
    ]
    statement = re.compile("|".join(f"(?:{p})" for p in statements).replace("(?P<letter>", "(?:"))
    # Named groups cannot repeat across alternatives, so the letter is found again inside each match.
    standalone = re.compile(rf"(?<![A-Za-z]){letter}")
    return statement, standalone


def _normalize(text: str) -> str:
    # Full-width letters and punctuation (Ｃ, ：) become ASCII, so one set of patterns reads both.
    return unicodedata.normalize("NFKC", text)


def extract_choice(text: str, letters: str = LETTERS) -> str | None:
    """The option letter `text` states (the last statement wins), or None when it states none."""
    text = _normalize(text)
    statement, standalone = _patterns(letters)
    found = [match.group(0) for match in statement.finditer(text)]
    if found:
        return standalone.findall(found[-1])[-1]
    named = set(standalone.findall(text))
    return named.pop() if len(named) == 1 else None


@dataclass(frozen=True)
class ChoiceScores:
    """Accuracy over all items (a failure counts as wrong), the extraction-failure rate and how often
    each letter was given: a model that always answers A shows here, not only in its accuracy."""

    accuracy: float
    failure_rate: float
    letters: dict[str, int]
    items: int

    def as_dict(self) -> dict:
        return {"acc": self.accuracy, "extraction_failure_rate": self.failure_rate,
                "letter_distribution": self.letters, "items": self.items}


def score_choices(answers: Sequence[str], gold: Sequence[str], letters: str = LETTERS) -> ChoiceScores:
    """Score free-text answers against gold letters (0–100 scale for both rates)."""
    if len(answers) != len(gold):
        raise ValueError(f"{len(answers)} answers but {len(gold)} gold letters")
    picked = [extract_choice(answer, letters) for answer in answers]
    correct = sum(p is not None and p == g.strip().upper() for p, g in zip(picked, gold))
    failures = sum(p is None for p in picked)
    counts = Counter(p for p in picked if p is not None)
    n = len(answers)
    return ChoiceScores(
        accuracy=100.0 * correct / n if n else 0.0,
        failure_rate=100.0 * failures / n if n else 0.0,
        letters={letter: counts.get(letter, 0) for letter in letters},
        items=n,
    )
