"""The OpenAI-compatible HTTP API: FastAPI routes, uvicorn to run them.

A route only validates the request, hands it to the `Frontend` (cache, long documents, metrics) over a
generation client (the in-process engine, or a pool of upstream servers), and chooses the shape of the
answer: one JSON body, or server-sent events in OpenAI's chunk format ending with `data: [DONE]`.
Middleware gives every response an `X-Request-Id` and counts it for Prometheus. Every error leaves in
OpenAI's schema, `{"error": {"message", "type", "param", "code"}}`, so OpenAI clients raise their usual
exceptions. `/healthz` is liveness, `/readyz` answers 200 once the model is loaded (503 before),
`/metrics` is Prometheus' text format.
"""

from __future__ import annotations

import asyncio
import os
import json
import logging
import socket
import threading
import time
import uuid
from contextlib import aclosing, asynccontextmanager, contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable, Iterator, TypeVar

import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmsmith import __version__
from lmsmith.console import console
from lmsmith.errors import UserError
from lmsmith.models import resolve_model
from lmsmith.serve.cache import ResponseCache, build_cache
from lmsmith.serve.client import ClientError, GenerateRequest, LocalClient, ModelClient
from lmsmith.serve.config import LongDocConfig, ServeConfig
from lmsmith.serve.embeddings import Embedder, encode_vector
from lmsmith.serve.engine import Chunk, Completion, Engine, EngineError
from lmsmith.serve.frontend import Frontend
from lmsmith.serve.logprobs import ChatLogprobs, CompletionLogprobs, join_completion_logprobs
from lmsmith.serve.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from lmsmith.serve.metrics import ServeMetrics
from lmsmith.serve.protocol import (
    AdapterLoad,
    ChatCompletionRequest,
    FeedbackBody,
    KeyCreate,
    Promote,
    CompletionRequest,
    EmbeddingRequest,
    GenerationFields,
    Prompt,
    RagSearchRequest,
    chat_choice,
    chunk_body,
    completion_body,
    embeddings_body,
    error_body,
    model_card,
    new_completion_id,
    text_choice,
    text_chunk_body,
    text_completion_body,
    usage_body,
)
from lmsmith.serve.sampling import SamplingParams
from lmsmith.serve.structured import StructureError, ToolCallReader, split_tool_calls

if TYPE_CHECKING:
    from lmsmith.gateway.config import GatewayConfig
    from lmsmith.gateway.moderation import TermModerator
    from lmsmith.gateway.middleware import Gateway
    from lmsmith.rag.grounding import GroundedModel

log = logging.getLogger("lmsmith.serve")
REQUEST_ID_HEADER = "X-Request-Id"

T = TypeVar("T")

class APIError(Exception):
    """An error to answer with, in OpenAI's schema."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.body = error_body(message, type_, param, code)


_ERROR_SCHEMA = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                   "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}
# Every route may answer these, in OpenAI's error schema (the gateway's refusals included), so the
# OpenAPI document lists every status the server sends.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"description": text, "content": {"application/json": {"schema": _ERROR_SCHEMA}}}
    for status, text in ((400, "invalid request (body, parameters, moderation)"), (401, "missing or invalid API key"),
                         (403, "the key's role or model scope does not allow it"), (404, "no such model or route"),
                         (408, "the request body stalled"), (413, "the request body is too large"),
                         (429, "over a rate limit or quota (Retry-After)"), (499, "the client disconnected"),
                         (500, "internal error (the body carries the request id)"),
                         (503, "the model is loading, or the server is overloaded (Retry-After)"),
                         (504, "the request's own timeout passed before its answer was complete"))
}


def _openapi_without_422(app: FastAPI) -> dict[str, Any]:
    """FastAPI documents 422 for validation errors; this server answers them with 400 (OpenAI's status), so
    the document says 400 and only 400."""
    from fastapi.openapi.utils import get_openapi

    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        for path in schema.get("paths", {}).values():
            for operation in path.values():
                operation.get("responses", {}).pop("422", None)
        app.openapi_schema = schema
    return app.openapi_schema


def _error_response(status: int, message: str, type_: str, param: str | None = None,
                    code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, code), status_code=status)


def _param_path(location: tuple[Any, ...]) -> str | None:
    """FastAPI's ("body", "messages", 0, "role") as OpenAI-style `messages[0].role`."""
    path = ""
    for part in location[1:] if location and location[0] == "body" else location:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path or None


def _describe_validation_error(exc: RequestValidationError) -> tuple[str, str | None]:
    problems = exc.errors()
    if not problems:
        return "invalid request body", None
    first = problems[0]
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}", None
    param = _param_path(tuple(first.get("loc", ())))
    message = first["msg"].removeprefix("Value error, ")
    if param is None and first.get("type") == "value_error":
        # A check across fields (a model validator) names its field first: "max_tokens: ...".
        named = message.split(":", 1)[0]
        param = named if named.isidentifier() else None
    elif param is None:
        message = "the request body must be a JSON object"
    else:
        message = f"{param}: {message}"
    if len(problems) > 1:
        message += f" (and {len(problems) - 1} more problem{'s' if len(problems) > 2 else ''})"
    return message, param


