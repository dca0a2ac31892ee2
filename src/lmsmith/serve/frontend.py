"""Everything between an API route and a generation client: model check, response cache, long documents,
and the per-request metrics.

A route calls `Frontend.open(request, long_doc, endpoint)` and gets an `AsyncIterator[Chunk]`; whether the
answer came from the cache (replayed, also as SSE), from one engine call, or from a map-reduce over a long
document is invisible to it. Anything the request gets wrong raises a `ClientError` here, before a byte is
sent, so the route can still answer with the right HTTP status.
"""

from __future__ import annotations

import logging
from typing import AsyncIterator

from lmsmith.serve.cache import CACHEABLE_FINISH_REASONS, CachedAnswer, ResponseCache, cache_key, is_deterministic
from lmsmith.serve.client import ClientError, ContextLengthExceeded, GenerateRequest, ModelClient, Prepared
from lmsmith.serve.config import LongDocConfig, LongDocSettings
from lmsmith.serve.engine import Chunk
from lmsmith.serve.long_doc import LongDocRun
from lmsmith.serve.metrics import RequestTimer, ServeMetrics

log = logging.getLogger("lmsmith.serve")


class Frontend:
    def __init__(self, client: ModelClient, metrics: ServeMetrics, cache: ResponseCache | None = None,
                 long_doc: LongDocConfig | None = None):
        self.client = client
        self.metrics = metrics
        self.cache = cache
        self.long_doc = long_doc or LongDocConfig()

    def long_doc_defaults(self) -> LongDocSettings:
        return LongDocSettings.model_validate(self.long_doc.model_dump(include=set(LongDocSettings.model_fields)))

    async def open(self, request: GenerateRequest, long_doc: LongDocSettings | None,
                   endpoint: str) -> AsyncIterator[Chunk]:
        """The answer's chunks; the last carries the finish reason and the usage."""
        timer = RequestTimer(self.metrics, endpoint, request.model)
        self.client.check_model(request.model)
        key = None
        if self.cache is not None and is_deterministic(request):
            key = cache_key(request, long_doc)
            hit = await self._cache_get(key)
            if hit is not None:
                return self._measured(_replay(hit), timer, key=None)
        structured = request.tools is not None or request.params.grammar is not None
        if long_doc is not None and (request.wants_logprobs or request.prompt_ids is not None or structured):
            raise ClientError("long_doc: a map-reduce answer has no logprobs, no tools or response_format, and "
                              "needs a text prompt", "long_doc")
        if long_doc is None:
            prepared = await self.client.prepare(request)
            # Logprobs belong to the prompt as sent, and a structure to the whole answer, so such a request is
            # never cut into a map-reduce.
            if not (request.wants_logprobs or structured) and request.prompt_ids is None \
                    and self._over_long_doc_threshold(prepared):
                long_doc = self.long_doc_defaults()
            else:
                self.check_fits(prepared)
                return self._measured(await self.client.open(prepared), timer, key)
        return self._measured(await self._open_long_doc(request, long_doc), timer, key)

    # ----- long documents -----

    def _over_long_doc_threshold(self, prepared: Prepared) -> bool:
        tokens, window = prepared.prompt_tokens, self.client.context_window
        if not self.long_doc.auto or tokens is None:
            return False
        over_window = window is not None and tokens >= window
        over_size = self.long_doc.max_input_tokens is not None and tokens > self.long_doc.max_input_tokens
        return over_window or over_size

    async def _open_long_doc(self, request: GenerateRequest, settings: LongDocSettings) -> AsyncIterator[Chunk]:
        tokenizer = self.client.tokenizer
        if tokenizer is None:
            raise ClientError("long_doc needs a tokenizer to cut the document; in upstream mode start the "
                              "server with --tokenizer", "long_doc")
        run = LongDocRun(self.client, settings, tokenizer, self.check_fits)
        stream = await run.open(request)
        self.metrics.long_doc_requests.inc()
        self.metrics.long_doc_chunks.inc(len(run.windows))
        return stream

    def check_fits(self, prepared: Prepared) -> None:
        tokens, window = prepared.prompt_tokens, self.client.context_window
        if tokens is not None and window is not None and tokens >= window:
            raise ContextLengthExceeded(tokens, window, "messages" if prepared.request.messages is not None else "prompt")

    # ----- cache -----

    async def _cache_get(self, key: str) -> CachedAnswer | None:
        assert self.cache is not None
        try:
            hit = await self.cache.get(key)
        except Exception as exc:  # an unreachable cache costs speed, never the answer
            log.warning("response cache lookup failed: %s", exc)
            self.metrics.cache_errors.labels(self.cache.backend).inc()
            return None
        (self.metrics.cache_hits if hit is not None else self.metrics.cache_misses).labels(self.cache.backend).inc()
        return hit

    async def _cache_put(self, key: str, answer: CachedAnswer) -> None:
        assert self.cache is not None
        try:
            await self.cache.put(key, answer)
        except Exception as exc:
            log.warning("response cache store failed: %s", exc)
            self.metrics.cache_errors.labels(self.cache.backend).inc()

    # ----- measuring -----

    async def _measured(self, source: AsyncIterator[Chunk], timer: RequestTimer, key: str | None) -> AsyncIterator[Chunk]:
        """Pass chunks through, timing them; store the whole answer in the cache when it completes."""
        parts: list[str] = []
        finished = False
        try:
            async for chunk in source:
                if chunk.text:
                    timer.on_text()
                    parts.append(chunk.text)
                if chunk.finish_reason is not None:
                    finished = True
                    timer.on_finish(chunk.finish_reason, chunk.prompt_tokens, chunk.completion_tokens)
                    if key is not None and chunk.finish_reason in CACHEABLE_FINISH_REASONS:
                        await self._cache_put(key, CachedAnswer(
                            "".join(parts), chunk.finish_reason, chunk.prompt_tokens, chunk.completion_tokens
                        ))
                yield chunk
        finally:
            if not finished:
                timer.metrics.requests.labels(timer.endpoint, timer.model, "cancelled").inc()
            await source.aclose()


async def _replay(answer: CachedAnswer) -> AsyncIterator[Chunk]:
    if answer.text:
        yield Chunk(answer.text, answer.prompt_tokens, answer.completion_tokens)
    yield Chunk("", answer.prompt_tokens, answer.completion_tokens, answer.finish_reason)
