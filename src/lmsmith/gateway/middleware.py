"""The gateway in front of the API: who is calling, may they call this route and model, are they within
their limits, and what did the call cost.

Plain ASGI (like the request-id middleware), so streamed answers pass through unbuffered. It matches the
route itself with the app's router (Starlette's own matching) to read the permission table before any
endpoint runs. The request body, read and bounded once by the body-limit middleware outside it
(`lmsmith.serve.api.BodyLimitMiddleware`), gives the model a key's scope is checked against.
Tokens are counted from what the endpoint leaves in the request state (`usage_tokens`) once the
response has been sent, stream or not.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Optional

from starlette.routing import Match

from lmsmith.gateway import rbac
from lmsmith.gateway.audit import AuditLog
from lmsmith.gateway.config import GatewayConfig
from lmsmith.gateway.keys import ApiKey, KeyStore
from lmsmith.serve.protocol import error_body



class Gateway:
    """The key store, the limiter and the settings the middleware enforces."""

    def __init__(self, store: KeyStore, config: GatewayConfig, limiter: Any = None, audit: "AuditLog | None" = None,
                 registry: Any = None, feedback: Any = None):
        from lmsmith.gateway.limits import MemoryLimiter, RedisLimiter

        self.store, self.config, self.audit, self.registry, self.feedback = store, config, audit, registry, feedback
        if limiter is None:
            url = config.limits_redis_url
            limiter = RedisLimiter(url.get_secret_value()) if url is not None else MemoryLimiter()
        self.limiter = limiter

    @property
    def required(self) -> bool:
        """Keys are required on every route once the store holds an active one."""
        return self.store.has_keys()

    async def close(self) -> None:
        await self.limiter.close()
        self.store.close()
        for held in (self.registry, self.feedback):
            if held is not None:
                held.close()


def _bearer(scope: dict[str, Any]) -> Optional[str]:
    headers = dict(scope.get("headers") or [])
    value = headers.get(b"authorization", b"").decode("latin-1")
    if value[:7].lower() == "bearer ":
        return value[7:].strip()
    api_key = headers.get(b"x-api-key", b"").decode("latin-1").strip()
    return api_key or None


async def _respond(send: Any, status: int, message: str, type_: str, code: str | None = None,
                   headers: dict[str, str] | None = None) -> None:
    body = json.dumps(error_body(message, type_, None, code)).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(name.lower().encode(), value.encode()) for name, value in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class GatewayMiddleware:
    def __init__(self, app: Any, gateway: Gateway, router: Any):
        self.app, self.gateway, self.router = app, gateway, router

    def _route(self, scope: dict[str, Any]) -> Optional[str]:
        for route in self.router.routes:
            match, _ = route.matches(scope)
            if match is Match.FULL:
                return route.path
        return None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        template = self._route(scope)
        if template is None:  # no such route: the app answers 404 (or 405) itself
            await self.app(scope, receive, send)
            return
        method = "GET" if scope["method"] == "HEAD" else scope["method"]

        async def refuse(key: Optional[ApiKey], status: int, message: str, type_: str, code: str | None = None,
                         headers: dict[str, str] | None = None) -> None:
            await _respond(send, status, message, type_, code, headers)
            await self._audit(scope, key, method, template, status, None, 0.0, refused=message)

        if not rbac.known(method, template):
            await refuse(None, 403, f"{method} {template} is not in the permission table", "permission_error")
            return
        presented = _bearer(scope)
        key = await asyncio.to_thread(self.gateway.store.authenticate, presented) if presented else None
        if key is None:
            client = scope.get("client") or (None, None)
            open_here = template in self.gateway.config.open_routes and self.gateway.config.trusts(client[0])
            # Without any key in the store nothing is required (OpenAI SDKs send some key regardless).
            if open_here or not await asyncio.to_thread(lambda: self.gateway.required):
                await self._forward(scope, receive, send, None, method, template)
                return
            message = ("invalid, revoked or expired API key" if presented else
                       "this server requires an API key (Authorization: Bearer lms_...)")
            await refuse(None, 401, message, "invalid_request_error", "invalid_api_key")
            return
        if not rbac.allowed(method, template, key.role):
            await refuse(key, 403, f"role {key.role} may not call {method} {template}", "permission_error")
            return
        if (method, template) in rbac.MODEL_SCOPED and key.models:
            model = _model_of(scope.setdefault("state", {}).get("request_body", b""))
            if model is not None and not key.allows_model(model):
                await refuse(key, 403, f"this key may not use model {model!r}", "permission_error", "model_not_allowed")
                return
        refusal = await self.gateway.limiter.admit(key)
        if refusal is not None:
            type_ = "insufficient_quota" if refusal.code == "insufficient_quota" else "requests"
            await refuse(key, 429, refusal.message, type_, refusal.code, {"Retry-After": str(refusal.retry_after_s)})
            return
        scope.setdefault("state", {})["api_key"] = key
        try:
            await self._forward(scope, receive, send, key, method, template)
        finally:
            tokens = int(scope["state"].get("usage_tokens", 0))
            await self.gateway.limiter.finish(key, tokens)
            if tokens:
                await asyncio.to_thread(self.gateway.store.add_usage, key.id, tokens)

    async def _audit(self, scope: dict[str, Any], key: Optional[ApiKey], method: str, template: str, status: int,
                     response: Any, latency_ms: float, refused: str | None = None, full: bool = False) -> None:
        """One audit record (when the log is on); `response` is (sha256 hex, kept bytes) or None."""
        if self.gateway.audit is None:
            return
        from lmsmith.gateway.audit import request_record

        state = scope.setdefault("state", {})
        body = state.get("request_body")
        record = request_record(
            request_id=str(state.get("request_id", "")), key_id=key.id if key else None,
            role=key.role if key else None, method=method, route=template,
            model=_model_of(body) if body is not None else None, status=status,
            tokens=int(state.get("usage_tokens", 0)), latency_ms=latency_ms, moderation=state.get("moderation"),
            request_body=body or b"", response_body=response[1] if response else b"", full_text=full)
        if body is None:
            record["prompt_sha256"] = None  # a route without a body (GET, DELETE)
        record["response_sha256"] = response[0] if response else None
        if refused is not None:
            record["refused"] = refused
        if state.get("end_user"):
            record["user"] = state["end_user"]
        await asyncio.to_thread(self.gateway.audit.append, record)

    async def _forward(self, scope: dict[str, Any], receive: Any, send: Any, key: Optional[ApiKey], method: str,
                       template: str) -> None:
        """Run the app; with an audit log, record the request once its response has gone out."""
        if self.gateway.audit is None:
            await self.app(scope, receive, send)
            return
        import hashlib
        import time

        state = scope.setdefault("state", {})
        state.setdefault("request_body", b"")  # read (and bounded) by the body-limit middleware outside
        model = _model_of(state["request_body"])
        full = key is not None and (key.id in self.gateway.config.audit_full_text
                                    or (model is not None and model in self.gateway.config.audit_full_text))
        status, digest, kept = [500], hashlib.sha256(), []
        started = time.perf_counter()

        async def watch(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            elif message["type"] == "http.response.body":
                digest.update(message.get("body", b""))
                if full:
                    kept.append(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            await self._audit(scope, key, method, template, status[0], (digest.hexdigest(), b"".join(kept)),
                              1000 * (time.perf_counter() - started), full=full)


def _model_of(body: bytes) -> Optional[str]:
    try:
        parsed = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None  # the endpoint answers the malformed body itself
    model = parsed.get("model") if isinstance(parsed, dict) else None
    return model if isinstance(model, str) else None


def key_of(request: Any) -> Optional[ApiKey]:
    """The key a request came with (None without the gateway, or on an open route)."""
    return request.scope.get("state", {}).get("api_key")