def create_app(
    client: ModelClient | Engine,
    model_name: str | None = None,
    default_max_tokens: int = 256,
    *,
    cache: ResponseCache | None = None,
    long_doc: LongDocConfig | None = None,
    embedder: Embedder | None = None,
    gateway: "Gateway | None" = None,
    moderator: "TermModerator | None" = None,
    max_body_bytes: int = 8 * 1024 * 1024,
    body_timeout_s: float = 30.0,
    kbs: "dict[str, GroundedModel] | None" = None,
) -> FastAPI:
    """The API over `client` (an `Engine` is wrapped in a `LocalClient` named `model_name`).

    Requests without max_tokens get `default_max_tokens`. The app starts the client with its lifespan and
    closes the client, the cache and the embedder when it stops. `gateway` (`lmsmith.gateway`) puts keys,
    roles and limits in front of every route; `moderator` checks requests and answers against a term list.
    `kbs`: model names answered from a knowledge base with the client's model (`lmsmith.rag.grounding`).
    """
    kbs = kbs or {}
    if isinstance(client, Engine):
        if model_name is None:
            raise ValueError("serving an Engine needs a model_name")
        client = LocalClient(model_name, client)
    metrics = ServeMetrics(client.stats)
    frontend = Frontend(client, metrics, cache, long_doc)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await client.start()
        try:
            yield
        finally:
            await client.close()
            if cache is not None:
                await cache.close()
            if embedder is not None:
                embedder.close()
            if gateway is not None:
                await gateway.close()

    app = FastAPI(title="lmsmith", version=__version__, docs_url=None, redoc_url=None, lifespan=lifespan,
                  responses=ERROR_RESPONSES)
    app.openapi = lambda: _openapi_without_422(app)
    app.state.client, app.state.frontend, app.state.metrics = client, frontend, metrics

    if gateway is not None:
        from lmsmith.gateway.middleware import GatewayMiddleware

        app.add_middleware(GatewayMiddleware, gateway=gateway, router=app.router)
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes, timeout_s=body_timeout_s)
    app.add_middleware(RequestIdMiddleware, metrics=metrics)  # outermost: refusals get a request id too

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body, status_code=exc.status)

    @app.exception_handler(ClientError)
    async def _client_error(request: Request, exc: ClientError) -> JSONResponse:
        response = _error_response(exc.status, str(exc), exc.type_, exc.param, exc.code)
        if getattr(exc, "retry_after_s", None) is not None:
            response.headers["Retry-After"] = str(exc.retry_after_s)
        return response

    @app.exception_handler(EngineError)
    async def _engine_error(request: Request, exc: EngineError) -> JSONResponse:
        # EngineError messages are written for clients (causes are logged where they happen).
        response = _error_response(exc.status, f"{exc} (request id {_request_id(request)})", "server_error")
        if exc.retry_after_s is not None:
            response.headers["Retry-After"] = str(exc.retry_after_s)
        return response

    @app.exception_handler(RequestValidationError)
    async def _invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _describe_validation_error(exc)
        return _error_response(400, message, "invalid_request_error", param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        type_ = "server_error" if exc.status_code >= 500 else "invalid_request_error"
        return _error_response(exc.status_code, message, type_)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        request_id = _request_id(request)
        log.error("unhandled error in request %s", request_id, exc_info=exc)
        response = _error_response(500, f"internal error; request id {request_id} (the server log has the details)",
                                   "server_error")
        # Starlette answers unhandled errors outside the middleware stack, so the id header goes on here,
        # and the request is counted here (the request-id middleware never sees this response).
        response.headers[REQUEST_ID_HEADER] = request_id
        route = request.scope.get("route")
        metrics.http_requests.labels(request.method, getattr(route, "path", "unmatched"), "500").inc()
        return response

    # ----- probes -----

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        """Liveness: the process answers; 503 only when the engine thread has died."""
        alive = client.alive
        status = ("ok" if client.ready else "loading") if alive else "engine stopped"
        body = {"status": status, "ready": client.ready, "model": getattr(client, "model_name", None),
                "engine": client.stats()}
        return JSONResponse(body, status_code=200 if alive else 503)

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        ready = client.ready
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=METRICS_CONTENT_TYPE)

    # ----- models and adapters -----

    def cards() -> list[dict[str, Any]]:
        listed = client.model_cards() if client.ready else []
        if client.ready:
            listed += [model_card(name, getattr(client, "created", 0), parent=client.model_name) for name in kbs]
        if embedder is not None:
            listed.append(model_card(embedder.model_id, getattr(client, "created", 0), owned_by="sentence-transformers"))
        return listed

    def visible_cards(request: Request) -> list[dict[str, Any]]:
        from lmsmith.gateway.middleware import key_of

        key = key_of(request)
        return [card for card in cards() if key is None or key.allows_model(card["id"])]

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        _require_ready(client)
        return {"object": "list", "data": visible_cards(request)}

    @app.get("/v1/models/{model_id:path}")
    async def retrieve_model(model_id: str, request: Request) -> dict[str, Any]:
        _require_ready(client)
        for card in visible_cards(request):
            if card["id"] == model_id:
                return card
        client.check_model(model_id)  # raises the model_not_found error
        raise APIError(404, f"The model '{model_id}' does not exist", param="model", code="model_not_found")

    @app.get("/admin/loras")
    async def list_adapters() -> dict[str, Any]:
        _require_ready(client)
        return {"object": "list", "data": [card for card in client.model_cards() if card.get("parent")]}

    @app.post("/admin/loras")
    async def load_adapter(body: AdapterLoad) -> dict[str, Any]:
        models = await client.add_lora(body.name, body.path)
        return {"loaded": body.name, "models": models}

    @app.delete("/admin/loras/{name}")
    async def unload_adapter(name: str) -> dict[str, Any]:
        await client.remove_lora(name)
        return {"unloaded": name}

    # ----- the model registry (the same operations as `lmsmith registry`) -----

    def registry() -> Any:
        if gateway is None or gateway.registry is None:
            raise APIError(404, "this server has no model registry (started without a gateway)")
        return gateway.registry

    def actor(request: Request) -> str:
        from lmsmith.gateway.middleware import key_of

        key = key_of(request)
        return f"key:{key.id}" if key is not None else "anonymous"

    @app.get("/admin/registry")
    async def list_registry() -> dict[str, Any]:
        found = registry()
        versions = await asyncio.to_thread(found.versions)
        current = {}
        for name in sorted({v.name for v in versions}):
            current[name] = (await asyncio.to_thread(found.current, name)).version
        return {"current": current, "versions": [v.public() for v in versions],
                "changes": await asyncio.to_thread(found.changes)}

    @app.post("/admin/registry/{name}/promote")
    async def promote_version(name: str, body: Promote, request: Request) -> dict[str, Any]:
        try:
            return (await asyncio.to_thread(registry().promote, name, body.version, actor(request))).public()
        except UserError as exc:
            raise APIError(404, str(exc)) from None

    @app.post("/admin/registry/{name}/rollback")
    async def rollback_version(name: str, request: Request) -> dict[str, Any]:
        try:
            return (await asyncio.to_thread(registry().rollback, name, actor(request))).public()
        except UserError as exc:
            raise APIError(404 if "no model named" in str(exc) else 400, str(exc)) from None

    # ----- keys (the same operations as `lmsmith keys`) -----

    def key_store() -> Any:
        if gateway is None:
            raise APIError(404, "this server has no key store (started without a gateway)")
        return gateway.store

    @app.get("/admin/keys")
    async def list_keys() -> dict[str, Any]:
        keys = await asyncio.to_thread(key_store().list)
        return {"object": "list", "data": [key.public() for key in keys]}

    @app.post("/admin/keys")
    async def create_key(body: KeyCreate) -> dict[str, Any]:
        from lmsmith.gateway.keys import parse_duration

        try:
            expires = parse_duration(body.expires) if body.expires else None
            secret, key = await asyncio.to_thread(
                key_store().create, body.name, body.role, body.models, body.rpm, body.tpm, body.concurrency,
                body.quota_tokens, expires)
        except UserError as exc:
            raise APIError(400, str(exc)) from None
        return {"key": secret, **key.public()}

    @app.delete("/admin/keys/{key_id}")
    async def revoke_key(key_id: str) -> dict[str, Any]:
        try:
            return (await asyncio.to_thread(key_store().revoke, key_id)).public()
        except UserError as exc:
            raise APIError(404, str(exc)) from None

    @app.post("/admin/keys/{key_id}/rotate")
    async def rotate_key(key_id: str) -> dict[str, Any]:
        try:
            secret, key = await asyncio.to_thread(key_store().rotate, key_id)
        except UserError as exc:
            raise APIError(404, str(exc)) from None
        return {"key": secret, **key.public()}

    # ----- generation -----

    def moderate_input(request: Request, texts_or_messages: Any) -> Any:
        """The request's text with the input action applied; a block is a 400 `content_filter`."""
        if moderator is None:
            return texts_or_messages
        from lmsmith.gateway.moderation import moderate_messages

        if isinstance(texts_or_messages, list) and texts_or_messages and isinstance(texts_or_messages[0], dict):
            changed, decision = moderate_messages(moderator, texts_or_messages)
        else:
            decision = moderator.classify(texts_or_messages, moderator.input_action)
            changed = decision.text
        metrics.moderation.labels("input", decision.action).inc()
        if decision.action != "allow":
            request.scope.setdefault("state", {})["moderation"] = f"input:{decision.action}"
        if decision.action == "block":
            raise APIError(400, "the request contains text this server's moderation blocks", code="content_filter")
        return changed

    def moderate_output(request: Request, opened: list[Any]) -> list[Any]:
        if moderator is None or moderator.output_action == "off":
            return opened

        def note(action: str) -> None:
            metrics.moderation.labels("output", action).inc()
            state = request.scope.setdefault("state", {})
            state["moderation"] = ",".join(filter(None, [state.get("moderation"), f"output:{action}"]))

        return [moderator.stream(stream, note) for stream in opened]

    app.state.moderate_output = moderate_output

    def finished(request: Request, generates: list[GenerateRequest], completions: list[Completion]) -> None:
        """Keep the prompt and first answer for feedback (when the gateway has a feedback store)."""
        store = gateway.feedback if gateway is not None else None
        if store is None or not completions:
            return
        from lmsmith.gateway.middleware import key_of

        key = key_of(request)
        first = generates[0]
        prompt = first.messages if first.messages is not None else first.prompt
        try:
            store.remember(_request_id(request), key.id if key else None, first.model, request.url.path, prompt,
                           completions[0].text, completions[0].finish_reason)
        except Exception:  # feedback bookkeeping never fails an answer already made
            log.exception("could not keep request %s for feedback", _request_id(request))

    app.state.finished = finished

    @app.post("/v1/feedback")
    async def feedback(body: FeedbackBody, request: Request) -> dict[str, Any]:
        from lmsmith.gateway.middleware import key_of

        store = gateway.feedback if gateway is not None else None
        if store is None:
            raise APIError(404, "feedback is off on this server: it keeps user text only encrypted, and was started "
                                "without a data key (LMSMITH_AUDIT_KEY)")
        key = key_of(request)
        try:
            entry = await asyncio.to_thread(store.add, body.request_id, key.id if key else None, body.rating,
                                            body.correction, body.comment)
        except UserError as exc:
            raise APIError(404, str(exc), param="request_id") from None
        return {"id": entry, "request_id": body.request_id, "object": "feedback"}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        request.scope.setdefault("state", {})["end_user"] = body.user
        try:
            plan = body.output_plan()
        except StructureError as exc:
            raise APIError(400, str(exc), param=exc.param) from None
        messages = moderate_input(request, body.template_messages())
        tools = body.template_tools()
        grounded = kbs.get(body.model)
        model, grounding = body.model, None
        if grounded is not None:
            _require_ready(client)
            try:
                grounding = await grounded.ground(messages, client.tokenizer)
            except ValueError as exc:
                raise APIError(400, str(exc), param="messages") from None
            model, messages = client.model_name, grounding.messages
        generates = [
            GenerateRequest(model, replace(_sampling(body, default_max_tokens, choice), grammar=plan.grammar),
                            messages=messages, tools=tools)
            for choice in range(body.n or 1)
        ]
        top = (body.top_logprobs or 0) if body.logprobs else None
        shape = ChatFormat(body.model, client, top, len(generates), tool_calls=plan.tools,
                           citations=grounding.citations if grounding is not None else None)
        return await _answer(request, frontend, body, generates, shape,
                             refusal=grounding.refusal if grounding is not None else None)

    @app.post("/v1/rag/search")
    async def rag_search(body: RagSearchRequest) -> dict[str, Any]:
        grounded = kbs.get(body.model)
        if grounded is None:
            raise APIError(404, f"no knowledge base named {body.model!r}; this server has: "
                                f"{', '.join(sorted(kbs)) or 'none'}", param="model", code="model_not_found")
        try:
            hits = await asyncio.to_thread(grounded.kb.search, body.query, body.search_config())
        except UserError as exc:
            raise APIError(400, str(exc), param="query") from None
        return {"object": "list", "model": body.model, "data": [hit.body() for hit in hits]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        request.scope.setdefault("state", {})["end_user"] = body.user
        prompts = body.prompts()
        if moderator is not None and any(not isinstance(prompt, str) for prompt in prompts):
            raise APIError(400, "prompt: token-id prompts cannot be moderated on this server; send text",
                           param="prompt")
        prompts = [moderate_input(request, prompt) for prompt in prompts]
        generates = [
            GenerateRequest(body.model, _sampling(body, default_max_tokens, choice),
                            prompt=prompt if isinstance(prompt, str) else None,
                            prompt_ids=prompt if isinstance(prompt, list) else None)
            for prompt in prompts for choice in range(body.n or 1)
        ]
        shape = TextFormat(body.model, client, [prompt for prompt in prompts for _ in range(body.n or 1)],
                           body.n or 1, body.echo, body.logprobs is not None)
        return await _answer(request, frontend, body, generates, shape)

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest, request: Request) -> dict[str, Any]:
        if embedder is None:
            raise APIError(404, "this server has no embedding model (started with --embedding-model none)",
                           param="model", code="model_not_found")
        if body.model != embedder.model_id:
            raise APIError(404, f"The model '{body.model}' does not exist; embeddings come from '{embedder.model_id}'",
                           param="model", code="model_not_found")
        texts = body.texts()
        try:
            vectors, tokens = await embedder.embed(texts)
        except ValueError as exc:
            raise APIError(400, str(exc), param="input") from None
        if body.dimensions is not None and body.dimensions != vectors.shape[1]:
            raise APIError(400, f"dimensions: {embedder.model_id} gives {vectors.shape[1]}-dimensional vectors",
                           param="dimensions")
        metrics.embedding_inputs.inc(len(texts))
        _record_usage(request, {"total_tokens": tokens})
        return embeddings_body(embedder.model_id, [encode_vector(v, body.encoding_format) for v in vectors], tokens)

    return app


