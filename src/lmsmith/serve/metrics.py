"""Prometheus metrics for `/metrics`, through prometheus-client.

Each app owns its registry, so several servers in one process (tests, the pipeline stage) never share
counts. Request-level figures (TTFT, TPOT, inter-token latency, end-to-end latency, tokens, cache hits)
are recorded as requests finish; engine figures (running, waiting, batch size, KV slots...) and upstream
figures are read from the client's `stats()` at scrape time, so they are never stale.
"""

from __future__ import annotations

import re
import time
from typing import Any, Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

PREFIX = "lmsmith"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
CONTENT_TYPE = CONTENT_TYPE_LATEST

# Engine stats that have a conventional name of their own; any other numeric stat is exported as
# lmsmith_engine_<name>.
_NAMED_STATS = {
    "running": ("num_requests_running", "Requests in the engine's running batch."),
    "waiting": ("num_requests_waiting", "Requests queued for admission (queue depth)."),
}


class _StatsCollector(Collector):
    """Gauges read from `stats()` when Prometheus scrapes."""

    def __init__(self, stats: Callable[[], dict[str, Any]]):
        self._stats = stats

    def collect(self) -> Iterable[GaugeMetricFamily]:
        try:
            stats = self._stats()
        except Exception:  # a scrape while the model loads or shuts down shows request metrics only
            return
        for key, value in sorted(stats.items()):
            if key == "upstreams" and isinstance(value, list):
                yield from _upstream_families(value)
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            name, doc = _NAMED_STATS.get(key, (f"engine_{_metric_name(key)}", f"Engine stat {key!r}."))
            family = GaugeMetricFamily(f"{PREFIX}_{name}", doc)
            family.add_metric([], float(value))
            yield family


def _upstream_families(upstreams: list[dict[str, Any]]) -> Iterable[GaugeMetricFamily]:
    outstanding = GaugeMetricFamily(f"{PREFIX}_upstream_outstanding_requests",
                                    "Requests in flight to each upstream.", labels=["upstream"])
    healthy = GaugeMetricFamily(f"{PREFIX}_upstream_healthy", "1 when the last health check passed.",
                                labels=["upstream"])
    served = GaugeMetricFamily(f"{PREFIX}_upstream_requests", "Requests each upstream has taken.",
                               labels=["upstream"])
    for upstream in upstreams:
        outstanding.add_metric([upstream["url"]], upstream["outstanding"])
        healthy.add_metric([upstream["url"]], 1.0 if upstream["healthy"] else 0.0)
        served.add_metric([upstream["url"]], upstream["requests"])
    yield from (outstanding, healthy, served)


def _metric_name(key: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", key)


class ServeMetrics:
    """The server's metrics; `render()` is the body of GET /metrics."""

    def __init__(self, stats: Callable[[], dict[str, Any]] | None = None):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.http_requests = Counter(f"{PREFIX}_http_requests", "HTTP requests by route and status.",
                                     ["method", "route", "status"], registry=r)
        self.requests = Counter(f"{PREFIX}_requests", "Generation requests by endpoint, model and finish reason.",
                                ["endpoint", "model", "finish_reason"], registry=r)
        self.ttft = Histogram(f"{PREFIX}_time_to_first_token_seconds", "Time to the first generated text.",
                              ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram(f"{PREFIX}_time_per_output_token_seconds",
                              "Mean time per output token after the first, per request.", ["model"],
                              buckets=TOKEN_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram(f"{PREFIX}_inter_token_latency_seconds", "Time between consecutive streamed pieces.",
                             ["model"], buckets=TOKEN_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram(f"{PREFIX}_e2e_request_latency_seconds", "Request latency, arrival to last token.",
                             ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "Prompt tokens processed.", ["model"], registry=r)
        self.generation_tokens = Counter(f"{PREFIX}_generation_tokens", "Tokens generated.", ["model"], registry=r)
        self.cache_hits = Counter(f"{PREFIX}_cache_hits", "Answers served from the response cache.",
                                  ["backend"], registry=r)
        self.cache_misses = Counter(f"{PREFIX}_cache_misses", "Cacheable requests not found in the cache.",
                                    ["backend"], registry=r)
        self.cache_errors = Counter(f"{PREFIX}_cache_errors", "Cache lookups or stores that failed (served anyway).",
                                    ["backend"], registry=r)
        self.long_doc_requests = Counter(f"{PREFIX}_long_doc_requests", "Requests answered by map-reduce.",
                                         registry=r)
        self.long_doc_chunks = Counter(f"{PREFIX}_long_doc_chunks", "Chunks mapped for long documents.", registry=r)
        self.embedding_inputs = Counter(f"{PREFIX}_embedding_inputs", "Texts embedded.", registry=r)
        self.moderation = Counter(f"{PREFIX}_moderation_decisions", "Moderation decisions by direction and action.",
                                  ["direction", "action"], registry=r)
        if stats is not None:
            r.register(_StatsCollector(stats))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTimer:
    """Times one generation as its chunks arrive: TTFT, inter-token gaps, TPOT and end-to-end latency."""

    def __init__(self, metrics: ServeMetrics, endpoint: str, model: str):
        self.metrics = metrics
        self.endpoint = endpoint
        self.model = model
        self.started = time.perf_counter()
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None

    def on_text(self) -> None:
        now = time.perf_counter()
        if self.first_token_at is None:
            self.first_token_at = now
            self.metrics.ttft.labels(self.model).observe(now - self.started)
        elif self.last_token_at is not None:
            self.metrics.itl.labels(self.model).observe(now - self.last_token_at)
        self.last_token_at = now

    def on_finish(self, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> None:
        now = time.perf_counter()
        self.metrics.e2e.labels(self.model).observe(now - self.started)
        if self.first_token_at is not None and completion_tokens > 1:
            self.metrics.tpot.labels(self.model).observe((now - self.first_token_at) / (completion_tokens - 1))
        self.metrics.prompt_tokens.labels(self.model).inc(prompt_tokens)
        self.metrics.generation_tokens.labels(self.model).inc(completion_tokens)
        self.metrics.requests.labels(self.endpoint, self.model, finish_reason).inc()
