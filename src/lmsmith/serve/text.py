"""Turning a growing list of token ids into text deltas that are safe to send.

The tokenizer (HF `tokenizers`, via `tokenizer.decode`) does the decoding. Byte-level BPE splits one
Chinese character over several tokens, so decoding a token on its own yields U+FFFD; the detokenizer
holds text back until the bytes complete a character. Stop strings are matched on the text, holding back
any tail that could still grow into a stop string, so a client never sees part of one.
"""

from __future__ import annotations

from typing import Any

_INCOMPLETE = "\ufffd"


class IncrementalDetokenizer:
    """Decode tokens one at a time; each `push` returns only whole characters not returned before.

    Decoding re-reads a short window (from the last point where the text was complete) rather than the
    whole output, so the cost per token stays flat however long the answer grows. The concatenation of
    all pushes and the final `flush` equals `tokenizer.decode(all_ids, skip_special_tokens=True)`.
    """

    def __init__(self, tokenizer: Any):
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._window_start = 0  # ids before it are fully emitted and end on a character boundary
        self._emitted_until = 0  # ids before it have had their text emitted

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        emitted_text = self._decode(self._ids[self._window_start:self._emitted_until])
        window_text = self._decode(self._ids[self._window_start:])
        if len(window_text) <= len(emitted_text) or window_text.endswith(_INCOMPLETE):
            return ""
        self._window_start = self._emitted_until
        self._emitted_until = len(self._ids)
        return window_text[len(emitted_text):]

    def flush(self) -> str:
        """Whatever is held back, even an unfinished character (the answer is over)."""
        emitted_text = self._decode(self._ids[self._window_start:self._emitted_until])
        window_text = self._decode(self._ids[self._window_start:])
        self._window_start = self._emitted_until = len(self._ids)
        return window_text[len(emitted_text):]


class StopStringFilter:
    """Pass text through until a stop string appears; the stop string and what follows are dropped."""

    def __init__(self, stops: tuple[str, ...] | list[str]):
        self._stops = tuple(stop for stop in stops if stop)
        self._held = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """The part of `text` (plus anything held before) that is safe to emit now."""
        if self.stopped:
            return ""
        if not self._stops:
            return text
        buffer = self._held + text
        hits = [index for index in (buffer.find(stop) for stop in self._stops) if index >= 0]
        if hits:
            self.stopped = True
            self._held = ""
            return buffer[: min(hits)]
        keep = self._longest_stop_prefix_suffix(buffer)
        self._held = buffer[len(buffer) - keep:]
        return buffer[: len(buffer) - keep]

    def flush(self) -> str:
        """Release held text when the answer ends for another reason (eos, length)."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _longest_stop_prefix_suffix(self, buffer: str) -> int:
        """Length of the longest tail of `buffer` that a stop string starts with."""
        longest = 0
        for stop in self._stops:
            for size in range(min(len(stop) - 1, len(buffer)), longest, -1):
                if stop.startswith(buffer[len(buffer) - size:]):
                    longest = size
                    break
        return longest