class BodyLimitMiddleware:
    """Push-back at the edge: a body over `max_bytes` gets 413 before it is read (by its Content-Length,
    or as soon as a chunked body passes the limit), and a body that stalls longer than `timeout_s` between
    pieces gets 408, so neither holds a worker. The body is read here once and replayed to the app."""

    def __init__(self, app: Any, max_bytes: int, timeout_s: float):
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "DELETE", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await _send_error(send, 413, f"the request body is {int(declared):,} bytes; this server takes at "
                                         f"most {self.max_bytes:,}")
            await _linger(receive)
            return
        chunks, size, more = [], 0, True
        while more:
            try:
                message = await asyncio.wait_for(receive(), self.timeout_s)
            except asyncio.TimeoutError:
                await _send_error(send, 408, f"the request body stalled for {self.timeout_s:g} s")
                return
            if message["type"] != "http.request":
                return  # the client left before sending its body
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await _send_error(send, 413, f"the request body is over {self.max_bytes:,} bytes")
                await _linger(receive)
                return
            more = message.get("more_body", False)
        body = b"".join(chunks)
        scope.setdefault("state", {})["request_body"] = body
        sent = False

        async def replay() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


LINGER_S, LINGER_BYTES = 1.0, 64 * 1024 * 1024


async def _linger(receive: Any) -> None:
    """After an early answer, read and drop what the client is still sending, for a moment: closing a
    socket with unread data resets it, and the reset can destroy the answer before the client reads it
    (a lingering close, as HTTP servers do). Bounded in time and bytes, nothing kept."""
    loop = asyncio.get_running_loop()
    deadline, dropped = loop.time() + LINGER_S, 0
    while dropped < LINGER_BYTES:
        try:
            message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
        except asyncio.TimeoutError:
            return
        if message["type"] != "http.request" or not message.get("more_body", False):
            return
        dropped += len(message.get("body", b""))


