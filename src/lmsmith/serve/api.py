"""The OpenAI-compatible HTTP API: FastAPI routes, uvicorn to run them.

The routes only validate, hand the request to the engine and choose the shape of the answer: one JSON
body, or server-sent events in OpenAI's `chat.completion.chunk` format ending with `data: [DONE]`. All
generation happens in `lmsmith.serve.engine`, on its own thread. Every error leaves in OpenAI's schema,
`{"error": {"message", "type", "param", "code"}}`, so OpenAI clients raise their usual exceptions.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from contextlib import aclosing, contextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Iterator, TypeVar

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmsmith import __version__
from lmsmith.console import console
from lmsmith.errors import UserError
from lmsmith.models import resolve_model
from lmsmith.serve.config import ServeConfig
from lmsmith.serve.engine import Chunk, Engine, EngineError
from lmsmith.serve.protocol import (
    ChatCompletionRequest,
    chunk_body,
    completion_body,
    error_body,
    new_completion_id,
    usage_body,
)

T = TypeVar("T")

class APIError(Exception):
    """An error to answer with, in OpenAI's schema."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.body = error_body(message, type_, param, code)


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
    if param is None:
        message = "the request body must be a JSON object"
    else:
        message = f"{param}: {message}"
    if len(problems) > 1:
        message += f" (and {len(problems) - 1} more problem{'s' if len(problems) > 2 else ''})"
    return message, param


def create_app(engine: Engine, model_name: str, default_max_tokens: int = 256) -> FastAPI:
    """The API serving `engine` under `model_name`; requests without max_tokens get `default_max_tokens`."""
    app = FastAPI(title="lmsmith", version=__version__, docs_url=None, redoc_url=None)
    started = int(time.time())
    model_card = {"id": model_name, "object": "model", "created": started, "owned_by": "lmsmith"}

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body, status_code=exc.status)

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
        return _error_response(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        status = "ok" if engine.healthy else "engine stopped"
        body = {"status": status, "model": model_name, "engine": engine.stats()}
        return JSONResponse(body, status_code=200 if engine.healthy else 503)

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card]}

    @app.get("/v1/models/{model_id:path}")
    async def retrieve_model(model_id: str) -> dict[str, Any]:
        _check_model(model_id, model_name)
        return model_card

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        _check_model(body.model, model_name)
        try:
            prompt_ids = engine.encode_chat(body.template_messages())
        except ValueError as exc:
            raise APIError(400, str(exc), param="messages") from None
        if engine.max_context is not None and len(prompt_ids) >= engine.max_context:
            raise APIError(
                400,
                f"the messages take {len(prompt_ids)} tokens; this model's context is {engine.max_context}",
                param="messages",
                code="context_length_exceeded",
            )
        params = body.sampling_params(default_max_tokens)
        completion_id = new_completion_id()
        if body.stream:
            events = _sse_events(engine, prompt_ids, params, completion_id, model_name, body.include_usage)
            # Closing the event generator (also after a disconnect) cancels the request in the engine.
            return StreamingResponse(
                events,
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                background=BackgroundTask(events.aclose),
            )
        try:
            completion = await _unless_disconnected(request, engine.complete(prompt_ids, params))
        except EngineError as exc:
            raise APIError(500, str(exc), type_="server_error") from None
        if completion is None:  # the client left; nobody reads this
            return JSONResponse(error_body("client disconnected", "invalid_request_error"), status_code=499)
        return completion_body(completion_id, model_name, completion)

    return app


def _check_model(requested: str, served: str) -> None:
    if requested != served:
        raise APIError(
            404, f"The model '{requested}' does not exist; this server serves '{served}'",
            param="model", code="model_not_found",
        )


def _sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


async def _sse_events(engine: Engine, prompt_ids: list[int], params: Any, completion_id: str,
                      model: str, include_usage: bool) -> AsyncIterator[str]:
    created = int(time.time())

    def chunk(delta: dict[str, str] | None, finish_reason: str | None = None,
              usage: dict[str, int] | None = None) -> str:
        return _sse(chunk_body(completion_id, created, model, delta, finish_reason, usage, include_usage))

    yield chunk({"role": "assistant", "content": ""})
    last: Chunk | None = None
    try:
        async with aclosing(engine.stream(prompt_ids, params)) as stream:
            async for piece in stream:
                if piece.text:
                    yield chunk({"content": piece.text})
                last = piece
    except EngineError as exc:
        yield _sse(error_body(str(exc), "server_error"))
        yield _sse("[DONE]")
        return
    if last is not None:
        yield chunk({}, last.finish_reason)
        if include_usage:
            yield chunk(None, usage=usage_body(last.prompt_tokens, last.completion_tokens))
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


def _uvicorn_server(app: FastAPI, log_level: str) -> uvicorn.Server:
    # No lifespan: the engine is started and stopped around the server, not by the app. A short
    # graceful-shutdown window: an open stream should not hold Ctrl-C for long.
    config = uvicorn.Config(app, log_level=log_level, lifespan="off", timeout_graceful_shutdown=3)
    return uvicorn.Server(config)


@contextmanager
def running_server(app: FastAPI, host: str = "127.0.0.1", port: int = 0,
                   startup_timeout: float = 30.0) -> Iterator[str]:
    """Serve `app` on a background thread for the duration of the block; yields the base URL."""
    sock = bind_socket(host, port)
    url = base_url(sock)
    server = _uvicorn_server(app, log_level="warning")
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


def serve_forever(path: str | Path, config: ServeConfig) -> None:
    """`lmsmith serve`: load the model of a run folder or model folder and serve it until interrupted."""
    resolved = resolve_model(path)
    with console.status(f"loading {resolved.path}"):
        engine = Engine.load(resolved.path, device=config.device, dtype=config.dtype)
    sock = bind_socket(config.host, config.port)
    url = base_url(sock)
    console.print(f"serving [bold]{resolved.name}[/] ({resolved.path}) at {url}/v1", soft_wrap=True)
    console.print(f"  POST {url}/v1/chat/completions   GET {url}/v1/models   GET {url}/healthz", soft_wrap=True)
    app = create_app(engine, resolved.name, default_max_tokens=config.max_new_tokens)
    try:
        _uvicorn_server(app, log_level="info").run(sockets=[sock])
    except KeyboardInterrupt:
        # uvicorn has already shut down gracefully; Ctrl-C is the normal way to stop a server.
        console.print("server stopped")
    finally:
        engine.close()
        sock.close()
