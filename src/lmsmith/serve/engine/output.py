"""The consumer's half of a request: the engine's token deltas in, text chunks out.

It runs wherever the request is consumed (the event loop for `Engine.stream`, the caller's thread for
`stream_sync`), never on the engine thread, so decoding text and matching stop strings never lengthen
an engine step. The tokenizer (HF `tokenizers`) does the decoding, through `lmsmith.serve.text`.
"""

from __future__ import annotations

from typing import Any

from lmsmith.serve.engine.request import Chunk, PromptLogprobs, TokenDelta, TokenLogprob
from lmsmith.serve.text import IncrementalDetokenizer, StopStringFilter


class TextAssembler:
    """A request's token deltas in, text chunks out: detokenizing and stop strings, off the engine thread.

    `feed` returns the chunk to send (None while text is held back). A chunk with a finish reason ends
    the request; when the reason comes from a stop string (`stopped_early`), the engine has not ended the
    sequence yet and the caller must tell it to (`Sequence.cancel("stop")`). Token logprobs travel with
    the chunk that releases their text; an end-of-sequence token is not text, so its logprob is not
    reported, nor are those of tokens after a stop string.
    """

    def __init__(self, tokenizer: Any, stop: tuple[str, ...] | list[str]):
        self._detokenizer = IncrementalDetokenizer(tokenizer)
        self._stops = StopStringFilter(stop)
        self.stopped_early = False
        self._logprobs: list[TokenLogprob] = []
        self._prompt_logprobs: PromptLogprobs | None = None

    def feed(self, delta: TokenDelta) -> Chunk | None:
        prompt, completion, reason = delta.prompt_tokens, delta.completion_tokens, delta.finish_reason
        if delta.prompt_logprobs is not None:
            self._prompt_logprobs = delta.prompt_logprobs
        if reason == "cancelled" or delta.token_id is None:
            return self._chunk("", prompt, completion, reason or "cancelled")
        if reason == "stop":  # an end-of-sequence token: not text; release what is held
            text = self._stops.feed(self._detokenizer.flush())
            return self._chunk(text + self._stops.flush(), prompt, completion, "stop")
        if delta.logprob is not None and not self._stops.stopped:
            self._logprobs.append(delta.logprob)
        text = self._stops.feed(self._detokenizer.push(delta.token_id))
        if self._stops.stopped:
            self.stopped_early = reason is None
            return self._chunk(text, prompt, completion, "stop")
        if reason is not None:  # "length": the last token is text; so is whatever was held back
            text += self._stops.feed(self._detokenizer.flush())
            final = "stop" if self._stops.stopped else reason
            return self._chunk(text + self._stops.flush(), prompt, completion, final)
        return self._chunk(text, prompt, completion) if text else None

    def _chunk(self, text: str, prompt: int, completion: int, reason: str | None = None) -> Chunk:
        logprobs, self._logprobs = tuple(self._logprobs), []
        prompt_logprobs, self._prompt_logprobs = self._prompt_logprobs, None
        return Chunk(text, prompt, completion, reason, logprobs, prompt_logprobs)