async def _send_error(send: Any, status: int, message: str) -> None:
    body = json.dumps(error_body(message, "invalid_request_error")).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class RequestIdMiddleware:
    """Gives every response an X-Request-Id (the client's, or a new one) and counts it by route and status.

    Plain ASGI rather than `BaseHTTPMiddleware`, which would buffer the stream and hide a client's
    disconnect from the SSE generator (so the engine would keep generating for nobody).
    """

    def __init__(self, app: Any, metrics: ServeMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope.get("headers") or []).get(REQUEST_ID_HEADER.lower().encode())
        request_id = given.decode("latin-1") if given else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (REQUEST_ID_HEADER.lower().encode(), request_id.encode())]
                route = scope.get("route")
                self.metrics.http_requests.labels(
                    scope["method"], getattr(route, "path", "unmatched"), str(message["status"])
                ).inc()
            await send(message)

        await self.app(scope, receive, send_with_id)


def _request_id(request: Request) -> str:
    return str(request.scope.get("state", {}).get("request_id", "unknown"))


def _require_ready(client: ModelClient) -> None:
    if not client.ready:
        raise APIError(503, "the model is still loading; retry when /readyz answers 200", "server_error")


def _sampling(body: GenerationFields, default_max_tokens: int, choice: int) -> SamplingParams:
    try:
        return body.sampling_params(default_max_tokens, choice)
    except ValueError as exc:
        raise APIError(400, str(exc)) from None


async def _answer(request: Request, frontend: Frontend, body: GenerationFields, generates: list[GenerateRequest],
                  shape: "ChatFormat | TextFormat", refusal: str | None = None) -> Any:
    """Open every answer (errors become HTTP errors here), then send them as SSE or as one JSON body.

    One request can hold several answers (n per prompt, several prompts): each is its own engine request,
    so they run batched, and choice i of the response is generates[i].
    """
    try:
        long_doc = body.long_doc_settings(frontend.long_doc_defaults())
    except ValidationError as exc:
        problem = exc.errors()[0]
        where = ".".join(str(part) for part in problem["loc"])
        message = problem["msg"].removeprefix("Value error, ")
        raise APIError(400, f"long_doc{'.' + where if where else ''}: {message}", param="long_doc") from None
    if refusal is not None:  # answered without the model (a knowledge base that cannot back an answer)
        opened: list[AsyncIterator[Chunk]] | None = [_said(refusal) for _ in generates]
    else:
        opened = await _unless_disconnected(request, _open_all(frontend, generates, long_doc, shape.endpoint))
    if opened is None:
        return _client_left()
    opened = request.app.state.moderate_output(request, opened)
    finished = request.app.state.finished

    def done(completions: list[Completion]) -> None:
        _record_usage(request, _usage(completions, shape.per_prompt))
        finished(request, generates, completions)

    if body.stream:
        events = _sse_events(opened, shape, body.include_usage, done)
        # Closing the event generator (also after a disconnect) cancels the requests in the engine.
        return StreamingResponse(
            events,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            background=BackgroundTask(events.aclose),
        )
    completions = await _unless_disconnected(request, _collect_all(opened))
    if completions is None:
        return _client_left()
    done(completions)
    return shape.body(completions)


