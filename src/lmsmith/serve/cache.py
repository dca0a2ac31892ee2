"""The response cache: a whole answer stored under an exact hash of what produced it.

Only deterministic requests are cached: greedy ones (temperature 0) and seeded ones, whose answer the
engine repeats. The key covers the model (base or adapter), the messages or prompt, every sampling field
and the long_doc settings. Two backends share one small async interface: `MemoryCache`, an LRU with a TTL
(`collections.OrderedDict`), and `RedisCache` on redis-py's asyncio client, where `SET ... EX` gives the
TTL and several servers can share one cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Protocol

from lmsmith.errors import UserError
from lmsmith.serve.client import GenerateRequest
from lmsmith.serve.config import CacheConfig, LongDocSettings

CACHEABLE_FINISH_REASONS = ("stop", "length")


@dataclass(frozen=True)
class CachedAnswer:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), ensure_ascii=False)

    @classmethod
    def from_json(cls, raw: str | bytes) -> "CachedAnswer":
        return cls(**json.loads(raw))


def is_deterministic(request: GenerateRequest) -> bool:
    """Whether the answer can be replayed: the cache keeps text, so answers with logprobs are never cached."""
    if request.wants_logprobs:
        return False
    return request.params.temperature == 0 or request.params.seed is not None


def cache_key(request: GenerateRequest, long_doc: LongDocSettings | None = None) -> str:
    """A stable hash of everything that decides the answer."""
    material = {
        "model": request.model,
        "kind": request.kind,
        "messages": request.messages,
        "tools": request.tools,
        "prompt": request.prompt,
        "prompt_ids": request.prompt_ids,
        "sampling": dataclasses.asdict(request.params),
        "long_doc": None if long_doc is None else long_doc.model_dump(),
    }
    encoded = json.dumps(material, sort_keys=True, ensure_ascii=False, default=list).encode("utf-8")
    return hashlib.sha256(encoded).hexdigest()


class ResponseCache(Protocol):
    backend: str

    async def get(self, key: str) -> CachedAnswer | None: ...

    async def put(self, key: str, answer: CachedAnswer) -> None: ...

    async def close(self) -> None: ...


class MemoryCache:
    """An LRU of at most `max_entries` answers, each valid for `ttl_s` seconds."""

    backend = "memory"

    def __init__(self, max_entries: int, ttl_s: float, clock: Callable[[], float] = time.monotonic):
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, CachedAnswer]] = OrderedDict()
        self._lock = threading.Lock()

    async def get(self, key: str) -> CachedAnswer | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            expires, answer = entry
            if self._clock() >= expires:
                del self._entries[key]
                return None
            self._entries.move_to_end(key)
            return answer

    async def put(self, key: str, answer: CachedAnswer) -> None:
        with self._lock:
            self._entries[key] = (self._clock() + self.ttl_s, answer)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)

    async def close(self) -> None:
        with self._lock:
            self._entries.clear()


class RedisCache:
    """Answers in Redis under `prefix + key`, expiring after `ttl_s` (Redis does the expiry)."""

    backend = "redis"

    def __init__(self, url: str, ttl_s: float, prefix: str = "lmsmith:cache:"):
        import redis.asyncio as redis

        self.url = url
        self.ttl_ms = max(1, int(ttl_s * 1000))
        self.prefix = prefix
        self._redis = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)

    async def get(self, key: str) -> CachedAnswer | None:
        raw = await self._redis.get(self.prefix + key)
        return None if raw is None else CachedAnswer.from_json(raw)

    async def put(self, key: str, answer: CachedAnswer) -> None:
        await self._redis.set(self.prefix + key, answer.to_json(), px=self.ttl_ms)

    async def ping(self) -> None:
        await self._redis.ping()

    async def close(self) -> None:
        await self._redis.aclose()


def build_cache(config: CacheConfig) -> ResponseCache | None:
    if config.backend == "none":
        return None
    if config.backend == "memory":
        return MemoryCache(config.max_entries, config.ttl_s)
    if not config.redis_url.startswith(("redis://", "rediss://", "unix://")):
        raise UserError(f"cache.redis_url: {config.redis_url!r} is not a redis:// URL")
    return RedisCache(config.redis_url, config.ttl_s, config.key_prefix)

