"""Upstream mode: the same API, cache and metrics in front of OpenAI-compatible servers (vLLM replicas in
production, `lmsmith serve` in tests).

httpx's async client does the HTTP. Each request goes to the healthy upstream with the fewest requests
in flight (least outstanding requests; ties go round-robin), always streamed, so time to first token is
measured here too and the answer can pass through as it arrives. A connection failure (refused, reset,
or closed before the response) marks that upstream down and retries the request on another; once bytes
of an answer have been passed on, a failure ends the request instead, since it cannot be replayed. A
background task checks every upstream's `GET /v1/models` periodically, which brings a recovered upstream
back and keeps the list of models (base and adapters) each one serves.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import httpx

from lmsmith.errors import UserError
from lmsmith.serve.client import ClientError, GenerateRequest, ModelNotFound, NotReady, Prepared, UpstreamRejected
from lmsmith.serve.engine import Chunk, EngineError

log = logging.getLogger("lmsmith.serve.upstream")

HEALTH_TIMEOUT_S = 2.0
REQUEST_TIMEOUT = httpx.Timeout(connect=3.0, read=600.0, write=30.0, pool=30.0)
RETRYABLE = (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError, httpx.ReadError,
             httpx.WriteError, httpx.PoolTimeout)


def normalize_url(url: str) -> str:
    """`http://host:port`, `.../` and `.../v1` all name the same server."""
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise UserError(f"--upstream {url!r}: expected an http(s) URL")
    return url.removesuffix("/v1")


@dataclass
class Upstream:
    url: str
    healthy: bool = False
    outstanding: int = 0
    requests: int = 0
    failures: int = 0
    models: list[dict[str, Any]] = field(default_factory=list)
    last_pick: int = 0

    def serves(self, model: str) -> bool:
        return any(card.get("id") == model for card in self.models)

    def summary(self) -> dict[str, Any]:
        return {"url": self.url, "healthy": self.healthy, "outstanding": self.outstanding,
                "requests": self.requests, "failures": self.failures}


class ChunkStream:
    """The chunks of one upstream answer; closing it (early or not) releases the connection and the slot."""

    def __init__(self, chunks: AsyncIterator[Chunk], release: Any):
        self._chunks = chunks
        self._release = release
        self._released = False

    def __aiter__(self) -> "ChunkStream":
        return self

    async def __anext__(self) -> Chunk:
        try:
            return await self._chunks.__anext__()
        except httpx.HTTPError as exc:
            await self.aclose()
            log.warning("upstream failed mid-answer: %s: %s", type(exc).__name__, exc)
            raise EngineError("the upstream failed mid-answer") from None
        except BaseException:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        if not self._released:
            self._released = True
            await self._chunks.aclose()  # type: ignore[attr-defined]
            await self._release()


class UpstreamClient:
    """A pool of OpenAI-compatible servers behind one `ModelClient` interface."""

    def __init__(self, urls: list[str], health_interval_s: float = 5.0, tokenizer: Any = None):
        if not urls:
            raise UserError("--upstream: give at least one URL")
        self.upstreams = [Upstream(normalize_url(url)) for url in urls]
        self.health_interval_s = health_interval_s
        self._tokenizer = tokenizer
        self._http: httpx.AsyncClient | None = None
        self._health_task: asyncio.Task | None = None
        self._picks = itertools.count(1)
        self.created = int(time.time())

    async def start(self) -> None:
        """Open the connection pool, check every upstream once, then keep checking in the background."""
        self._http = httpx.AsyncClient(timeout=REQUEST_TIMEOUT, limits=httpx.Limits(max_connections=1024))
        await self.check_health()
        self._health_task = asyncio.create_task(self._check_periodically(), name="lmsmith-upstream-health")

    async def close(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
            await asyncio.gather(self._health_task, return_exceptions=True)
        if self._http is not None:
            await self._http.aclose()

    @property
    def http(self) -> httpx.AsyncClient:
        if self._http is None:
            raise NotReady("the upstream pool is not started")
        return self._http

    # ----- health -----

    async def check_health(self) -> None:
        await asyncio.gather(*(self._check(upstream) for upstream in self.upstreams))

    async def _check(self, upstream: Upstream) -> None:
        try:
            response = await self.http.get(f"{upstream.url}/v1/models", timeout=HEALTH_TIMEOUT_S)
            healthy = response.status_code == 200
            if healthy:
                upstream.models = list(response.json().get("data", []))
        except (httpx.HTTPError, ValueError):
            healthy = False
        if healthy != upstream.healthy:
            log.warning("upstream %s is %s", upstream.url, "up" if healthy else "down")
        upstream.healthy = healthy

    async def _check_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval_s)
            await self.check_health()

    # ----- ModelClient -----

    @property
    def ready(self) -> bool:
        return any(upstream.healthy for upstream in self.upstreams)

    @property
    def alive(self) -> bool:
        return True  # the pool itself has no thread that can die; readiness says whether upstreams answer

    @property
    def context_window(self) -> int | None:
        return None  # the upstreams check their own

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    def model_cards(self) -> list[dict[str, Any]]:
        cards: dict[str, dict[str, Any]] = {}
        for upstream in self.upstreams:
            if upstream.healthy:
                for card in upstream.models:
                    cards.setdefault(card["id"], card)
        return list(cards.values())

    def check_model(self, model: str) -> None:
        if not self.ready:
            raise NotReady("no upstream is healthy")
        if not any(upstream.healthy and upstream.serves(model) for upstream in self.upstreams):
            raise ModelNotFound(model, [card["id"] for card in self.model_cards()])

    async def prepare(self, request: GenerateRequest) -> Prepared:
        # The proxy streams text from its upstreams; what it cannot pass through is refused, not dropped.
        if request.wants_logprobs:
            raise ClientError("logprobs are not relayed by a server fronting upstreams; ask an upstream directly",
                              "logprobs")
        if request.prompt_ids is not None:
            raise ClientError("token-id prompts are not relayed by a server fronting upstreams (their "
                              "tokenizers may differ); send text", "prompt")
        if request.params.max_tokens == 0:
            raise ClientError("max_tokens 0 is not relayed by a server fronting upstreams", "max_tokens")
        if request.tools or request.params.grammar is not None:
            raise ClientError("tools and response_format are enforced by lmsmith's own engine, and a server "
                              "fronting upstreams relays text only; ask an upstream directly",
                              "tools" if request.tools else "response_format")
        return Prepared(request)  # the upstream tokenizes

    def pick(self, model: str, tried: set[str]) -> Upstream | None:
        """The healthy upstream serving `model` with the fewest requests in flight; ties: least recently picked."""
        candidates = [u for u in self.upstreams if u.healthy and u.url not in tried and u.serves(model)]
        if not candidates:
            return None
        chosen = min(candidates, key=lambda u: (u.outstanding, u.last_pick))
        chosen.last_pick = next(self._picks)
        return chosen

    async def open(self, prepared: Prepared) -> AsyncIterator[Chunk]:
        request = prepared.request
        path, body = upstream_body(request)
        tried: set[str] = set()
        while True:
            upstream = self.pick(request.model, tried)
            if upstream is None:
                raise NotReady(f"no healthy upstream could take the request (tried {len(tried)})")
            tried.add(upstream.url)
            upstream.outstanding += 1
            try:
                response = await self.http.send(
                    self.http.build_request("POST", f"{upstream.url}{path}", json=body), stream=True
                )
            except RETRYABLE as exc:
                upstream.outstanding -= 1
                upstream.failures += 1
                upstream.healthy = False  # until the next health check says otherwise
                log.warning("upstream %s failed (%s); retrying elsewhere", upstream.url, type(exc).__name__)
                continue
            except BaseException:
                upstream.outstanding -= 1
                raise
            upstream.requests += 1
            if response.status_code != 200:
                await response.aread()
                await response.aclose()
                upstream.outstanding -= 1
                raise _rejection(response)

            async def release(upstream: Upstream = upstream, response: httpx.Response = response) -> None:
                upstream.outstanding -= 1
                await response.aclose()

            return ChunkStream(parse_sse(response, request.kind), release)

    async def add_lora(self, name: str, path: str) -> list[str]:
        """Load the adapter on every healthy upstream (lmsmith's admin route), then refresh the model lists."""
        results = await asyncio.gather(*(
            self.http.post(f"{u.url}/admin/loras", json={"name": name, "path": path}, timeout=600)
            for u in self.upstreams if u.healthy
        ), return_exceptions=True)
        await self.check_health()
        for upstream_result in results:
            if isinstance(upstream_result, BaseException):
                raise UpstreamRejected(502, f"an upstream failed to load the adapter: {upstream_result}")
            if upstream_result.status_code != 200:
                raise _rejection(upstream_result)
        return sorted(card["id"] for card in self.model_cards())

    async def remove_lora(self, name: str) -> None:
        results = await asyncio.gather(*(
            self.http.delete(f"{u.url}/admin/loras/{name}") for u in self.upstreams if u.healthy
        ), return_exceptions=True)
        await self.check_health()
        for upstream_result in results:
            if isinstance(upstream_result, BaseException):
                raise UpstreamRejected(502, f"an upstream failed to unload the adapter: {upstream_result}")
            if upstream_result.status_code != 200:
                raise _rejection(upstream_result)

    def stats(self) -> dict[str, Any]:
        return {
            "upstreams": [u.summary() for u in self.upstreams],
            "healthy_upstreams": sum(u.healthy for u in self.upstreams),
            "outstanding": sum(u.outstanding for u in self.upstreams),
        }


def upstream_body(request: GenerateRequest) -> tuple[str, dict[str, Any]]:
    """The OpenAI request (always streamed, with usage) that asks an upstream for `request`."""
    params = request.params
    body: dict[str, Any] = {
        "model": request.model,
        "max_tokens": params.max_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if params.seed is not None:
        body["seed"] = params.seed
    if params.stop:
        body["stop"] = list(params.stop)
    # vLLM's sampling extensions, sent only when they change anything.
    if params.top_k > 0:
        body["top_k"] = params.top_k
    if params.repetition_penalty != 1.0:
        body["repetition_penalty"] = params.repetition_penalty
    if request.messages is not None:
        return "/v1/chat/completions", body | {"messages": request.messages}
    return "/v1/completions", body | {"prompt": request.prompt}


async def parse_sse(response: httpx.Response, kind: str) -> AsyncIterator[Chunk]:
    """OpenAI SSE events as chunks; the finish reason is held until the usage event that follows it."""
    prompt_tokens = completion_tokens = 0
    pieces = 0
    finish_reason: str | None = None
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[len("data:"):].strip()
        if data == "[DONE]":
            break
        event = json.loads(data)
        if "error" in event:
            error = event["error"]
            raise EngineError(f"upstream error: {error.get('message', error) if isinstance(error, dict) else error}")
        for choice in event.get("choices") or []:
            text = (choice.get("delta") or {}).get("content") if kind == "chat" else choice.get("text")
            if text:
                pieces += 1
                yield Chunk(text, prompt_tokens, pieces)
            finish_reason = choice.get("finish_reason") or finish_reason
        usage = event.get("usage")
        if usage:
            prompt_tokens = usage.get("prompt_tokens", 0)
            completion_tokens = usage.get("completion_tokens", 0)
    if finish_reason is None:
        raise EngineError("the upstream ended the stream without a finish reason")
    yield Chunk("", prompt_tokens, completion_tokens or pieces, finish_reason)


def _rejection(response: httpx.Response) -> ClientError:
    try:
        error = response.json().get("error", {})
    except ValueError:
        error = {}
    if not isinstance(error, dict):
        error = {"message": str(error)}
    message = error.get("message") or f"upstream answered HTTP {response.status_code}"
    return UpstreamRejected(response.status_code, message, error.get("param"), error.get("code"), error.get("type"))