async def _open_all(frontend: Frontend, generates: list[GenerateRequest], long_doc: Any,
                    endpoint: str) -> list[AsyncIterator[Chunk]]:
    opened: list[AsyncIterator[Chunk]] = []
    try:
        for generate in generates:
            opened.append(await frontend.open(generate, long_doc, endpoint))
    except BaseException:
        for stream in opened:
            await stream.aclose()  # type: ignore[attr-defined]
        raise
    return opened


async def _said(text: str) -> AsyncIterator[Chunk]:
    yield Chunk(text, 0, 0, "stop")


def _client_left() -> JSONResponse:
    # Nobody reads this; 499 is the de-facto status for a request its client abandoned.
    return JSONResponse(error_body("client disconnected", "invalid_request_error"), status_code=499)


async def _collect(stream: AsyncIterator[Chunk]) -> Completion:
    async with aclosing(stream):  # type: ignore[type-var]
        return Completion.of([chunk async for chunk in stream])


async def _collect_all(streams: list[AsyncIterator[Chunk]]) -> list[Completion]:
    tasks = [asyncio.ensure_future(_collect(stream)) for stream in streams]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()


def _usage(answers: list[Completion] | list[Chunk], per_prompt: int) -> dict[str, int]:
    """Prompt tokens once per prompt (its n answers share it), completion tokens of every answer."""
    prompt_tokens = sum(answer.prompt_tokens for answer in answers[::per_prompt])
    return usage_body(prompt_tokens, sum(answer.completion_tokens for answer in answers))


class ChatFormat:
    """`chat.completion` bodies and `chat.completion.chunk` events."""

    endpoint = "chat"

    def __init__(self, model: str, client: ModelClient, top_logprobs: int | None, choices: int,
                 tool_calls: bool = False, citations: list[dict[str, Any]] | None = None):
        self.model = model
        self.id = new_completion_id("chatcmpl")
        self.created = int(time.time())
        self.per_prompt = choices  # chat has one conversation; every choice answers it
        self._logprobs = None if top_logprobs is None else ChatLogprobs(client.tokenizer, top_logprobs)
        # with tools offered, each choice's text is read for tool calls (streamed: as they complete)
        self._readers = {index: ToolCallReader() for index in range(choices)} if tool_calls else None
        self._calls_sent: dict[int, int] = {}
        self.citations = citations  # the knowledge-base chunks the answer was grounded in

    def _logprob_body(self, chunk_or_completion: Chunk | Completion) -> dict[str, Any] | None:
        if self._logprobs is None:
            return None
        return {"content": self._logprobs.content(chunk_or_completion.logprobs)}

    def body(self, completions: list[Completion]) -> dict[str, Any]:
        choices = []
        for index, completion in enumerate(completions):
            choice = chat_choice(index, completion, self._logprob_body(completion))
            if self._readers is not None:
                content, calls = split_tool_calls(completion.text)
                if calls:
                    choice["message"] = {"role": "assistant", "content": content or None,
                                         "tool_calls": [call.body() for call in calls]}
                    choice["finish_reason"] = _with_calls(completion.finish_reason)
            choices.append(choice)
        body = completion_body(self.id, self.model, choices, _usage(completions, self.per_prompt))
        if self.citations is not None:
            body["citations"] = self.citations
        return body

    def opening(self, index: int, include_usage: bool) -> dict[str, Any] | None:
        event = chunk_body(self.id, self.created, self.model, {"role": "assistant", "content": ""},
                           with_usage_field=include_usage, index=index)
        if self.citations is not None and index == 0:  # the sources come before the answer
            event["citations"] = self.citations
        return event

    def pieces(self, index: int, chunk: Chunk, include_usage: bool) -> list[dict[str, Any]]:
        if self._readers is None:
            deltas: list[dict[str, Any]] = [{"content": chunk.text}] if chunk.text else []
        else:
            deltas = []
            for piece in self._readers[index].feed(chunk.text, final=chunk.finish_reason is not None):
                if isinstance(piece, str):
                    deltas.append({"content": piece})
                else:
                    number = self._calls_sent.get(index, 0)
                    self._calls_sent[index] = number + 1
                    deltas.append({"tool_calls": [{"index": number, **piece.body()}]})
        if chunk.logprobs and not deltas:
            deltas = [{"content": ""}]
        return [chunk_body(self.id, self.created, self.model, delta, with_usage_field=include_usage, index=index,
                           logprobs=self._logprob_body(chunk) if position == 0 else None)
                for position, delta in enumerate(deltas)]

    def finish(self, index: int, reason: str, include_usage: bool) -> dict[str, Any]:
        if self._calls_sent.get(index):
            reason = _with_calls(reason)
        return chunk_body(self.id, self.created, self.model, {}, reason, with_usage_field=include_usage, index=index)

    def usage(self, usage: dict[str, int]) -> dict[str, Any]:
        return chunk_body(self.id, self.created, self.model, None, usage=usage, with_usage_field=True)


def _with_calls(reason: str) -> str:
    """An answer that ended by itself after making tool calls finishes with "tool_calls", as OpenAI's do."""
    return "tool_calls" if reason == "stop" else reason


