"""Token logprobs in OpenAI's two shapes, from the engine's `TokenLogprob`s and the tokenizer (HF `tokenizers`).

- `/v1/completions` (the legacy shape lm-evaluation-harness reads): parallel lists `tokens`,
  `token_logprobs`, `top_logprobs` (a {token: logprob} dict per position, the chosen token included) and
  `text_offset`, the character where each token starts in the returned text.
- `/v1/chat/completions`: `{"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}`.

A token's string is its own decoding. Byte-level BPE splits a Chinese character over several tokens,
and such a piece decodes to U+FFFD on its own; `bytes` (chat) and `text_offset` (completions) stay
exact: offsets come from the tokenizer's offset mapping for a text prompt, and for ids from decoding
growing prefixes, a token that completes a character starting where the character starts.
"""

from __future__ import annotations

from typing import Any, Sequence

from lmsmith.serve.engine.request import TokenLogprob

_INCOMPLETE = "\ufffd"


class TokenStrings:
    """Each token id's own text, decoded once per id."""

    def __init__(self, tokenizer: Any):
        self._tokenizer = tokenizer
        self._known: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._known.get(token_id)
        if text is None:
            text = self._tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            self._known[token_id] = text
        return text


def decoded_offsets(tokenizer: Any, ids: Sequence[int], skip_special_tokens: bool = True) -> list[int]:
    """Where each token's text starts in `tokenizer.decode(ids)`.

    Decodes a short window since the last character boundary, so the cost stays linear in the length.
    """
    offsets: list[int] = []
    done = 0  # characters of the text before `window`
    window = 0  # first id of the window; ids before it decode to whole characters
    for index in range(len(ids)):
        text = tokenizer.decode(list(ids[window:index]), skip_special_tokens=skip_special_tokens,
                                clean_up_tokenization_spaces=False)
        if text.endswith(_INCOMPLETE):
            offsets.append(done + len(text.rstrip(_INCOMPLETE)))
            continue
        done += len(text)
        window = index
        offsets.append(done)
    return offsets


def text_token_offsets(tokenizer: Any, text: str) -> tuple[list[int], list[int]]:
    """The ids the engine gets for a text prompt and each one's start in `text` (the tokenizer's offset mapping)."""
    encoded = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    return [int(i) for i in encoded["input_ids"]], [int(start) for start, _ in encoded["offset_mapping"]]


class CompletionLogprobs:
    """Builds the completions-shaped logprobs of one choice, piece by piece (streamed) or whole."""

    def __init__(self, tokenizer: Any):
        self._tokenizer = tokenizer
        self._strings = TokenStrings(tokenizer)

    def body(self, ids: Sequence[int], entries: Sequence[TokenLogprob | None], offsets: Sequence[int]) -> dict[str, Any]:
        strings = [self._strings(token) for token in ids]
        return {
            "tokens": strings,
            "token_logprobs": [None if entry is None else entry.logprob for entry in entries],
            "top_logprobs": [None if entry is None else self._top(entry) for entry in entries],
            "text_offset": list(offsets),
        }

    def _top(self, entry: TokenLogprob) -> dict[str, float]:
        # Tokens that decode alike (pieces of one character all read U+FFFD) share a key: the best value
        # stands, so a greedy choice still equals max(top_logprobs) as lm-eval checks.
        top: dict[str, float] = {}
        for token, value in (*entry.top, (entry.token_id, entry.logprob)):  # the chosen token is always listed
            key = self._strings(token)
            top[key] = max(value, top.get(key, value))
        return top

    def prompt(self, prompt: str | list[int], entries: Sequence[TokenLogprob | None]) -> dict[str, Any]:
        """The echoed prompt's part: entries[0] is None (nothing comes before the first token)."""
        if isinstance(prompt, str):
            ids, offsets = text_token_offsets(self._tokenizer, prompt)
        else:
            ids = list(prompt)
            offsets = decoded_offsets(self._tokenizer, ids)
        if len(ids) != len(entries) or any(e is not None and e.token_id != t for e, t in zip(entries, ids)):
            ids = [ids[0] if ids else 0] + [entry.token_id for entry in entries[1:] if entry is not None]
            offsets = decoded_offsets(self._tokenizer, ids)
        return self.body(ids, entries, offsets)

    def generated(self, entries: Sequence[TokenLogprob], base_offset: int) -> dict[str, Any]:
        ids = [entry.token_id for entry in entries]
        offsets = [base_offset + offset for offset in decoded_offsets(self._tokenizer, ids)]
        return self.body(ids, entries, offsets)


def join_completion_logprobs(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    joined: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for part in parts:
        for key, values in joined.items():
            values.extend(part[key])
    return joined


class ChatLogprobs:
    """The chat-shaped logprobs of generated tokens."""

    def __init__(self, tokenizer: Any, top: int):
        self._strings = TokenStrings(tokenizer)
        self._top = top

    def _item(self, token_id: int, logprob: float) -> dict[str, Any]:
        text = self._strings(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    def content(self, entries: Sequence[TokenLogprob]) -> list[dict[str, Any]]:
        return [
            self._item(entry.token_id, entry.logprob)
            | {"top_logprobs": [self._item(token, value) for token, value in entry.top[:self._top]]}
            for entry in entries
        ]
