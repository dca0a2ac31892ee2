"""The consumer's half of a request: the engine's token deltas in, text chunks out.

It runs wherever the request is consumed (the event loop for `Engine.stream`, the caller's thread for
`stream_sync`), never on the engine thread, so decoding text and matching stop strings never lengthen
an engine step. The tokenizer (HF `tokenizers`) does the decoding, through `lmsmith.serve.text`.
"""

from __future__ import annotations

from typing import Any

from lmsmith.serve.engine.request import Chunk, TokenDelta
from lmsmith.serve.text import IncrementalDetokenizer, StopStringFilter


class TextAssembler:
    """A request's token deltas in, text chunks out: detokenizing and stop strings, off the engine thread.

    `feed` returns the chunk to send (None while text is held back). A chunk with a finish reason ends
    the request; when the reason comes from a stop string (`stopped_early`), the engine has not ended the
    sequence yet and the caller must tell it to (`Sequence.cancel("stop")`).
    """

    def __init__(self, tokenizer: Any, stop: tuple[str, ...] | list[str]):
        self._detokenizer = IncrementalDetokenizer(tokenizer)
        self._stops = StopStringFilter(stop)
        self.stopped_early = False

    def feed(self, delta: TokenDelta) -> Chunk | None:
        prompt, completion, reason = delta.prompt_tokens, delta.completion_tokens, delta.finish_reason
        if reason == "cancelled" or delta.token_id is None:
            return Chunk("", prompt, completion, reason or "cancelled")
        if reason == "stop":  # an end-of-sequence token: not text; release what is held
            text = self._stops.feed(self._detokenizer.flush())
            return Chunk(text + self._stops.flush(), prompt, completion, "stop")
        text = self._stops.feed(self._detokenizer.push(delta.token_id))
        if self._stops.stopped:
            self.stopped_early = reason is None
            return Chunk(text, prompt, completion, "stop")
        if reason is not None:  # "length": the last token is text; so is whatever was held back
            text += self._stops.feed(self._detokenizer.flush())
            final = "stop" if self._stops.stopped else reason
            return Chunk(text + self._stops.flush(), prompt, completion, final)
        return Chunk(text, prompt, completion) if text else None
