"""Extend an existing tokenizer with domain vocabulary, and grow a model's embeddings to match.

Terms come from a list file or are mined from the corpus: jieba segments the text into words, and the
most frequent ones that the tokenizer still splits into several tokens are added (HF `tokenizers`
added tokens, matched before pre-tokenization, so transformers' Qwen2Tokenizer keeps them). Each new
embedding row starts as the mean of the rows of the sub-tokens the old tokenizer used for the term,
so the model begins by reading the new token roughly as it read its pieces.
"""

from __future__ import annotations

import copy
import logging
import re
from collections import Counter
from pathlib import Path
from typing import Iterable

from lmsmith.console import track
from lmsmith.errors import UserError

# A mined term must contain a letter or CJK character: numbers stay split into digits on purpose, and
# punctuation runs are not vocabulary.
_WORDLIKE = re.compile(r"[^\W\d_]", re.UNICODE)


def read_term_list(path: str | Path) -> list[str]:
    """One term per line; blank lines and lines starting with # are skipped; duplicates dropped."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: term list not found")
    terms: list[str] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        term = line.strip()
        if not term or term.startswith("#"):
            continue
        if any(character.isspace() for character in term):
            raise UserError(f"{path}:{number}: a term may not contain whitespace: {term!r}")
        if term not in terms:
            terms.append(term)
    return terms


def is_single_token(tokenizer, term: str) -> bool:
    return len(tokenizer(term, add_special_tokens=False)["input_ids"]) == 1


def mine_terms(
    tokenizer, texts: Iterable[str], top_k: int, min_count: int, min_chars: int = 2
) -> list[tuple[str, int]]:
    """(term, count) for the `top_k` most frequent jieba words seen at least `min_count` times that
    the tokenizer does not already encode as one token; most frequent first, ties alphabetical."""
    import jieba

    jieba.setLogLevel(logging.WARNING)  # jieba prints its dictionary loading otherwise
    texts = list(texts)
    counts: Counter[str] = Counter()
    with track("segment corpus (jieba)", total=len(texts)) as progress:
        for text in texts:
            counts.update(
                word
                for word in jieba.lcut(text)
                if len(word) >= min_chars and not any(c.isspace() for c in word) and _WORDLIKE.search(word)
            )
            progress.advance()
    frequent = sorted((item for item in counts.items() if item[1] >= min_count), key=lambda item: (-item[1], item[0]))
    mined = []
    for term, count in frequent:
        if len(mined) == top_k:
            break
        if not is_single_token(tokenizer, term):
            mined.append((term, count))
    return mined


def extend_tokenizer(tokenizer, terms: Iterable[str]):
    """(a copy of `tokenizer` with `terms` added as tokens, the terms actually added, in id order).

    Terms already encoded as a single token are skipped.
    """
    from tokenizers import AddedToken

    extended = copy.deepcopy(tokenizer)
    new_terms = [term for term in dict.fromkeys(terms) if not is_single_token(tokenizer, term)]
    # normalized=True: matched on NFC text like the rest; not special, so decoding keeps them.
    extended.add_tokens([AddedToken(term, normalized=True, special=False) for term in new_terms])
    return extended, new_terms


def extend_model_embeddings(model, old_tokenizer, new_tokenizer, new_tokens: list[str]) -> None:
    """Grow `model`'s input (and untied output) embeddings to `new_tokenizer`, in place; the row of
    each new token is the mean of the rows of the old tokenizer's pieces of it."""
    import torch

    rows_needed = len(new_tokenizer)
    plan = []
    for token in new_tokens:
        new_id = new_tokenizer.convert_tokens_to_ids(token)
        pieces = old_tokenizer(token, add_special_tokens=False)["input_ids"]
        if new_id is None or not pieces:
            raise UserError(f"extend: token {token!r} is missing from the new tokenizer or empty")
        plan.append((new_id, pieces))
    if model.get_input_embeddings().num_embeddings < rows_needed:
        # Plain resize (no mean/covariance init): the rows are set right below.
        model.resize_token_embeddings(rows_needed, mean_resizing=False)
    matrices = [model.get_input_embeddings().weight]
    head = model.get_output_embeddings()
    if head is not None and head.weight is not matrices[0]:
        matrices.append(head.weight)
    with torch.no_grad():
        for weight in matrices:
            for new_id, pieces in plan:
                weight[new_id] = weight[pieces].mean(dim=0)
    model.config.vocab_size = model.get_input_embeddings().num_embeddings