class TextFormat:
    """`text_completion` bodies and events (`/v1/completions`); `prompts[i]` is choice i's prompt."""

    endpoint = "completion"

    def __init__(self, model: str, client: ModelClient, prompts: list[Prompt], per_prompt: int, echo: bool,
                 logprobs: bool):
        self.model = model
        self.id = new_completion_id("cmpl")
        self.created = int(time.time())
        self.prompts = prompts
        self.per_prompt = per_prompt
        self.echo = echo
        self._tokenizer = client.tokenizer if (logprobs or (echo and any(isinstance(p, list) for p in prompts))) else None
        self._logprobs = CompletionLogprobs(self._tokenizer) if logprobs else None
        self._echo_texts: dict[int, str] = {}
        self._emitted: dict[int, int] = {}  # characters sent so far, per choice (stream offsets)

    def echo_text(self, index: int) -> str:
        if index not in self._echo_texts:
            prompt = self.prompts[index]
            self._echo_texts[index] = prompt if isinstance(prompt, str) else self._tokenizer.decode(
                prompt, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return self._echo_texts[index]

    def _prompt_logprobs(self, index: int, chunk: Chunk | Completion) -> dict[str, Any] | None:
        if self._logprobs is None or not self.echo:
            return None
        entries = chunk.prompt_logprobs or ()
        return self._logprobs.prompt(self.prompts[index], entries)

    def body(self, completions: list[Completion]) -> dict[str, Any]:
        choices = []
        for index, completion in enumerate(completions):
            prefix = self.echo_text(index) if self.echo else ""
            logprobs = None
            if self._logprobs is not None:
                parts = [self._logprobs.generated(completion.logprobs, len(prefix))]
                echoed = self._prompt_logprobs(index, completion)
                logprobs = join_completion_logprobs(([echoed] if echoed else []) + parts)
            choices.append(text_choice(index, prefix + completion.text, completion.finish_reason, logprobs))
        return text_completion_body(self.id, self.model, choices, _usage(completions, self.per_prompt))

    def opening(self, index: int, include_usage: bool) -> dict[str, Any] | None:
        return None

    def pieces(self, index: int, chunk: Chunk, include_usage: bool) -> list[dict[str, Any]]:
        events = []
        if self.echo and index not in self._emitted:
            text = self.echo_text(index)
            events.append(text_chunk_body(self.id, self.created, self.model, text, with_usage_field=include_usage,
                                          index=index, logprobs=self._prompt_logprobs(index, chunk)))
            self._emitted[index] = len(text)
        done = self._emitted.setdefault(index, 0)
        if chunk.text or chunk.logprobs:
            logprobs = None if self._logprobs is None else self._logprobs.generated(chunk.logprobs, done)
            events.append(text_chunk_body(self.id, self.created, self.model, chunk.text,
                                          with_usage_field=include_usage, index=index, logprobs=logprobs))
            self._emitted[index] = done + len(chunk.text)
        return events

    def finish(self, index: int, reason: str, include_usage: bool) -> dict[str, Any]:
        return text_chunk_body(self.id, self.created, self.model, "", reason, with_usage_field=include_usage,
                               index=index)

    def usage(self, usage: dict[str, int]) -> dict[str, Any]:
        return text_chunk_body(self.id, self.created, self.model, None, usage=usage, with_usage_field=True)


def _sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


async def _merged(streams: list[AsyncIterator[Chunk]]) -> AsyncIterator[tuple[int, Chunk | BaseException | None]]:
    """(choice, chunk) from every stream as chunks arrive; (choice, None) when it ends, (choice, error) if it fails.

    Each stream is read by its own task, which also closes it (cancelling its request in the engine); leaving
    early cancels the tasks and waits for them, so no stream is closed while a task still reads it.
    """
    arrivals: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[Chunk]) -> None:
        try:
            async with aclosing(stream):  # type: ignore[type-var]
                async for chunk in stream:
                    await arrivals.put((index, chunk))
            await arrivals.put((index, None))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # any failure ends this choice with an error event, never a silent hang
            await arrivals.put((index, exc))

    tasks = [asyncio.ensure_future(pump(index, stream)) for index, stream in enumerate(streams)]
    running = len(streams)
    try:
        while running:
            index, item = await arrivals.get()
            if not isinstance(item, Chunk):
                running -= 1
            yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _record_usage(request: Request, usage: dict[str, int]) -> None:
    """Leave the tokens a request used where the gateway counts them (the request's state)."""
    request.scope.setdefault("state", {})["usage_tokens"] = int(usage.get("total_tokens", 0))


async def _sse_events(streams: list[AsyncIterator[Chunk]], shape: ChatFormat | TextFormat, include_usage: bool,
                      done: Callable[[list[Completion]], None] = lambda completions: None) -> AsyncIterator[str]:
    last: dict[int, Chunk] = {}
    texts: dict[int, list[str]] = {}
    try:
        async for event in _sse_stream(streams, shape, include_usage, last, texts):
            yield event
    finally:  # also when the client left: what was generated was used
        if last:
            done([Completion("".join(texts.get(index, [])), last[index].finish_reason or "cancelled",
                             last[index].prompt_tokens, last[index].completion_tokens) for index in sorted(last)])


