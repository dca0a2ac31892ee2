"""Per-key limits: requests and tokens per minute, requests in flight, and a total token quota.

Minutes are fixed windows (the clock's minute): a refusal says how many seconds remain in it
(`Retry-After`). Tokens are counted when a request finishes (prompt + completion), so a minute's last
request may take the count past `tpm`; the next one waits. The quota is the key store's `used_tokens`
(one database for every replica). Counters live in this process (`MemoryLimiter`) or in Redis
(`RedisLimiter`, redis-py's asyncio client) when several replicas share the limits.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass
from typing import Optional

from lmsmith.gateway.keys import ApiKey

WINDOW_S = 60


@dataclass(frozen=True)
class Refusal:
    message: str
    retry_after_s: int
    code: str = "rate_limit_exceeded"


def _window(now: float) -> tuple[int, int]:
    """(this minute's number, whole seconds until the next one, at least 1)."""
    return int(now // WINDOW_S), max(1, math.ceil(WINDOW_S - now % WINDOW_S))


def _quota_refusal(key: ApiKey) -> Optional[Refusal]:
    if key.quota_tokens is not None and key.used_tokens >= key.quota_tokens:
        return Refusal(f"key {key.id} has used its quota of {key.quota_tokens:,} tokens", 3600, "insufficient_quota")
    return None


class MemoryLimiter:
    """Counters in this process (one server)."""

    def __init__(self) -> None:
        self._lock = asyncio.Lock()
        self._requests: dict[tuple[str, int], int] = {}
        self._tokens: dict[tuple[str, int], int] = {}
        self._in_flight: dict[str, int] = {}

    async def admit(self, key: ApiKey, now: float | None = None) -> Optional[Refusal]:
        """Count the request in, or say why not (nothing is counted then)."""
        if (refusal := _quota_refusal(key)) is not None:
            return refusal
        window, wait = _window(time.time() if now is None else now)
        async with self._lock:
            self._forget_before(window)
            if key.rpm is not None and self._requests.get((key.id, window), 0) >= key.rpm:
                return Refusal(f"key {key.id}: {key.rpm} requests per minute", wait)
            if key.tpm is not None and self._tokens.get((key.id, window), 0) >= key.tpm:
                return Refusal(f"key {key.id}: {key.tpm:,} tokens per minute", wait)
            if key.concurrency is not None and self._in_flight.get(key.id, 0) >= key.concurrency:
                return Refusal(f"key {key.id}: {key.concurrency} requests at once", 1)
            self._requests[(key.id, window)] = self._requests.get((key.id, window), 0) + 1
            self._in_flight[key.id] = self._in_flight.get(key.id, 0) + 1
        return None

    async def finish(self, key: ApiKey, tokens: int, now: float | None = None) -> None:
        window, _ = _window(time.time() if now is None else now)
        async with self._lock:
            self._in_flight[key.id] = max(0, self._in_flight.get(key.id, 0) - 1)
            if tokens:
                self._tokens[(key.id, window)] = self._tokens.get((key.id, window), 0) + tokens

    def _forget_before(self, window: int) -> None:
        for table in (self._requests, self._tokens):
            for stale in [entry for entry in table if entry[1] < window]:
                del table[stale]

    async def close(self) -> None:
        return None


class RedisLimiter:
    """Counters in Redis, shared by every replica that points at the same server."""

    PREFIX = "lmsmith:limits"

    def __init__(self, url: str):
        import redis.asyncio as redis

        self._redis = redis.from_url(url)

    async def admit(self, key: ApiKey, now: float | None = None) -> Optional[Refusal]:
        if (refusal := _quota_refusal(key)) is not None:
            return refusal
        window, wait = _window(time.time() if now is None else now)
        requests_key = f"{self.PREFIX}:{key.id}:{window}:requests"
        tokens_key = f"{self.PREFIX}:{key.id}:{window}:tokens"
        flight_key = f"{self.PREFIX}:{key.id}:in_flight"
        if key.tpm is not None and int(await self._redis.get(tokens_key) or 0) >= key.tpm:
            return Refusal(f"key {key.id}: {key.tpm:,} tokens per minute", wait)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.incr(requests_key)
            pipe.expire(requests_key, 2 * WINDOW_S)
            pipe.incr(flight_key)
            pipe.expire(flight_key, 3600)  # a replica that dies mid-request cannot hold a slot for ever
            counted, _, in_flight, _ = await pipe.execute()
        if key.rpm is not None and counted > key.rpm:
            await self._redis.decr(flight_key)
            return Refusal(f"key {key.id}: {key.rpm} requests per minute", wait)
        if key.concurrency is not None and in_flight > key.concurrency:
            await self._redis.decr(flight_key)
            return Refusal(f"key {key.id}: {key.concurrency} requests at once", 1)
        return None

    async def finish(self, key: ApiKey, tokens: int, now: float | None = None) -> None:
        window, _ = _window(time.time() if now is None else now)
        tokens_key = f"{self.PREFIX}:{key.id}:{window}:tokens"
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.decr(f"{self.PREFIX}:{key.id}:in_flight")
            if tokens:
                pipe.incrby(tokens_key, tokens)
                pipe.expire(tokens_key, 2 * WINDOW_S)
            await pipe.execute()

    async def close(self) -> None:
        await self._redis.aclose()
