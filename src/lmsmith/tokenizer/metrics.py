"""How well a tokenizer fits a text domain: fertility (tokens per character) and unknown-token rate."""

from __future__ import annotations


def _token_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []


def fertility(tokenizer, texts: list[str]) -> float | None:
    """Tokens per character over `texts` (lower means the vocabulary fits the domain better)."""
    characters = sum(len(text) for text in texts)
    if characters == 0:
        return None
    return sum(len(ids) for ids in _token_ids(tokenizer, texts)) / characters


def unk_rate(tokenizer, texts: list[str]) -> float | None:
    """Share of tokens that are the unknown token (always 0 for byte-level BPE)."""
    encoded = _token_ids(tokenizer, texts)
    tokens = sum(len(ids) for ids in encoded)
    if tokens == 0:
        return None
    unk = tokenizer.unk_token_id
    if unk is None:
        return 0.0
    return sum(ids.count(unk) for ids in encoded) / tokens


def fit_report(tokenizer, texts: list[str]) -> dict[str, float | None]:
    """`fertility` and `unk_rate` over `texts`, rounded for a manifest."""
    values = {"fertility": fertility(tokenizer, texts), "unk_rate": unk_rate(tokenizer, texts)}
    return {name: (round(value, 5) if value is not None else None) for name, value in values.items()}