async def _sse_stream(streams: list[AsyncIterator[Chunk]], shape: ChatFormat | TextFormat,
                      include_usage: bool, last: dict[int, Chunk], texts: dict[int, list[str]]) -> AsyncIterator[str]:
    for index in range(len(streams)):
        opening = shape.opening(index, include_usage)
        if opening is not None:
            yield _sse(opening)
    async with aclosing(_merged(streams)) as arrivals:
        async for index, item in arrivals:
            if isinstance(item, BaseException):
                if not isinstance(item, (EngineError, ClientError)):
                    log.error("stream failed", exc_info=item)
                    item = EngineError("generation failed (the server log has why)")
                yield _sse(error_body(str(item), "server_error"))
                yield _sse("[DONE]")
                return
            if item is None:
                continue
            for event in shape.pieces(index, item, include_usage):
                yield _sse(event)
            last[index] = item
            texts.setdefault(index, []).append(item.text)
            if item.finish_reason is not None:
                yield _sse(shape.finish(index, item.finish_reason, include_usage))
    if include_usage and len(last) == len(streams):
        yield _sse(shape.usage(_usage([last[index] for index in range(len(streams))], shape.per_prompt)))
    yield _sse("[DONE]")


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T | None:
    """Run `work` but give up (cancelling it) if the client disconnects first."""
    work_task = asyncio.ensure_future(work)
    watch_task = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({work_task, watch_task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch_task.cancel()
    if work_task in done:
        return work_task.result()
    work_task.cancel()
    return None


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: a free one), or a UserError naming what is in the way."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        raise UserError(f"--host {host} --port {port}: cannot listen there ({exc.strerror or exc})") from None
    sock.listen(128)
    sock.setblocking(False)
    return sock


def base_url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{port}"


def _uvicorn_server(app: FastAPI, log_level: str, header_timeout_s: float = 10.0) -> uvicorn.Server:
    # The app's lifespan starts and closes its client. A short graceful-shutdown window: an open stream
    # should not hold Ctrl-C for long.
    config = uvicorn.Config(app, log_level=log_level, lifespan="on", timeout_graceful_shutdown=3,
                            http=header_deadline_protocol(header_timeout_s))
    return uvicorn.Server(config)


def header_deadline_protocol(timeout_s: float) -> type:
    """uvicorn's h11 protocol, closing a connection whose next request line and headers do not arrive
    within `timeout_s` (from the connection's start, then from the end of each response).

    uvicorn's keep-alive timer is cancelled by any byte received, so a client trickling a header byte at
    a time would hold the connection forever (slowloris); this deadline is not reset by data."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderDeadlineProtocol(H11Protocol):
        _header_deadline: asyncio.TimerHandle | None = None
        _lingering = False

        def connection_made(self, transport: Any) -> None:
            super().connection_made(_LingeringClose(transport, self))
            self._arm_header_deadline()

        def data_received(self, data: bytes) -> None:
            if self._lingering:  # the rest of a body answered early (413): read and dropped
                return
            super().data_received(data)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_header_deadline()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._header_deadline is not None:
                self._header_deadline.cancel()
            super().connection_lost(exc)

        def _arm_header_deadline(self) -> None:
            if self._header_deadline is not None:
                self._header_deadline.cancel()
            # A new request starts a new cycle: the deadline holds if the cycle is still the one it saw.
            self._header_deadline = self.loop.call_later(timeout_s, self._headers_late, self.cycle)

        def _headers_late(self, cycle_then: Any) -> None:
            if self.cycle is cycle_then and not self.transport.is_closing():
                log.info("closed a connection whose request headers took over %g s", timeout_s)
                self.transport.close()

    return HeaderDeadlineProtocol


class _LingeringClose:
    """The connection's transport, closing gracefully while the client is still sending a request body
    the server answered early (a 413): it stops writing (FIN after the answer), reads and drops what
    arrives for up to LINGER_S, then closes. A plain close with unread data resets the connection, and
    the reset can destroy the answer before the client reads it; uvicorn's h11 protocol closes at once."""

    def __init__(self, transport: Any, protocol: Any):
        self._transport, self._protocol = transport, protocol

    def close(self) -> None:
        import h11

        sending = getattr(self._protocol.conn, "their_state", None) is h11.SEND_BODY and \
            self._protocol.cycle is not None and not self._protocol.cycle.disconnected
        if not sending or self._transport.is_closing() or not self._transport.can_write_eof():
            self._transport.close()
            return
        self._protocol._lingering = True
        self._transport.write_eof()
        asyncio.get_running_loop().call_later(LINGER_S, self._transport.close)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


@contextmanager
def running_server(app: FastAPI, host: str = "127.0.0.1", port: int = 0,
                   startup_timeout: float = 30.0, header_timeout_s: float = 10.0) -> Iterator[str]:
    """Serve `app` on a background thread for the duration of the block; yields the base URL."""
    sock = bind_socket(host, port)
    url = base_url(sock)
    server = _uvicorn_server(app, log_level="warning", header_timeout_s=header_timeout_s)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="lmsmith-http", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + startup_timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the API server at {url} did not start")
            time.sleep(0.02)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def build_client(path: str | Path | None, config: ServeConfig,
                 adapter_root: Path | None = None) -> tuple[ModelClient, Callable[[], None] | None]:
    """The generation client for `lmsmith serve`, and for local mode the model loading to run in the background."""
    if config.upstreams:
        from lmsmith.serve.upstream import UpstreamClient

        tokenizer = None
        if config.tokenizer:
            from lmsmith.generation import load_tokenizer

            tokenizer = load_tokenizer(Path(config.tokenizer))
        return UpstreamClient(config.upstreams, config.health_check_interval_s, tokenizer), None
    if path is None:
        raise UserError("lmsmith serve: give a model or run folder, --registry NAME, or --upstream URL[,URL...]")
    resolved = resolve_model(path, config.variant)
    client = LocalClient(resolved.name, adapter_root=adapter_root, push_back=config.push_back)

    def load() -> None:
        engine = Engine.load(resolved.path, device=config.device, dtype=config.dtype, config=config.engine_config())
        loaded.append(engine)
        client.attach(engine, config.loras)

    return client, load


def follow_registry(registry: Any, config: ServeConfig, adapter_root: Path | None,
                    stop: threading.Event) -> tuple[LocalClient, Callable[[], None]]:
    """A client for the registry name's current version, and the loading that then follows the registry:
    each promote or rollback loads the new version beside the old one and swaps it in."""
    name = config.registry
    current = registry.current(name)
    client = LocalClient(name, adapter_root=adapter_root, push_back=config.push_back)
    client.version = current.public()

    def load_version(version: Any) -> Engine:
        engine = Engine.load(version.model_path, device=config.device, dtype=config.dtype,
                             config=config.engine_config())
        loaded.append(engine)
        return engine

    def load() -> None:
        client.attach(load_version(current), config.loras)
        while not stop.wait(config.registry_poll_s):
            try:
                now = registry.current(name)
                if now.version == client.version["version"]:
                    continue
                console.print(f"registry: {name} v{client.version['version']} -> v{now.version}, loading "
                              f"{now.model_path}", soft_wrap=True)
                old = client.swap(load_version(now), now.public())
                if old in loaded:
                    loaded.remove(old)
                console.print(f"registry: serving {name} v{now.version}")
            except Exception as exc:  # a failed load keeps the running version; the next poll retries
                log.error("registry: could not switch %s: %s", name, exc)

    return client, load


# Engines loaded by `serve_forever`, closed when its server stops.
loaded: list[Engine] = []


def open_gateway(config: ServeConfig, gateway_config: "GatewayConfig") -> "Gateway":
    """The key store under the state folder and the limiter; refuses to listen beyond loopback without
    keys unless told to (`insecure_no_auth`)."""
    import ipaddress

    from lmsmith.gateway.keys import KeyStore, state_dir
    from lmsmith.gateway.middleware import Gateway

    url = gateway_config.database_url
    folder = state_dir(gateway_config.state_dir)
    store = KeyStore(folder, url.get_secret_value() if url is not None else None)
    audit = feedback = None
    if gateway_config.audit_key_file or os.environ.get("LMSMITH_AUDIT_KEY"):
        from lmsmith.gateway.audit import AuditLog, load_key
        from lmsmith.gateway.feedback import FeedbackStore

        key = load_key(gateway_config.audit_key_file)
        if gateway_config.audit:
            audit = AuditLog(folder, key)
            console.print(f"audit log: {audit.path} (AES-256-GCM, hash-chained)", soft_wrap=True)
        feedback = FeedbackStore(folder, url.get_secret_value() if url is not None else None, key)
        console.print("feedback on: prompts and answers kept encrypted for POST /v1/feedback")
    else:
        console.print("[yellow]audit log and feedback off[/]: set LMSMITH_AUDIT_KEY (base64 of 32 bytes) to keep them")
    from lmsmith.gateway.registry import Registry

    gateway = Gateway(store, gateway_config, audit=audit,
                      registry=Registry(folder, url.get_secret_value() if url is not None else None, audit),
                      feedback=feedback)
    if gateway.required:
        console.print(f"API keys required on every route ({len(store.list())} keys in the store)")
        return gateway
    try:
        loopback = ipaddress.ip_address(config.host).is_loopback
    except ValueError:
        loopback = config.host == "localhost"
    if not loopback and not gateway_config.insecure_no_auth:
        store.close()
        raise UserError(f"--host {config.host}: no API key exists yet, so the server listens on loopback only; "
                        "create one (`lmsmith keys create --role admin`) or pass --insecure-no-auth")
    console.print(f"[yellow]no API key configured[/]: every route is open to callers on {config.host} "
                  "(`lmsmith keys create` makes keys required)", soft_wrap=True)
    return gateway


def open_knowledge_bases(config: ServeConfig) -> "dict[str, GroundedModel]":
    """The `--kb NAME=FOLDER` models, opened (and checked) before the server listens."""
    if config.kbs and config.upstreams:
        raise UserError("--kb: knowledge-base models answer with the local model; they do not apply to upstreams")
    from lmsmith.rag.grounding import GroundedModel

    kbs = {}
    for name, folder in config.kbs.items():
        if name in config.loras:
            raise UserError(f"--kb {name}: an adapter has that name already")
        try:
            kbs[name] = GroundedModel(name, folder, config.rag)
        except ValueError as exc:
            raise UserError(f"--kb {name}={folder}: {exc}") from None
    return kbs


def serve_forever(path: str | Path | None, config: ServeConfig, gateway_config: "GatewayConfig | None" = None) -> None:
    """`lmsmith serve`: serve a run folder's or model folder's model (or front upstreams) until interrupted.

    The HTTP server starts at once and answers /healthz; the model loads on a background thread and
    /readyz turns 200 when it (and every --lora adapter) is in place.
    """
    from lmsmith.gateway.config import GatewayConfig

    gateway_config = gateway_config or GatewayConfig()
    gateway = open_gateway(config, gateway_config)
    adapter_root = Path(gateway_config.adapter_root).expanduser() if gateway_config.adapter_root else None
    from lmsmith.gateway.moderation import moderator_from

    moderator = moderator_from(gateway_config.moderation_terms, gateway_config.moderation_input,
                               gateway_config.moderation_output, gateway_config.moderation_classifier,
                               gateway_config.moderation_threshold, gateway_config.moderation_classifier_action)
    stop_following = threading.Event()
    if config.registry is not None:
        if path is not None:
            raise UserError("lmsmith serve: give a model folder or --registry NAME, not both")
        client, load = follow_registry(gateway.registry, config, adapter_root, stop_following)
    else:
        client, load = build_client(path, config, adapter_root)
    embedder = None if config.embedding_model == "none" else Embedder(config.embedding_model)
    kbs = open_knowledge_bases(config)
    app = create_app(client, default_max_tokens=config.max_new_tokens, cache=build_cache(config.cache),
                     long_doc=config.long_doc, embedder=embedder, gateway=gateway, moderator=moderator,
                     max_body_bytes=int(config.push_back.max_body_mb * 1024 * 1024),
                     body_timeout_s=config.push_back.body_timeout_s, kbs=kbs)
    sock = bind_socket(config.host, config.port)
    url = base_url(sock)
    server = _uvicorn_server(app, log_level="info", header_timeout_s=config.push_back.header_timeout_s)
    failure: list[BaseException] = []

    def load_in_background() -> None:
        assert load is not None
        try:
            load()
            console.print(f"model ready at {url}/v1", soft_wrap=True)
        except BaseException as exc:  # the server cannot serve without its model: stop it
            failure.append(exc)
            server.should_exit = True

    what = ", ".join(config.upstreams) if config.upstreams else str(path)
    console.print(f"serving {what} at {url}/v1", soft_wrap=True)
    console.print(f"  POST {url}/v1/chat/completions  /v1/completions  /v1/embeddings   GET {url}/v1/models  "
                  f"/healthz  /readyz  /metrics", soft_wrap=True)
    if load is not None:
        threading.Thread(target=load_in_background, name="lmsmith-load", daemon=True).start()
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        # uvicorn has already shut down gracefully; Ctrl-C is the normal way to stop a server.
        console.print("server stopped")
    finally:
        stop_following.set()
        sock.close()
        while loaded:
            loaded.pop().close()
    if failure:
        exc = failure[0]
        if isinstance(exc, UserError):
            raise exc
        if isinstance(exc, ClientError):
            raise UserError(f"--lora: {exc}") from None
        raise UserError(f"cannot load the model: {type(exc).__name__}: {exc}") from exc
