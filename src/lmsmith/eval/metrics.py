"""Text and language-model metrics: BLEU-4, character ROUGE-L, chrF, exact match, edit rate, numeric
accuracy and perplexity.

sacrebleu computes corpus BLEU-4 with its Chinese tokenizer (`tokenize="zh"`, each CJK character a
token) and chrF. rouge-score computes ROUGE-L; its default tokenizer keeps only [a-z0-9] and so scores
Chinese as 0, hence the per-character tokenizer below. rapidfuzz counts the edits of the edit rate.
Numbers in answers are read after `lmsmith.data.steps.numbers.normalize_amounts` has written amounts in one
form (亿/万/million scales applied, thousands separators dropped, accounting negatives signed). Perplexity is the exponent of the token-weighted mean
negative log-likelihood from a causal LM's forward pass (torch). All text scores are on a 0–100 scale.
"""

from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass
from typing import Sequence

import torch

from lmsmith.generation import maybe_track


def bleu4(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU-4 (0–100) of the hypotheses against one reference each."""
    import sacrebleu

    if not hypotheses:
        return 0.0
    return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)], tokenize="zh").score)


class CharacterTokenizer:
    """rouge-score tokenizer: one token per non-space character, lower-cased, width-normalised."""

    def tokenize(self, text: str) -> list[str]:
        return [char for char in unicodedata.normalize("NFKC", text).lower() if not char.isspace()]


def rouge_l_scores(hypotheses: Sequence[str], references: Sequence[str]) -> list[float]:
    """Character-level ROUGE-L F-measure (0–100) of each hypothesis against its reference."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=CharacterTokenizer())
    return [100.0 * scorer.score(ref, hyp)["rougeL"].fmeasure for hyp, ref in zip(hypotheses, references)]


def rouge_l(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Mean character-level ROUGE-L F-measure (0–100)."""
    scores = rouge_l_scores(hypotheses, references)
    return sum(scores) / len(scores) if scores else 0.0


def chrf(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus chrF (0–100): character n-gram F-score, which needs no word segmentation."""
    import sacrebleu

    if not hypotheses:
        return 0.0
    return float(sacrebleu.corpus_chrf(list(hypotheses), [list(references)]).score)


def corpus_statistics(name: str, hypotheses: Sequence[str], references: Sequence[str]):
    """Per-answer sufficient statistics of corpus BLEU-4 or chrF, and the function from their sums to the
    score: what a bootstrap of the corpus score resamples (sacrebleu computes both halves)."""
    import numpy as np
    from sacrebleu.metrics import BLEU, CHRF

    metric = BLEU(tokenize="zh") if name == "bleu4" else CHRF()
    stats = np.asarray(metric._extract_corpus_statistics(list(hypotheses), [list(references)]), dtype=np.float64)
    return stats, lambda sums: float(metric._compute_score_from_stats([int(round(v)) for v in sums]).score)


def _plain_text(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).split())


def exact_match(hypotheses: Sequence[str], references: Sequence[str]) -> list[float]:
    """100 for each answer equal to its reference after NFKC and whitespace folding, else 0."""
    return [100.0 * (_plain_text(h) == _plain_text(r)) for h, r in zip(hypotheses, references)]


def edit_rates(hypotheses: Sequence[str], references: Sequence[str]) -> list[float]:
    """Per answer, 100 × the character edits (insertions, deletions, substitutions) that turn it into its
    reference, over the reference's length: the share of the reference a reviewer would retype, the
    proxy for the human edit rate. 0 is untouched; it can exceed 100 for a long wrong answer."""
    from rapidfuzz.distance import Levenshtein

    rates = []
    for hypothesis, reference in zip(hypotheses, references):
        hypothesis, reference = _plain_text(hypothesis), _plain_text(reference)
        rates.append(100.0 * Levenshtein.distance(hypothesis, reference) / max(1, len(reference)))
    return rates


# A number: an optional sign glued to it, digits (thousands separators already removed), optional
# decimals, and an optional percent sign after optional spaces.
_NUMBER = re.compile(r"(?P<sign>[-+])?(?P<digits>\d+(?:\.\d+)?|\.\d+)\s*(?P<percent>%)?")
# Thousands separators: a comma between a digit and exactly three digits.
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
# Words right before an unsigned number that make it a decrease ("同比下降3.2%" means -3.2%).
_DECREASE = re.compile(r"(下降|下滑|减少|降低|回落|下跌|decreased?|declined?|fell|down|drop(?:ped)?)\s*(?:了|by|of)?\s*$",
                       re.IGNORECASE)
_MINUS_SIGNS = {"\u2212": "-", "\u2012": "-", "\u2013": "-", "\u2014": "-", "\ufe63": "-"}


def normalize_numeric_text(text: str) -> str:
    """Full-width to ASCII (NFKC), unicode minus signs to '-', amounts in one form (scales applied,
    accounting negatives signed), remaining thousands separators dropped."""
    from lmsmith.data.steps.numbers import normalize_amounts

    text = unicodedata.normalize("NFKC", text)
    for minus, ascii_minus in _MINUS_SIGNS.items():
        text = text.replace(minus, ascii_minus)
    return _THOUSANDS.sub("", normalize_amounts(text))


def extract_number(text: str) -> float | None:
    """The answer's number: the last percentage if there is one, else the last number, in base units
    (`1.2亿元` is 120000000, `(1,234)` is -1234, `3.5 million` is 3500000).

    A sign must directly precede the number ("增长-3.2%"); a hyphen glued to a preceding digit or
    letter is a range or a dash, not a sign ("2022-2023"). An unsigned number right after a word of
    decrease ("下降3.2%") is negative.
    """
    found = numbers_in(text)
    if not found:
        return None
    percentages = [value for value, is_percent in found if is_percent]
    return percentages[-1] if percentages else found[-1][0]


def numbers_in(text: str) -> list[tuple[float, bool]]:
    """Every number in `text` as (value in base units, whether it is a percentage), in order; the sign
    rules are `extract_number`'s."""
    text = normalize_numeric_text(text)
    found: list[tuple[float, bool]] = []
    for match in _NUMBER.finditer(text):
        value = float(match.group("digits"))
        sign = match.group("sign")
        before = text[: match.start()]
        if sign and before and before[-1].isascii() and before[-1].isalnum():
            sign = None  # "2022-2023": the hyphen joins two numbers
        if sign == "-":
            value = -value
        elif sign is None and _DECREASE.search(before[-12:]):
            value = -value
        found.append((value, match.group("percent") is not None))
    return found


def holds_number(text: str, expected: float, rel_tol: float) -> bool:
    """Whether any number in `text` equals `expected` within `rel_tol` (a passage that states the answer)."""
    return any(abs(value - expected) <= max(rel_tol * abs(expected), 0.005) for value, _ in numbers_in(text))


def numeric_match(text: str, expected: float, rel_tol: float) -> bool:
    """Whether the number extracted from `text` equals `expected` within `rel_tol` (relative).

    An absolute allowance of 0.005 covers rounding to two decimals when `expected` is near zero.
    """
    predicted = extract_number(text)
    if predicted is None:
        return False
    return abs(predicted - expected) <= max(rel_tol * abs(expected), 0.005)


@dataclass
class Perplexity:
    perplexity: float
    mean_nll: float
    tokens: int
    documents: int


def _windows(length: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, first_scored) windows covering a document so each token is scored once.

    Every window after the first overlaps the previous one by `window - stride` tokens of context.
    """
    spans = []
    scored_until = 1  # the first token has no context and is never scored
    start = 0
    while scored_until < length:
        end = min(start + window, length)
        spans.append((start, end, scored_until))
        scored_until = end
        start = max(end - (window - stride), start + 1) if end < length else end
    return spans


@torch.inference_mode()
def perplexity(
    model: torch.nn.Module,
    tokenizer,
    documents: Sequence[str],
    max_length: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    progress: str | None = None,
) -> Perplexity:
    """Token-weighted perplexity of `model` over `documents`.

    Documents longer than the model's context (`max_length`, default `max_position_embeddings`) are
    scored in windows that advance by `stride` (default half a window), so every token but a document's
    first is predicted exactly once, with at least `max_length - stride` tokens of context after the
    first window. `progress` names a progress bar that advances once per batch.
    """
    if max_length is None:
        max_length = int(getattr(getattr(model, "config", None), "max_position_embeddings", 1024))
    max_length = max(2, max_length)
    stride = min(stride or max(1, max_length // 2), max_length - 1)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    pieces: list[tuple[list[int], int]] = []  # (ids, index of the first scored token in ids)
    for text in documents:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        for start, end, first_scored in _windows(len(ids), max_length, stride):
            pieces.append((ids[start:end], first_scored - start))

    total_nll = 0.0
    total_tokens = 0
    batches = [pieces[i : i + batch_size] for i in range(0, len(pieces), batch_size)]
    with maybe_track(progress, len(batches)) as tracker:
        for chunk in batches:
            nll, tokens = _batch_nll(model, chunk, pad_id)
            total_nll += nll
            total_tokens += tokens
            if tracker is not None:
                tracker.advance(1, ppl=math.exp(total_nll / total_tokens) if total_tokens else float("nan"))
    mean_nll = total_nll / total_tokens if total_tokens else float("nan")
    return Perplexity(
        perplexity=math.exp(mean_nll) if total_tokens else float("nan"),
        mean_nll=mean_nll,
        tokens=total_tokens,
        documents=len(documents),
    )


def _batch_nll(model: torch.nn.Module, chunk: list[tuple[list[int], int]], pad_id: int) -> tuple[float, int]:
    """Summed NLL and count of the scored tokens of one right-padded batch of windows."""
    width = max(len(ids) for ids, _ in chunk)
    input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
    labels = torch.full((len(chunk), width), -100, dtype=torch.long)
    for row, (ids, first_scored) in enumerate(chunk):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
        labels[row, first_scored : len(ids)] = torch.tensor(ids[first_scored:])
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    # Position t predicts token t+1.
    targets = labels[:, 1:].reshape(-1)
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1, :].reshape(-1, logits.shape[-1]), targets, reduction="sum", ignore_index=-100
    )
    return float(nll), int((targets != -100).sum())

