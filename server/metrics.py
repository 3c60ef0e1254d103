"""Prometheus metrics: `GET /metrics`, one registry per app.

    quorum_http_requests_total{route, method, status}        requests answered
    quorum_http_rejected_total{reason}                       refused before any work: overload
    quorum_http_request_duration_seconds{route, method}      latency histogram
    quorum_modules_evaluated                                 modules combined per answer (histogram)
    quorum_degraded_answers_total                            answers with fewer modules than requested
    quorum_module_outcomes_total{module, outcome}            ok | error | timeout | nonfinite | injected
    quorum_module_ready{module}                              1 in rotation; 0 quarantined or breaker open

Per-module figures are read from the engine's own counters when Prometheus scrapes, so a
request pays for two observations, not one per module. Every label takes a bounded set of
values, whatever clients send: `route` is the route's template (`/predict`) or `unmatched`,
`method` a standard HTTP method or `other`, `module` an id of the bundle.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from quorum.runtime.results import Prediction

if TYPE_CHECKING:
    from quorum.runtime.engine import Engine

__all__ = ["CONTENT_TYPE_LATEST", "Metrics", "RequestMetrics", "ShardCollector"]

OUTCOMES = ("ok", "error", "timeout", "nonfinite", "injected")
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})


class Metrics:
    """The app's registry and the metrics the request path observes."""

    def __init__(self, engine: Callable[[], Engine | None]):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "quorum_http_requests", "HTTP requests answered.", ["route", "method", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "quorum_http_request_duration_seconds",
            "Time from request to the end of the response.",
            ["route", "method"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
            registry=self.registry,
        )
        self.modules_evaluated = Histogram(
            "quorum_modules_evaluated",
            "Modules whose logits were combined in one answer.",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
            registry=self.registry,
        )
        self.degraded = Counter(
            "quorum_degraded_answers", "Answers from fewer modules than were requested.", registry=self.registry
        )
        self.rejected = Counter(
            "quorum_http_rejected", "Requests refused before any work, by reason.", ["reason"], registry=self.registry
        )
        self.registry.register(_ModuleCollector(engine))

    def observe_answer(self, prediction: Prediction) -> None:
        self.modules_evaluated.observe(len(prediction.used))
        if prediction.degraded:
            self.degraded.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _ModuleCollector(Collector):
    """Per-module outcomes and readiness, read from the engine at scrape time."""

    def __init__(self, engine: Callable[[], Engine | None]):
        self._engine = engine

    def collect(self) -> Iterator[Metric]:
        engine = self._engine()
        if engine is None:
            return
        outcomes = CounterMetricFamily(
            "quorum_module_outcomes", "Module evaluations by outcome.", labels=["module", "outcome"]
        )
        ready = GaugeMetricFamily("quorum_module_ready", "1 when the module is in rotation.", labels=["module"])
        for m in engine.modules:
            module = str(m.id)
            outcomes.add_metric([module, "ok"], m.calls - m.failures)
            for kind in OUTCOMES[1:]:
                outcomes.add_metric([module, kind], m.failure_kinds.get(kind, 0))
            ready.add_metric([module], 1.0 if m.status == "healthy" and m.breaker != "open" else 0.0)
        yield outcomes
        yield ready


class ShardCollector(Collector):
    """A gateway's shards: `quorum_shard_up{shard}`, 1 while it answers, and the modules it runs."""

    def __init__(self, gateway: Callable[[], Any]):
        self._gateway = gateway

    def collect(self) -> Iterator[Metric]:
        gateway = self._gateway()
        if gateway is None:
            return
        up = GaugeMetricFamily("quorum_shard_up", "1 while the shard answers its health checks.", labels=["shard"])
        modules = GaugeMetricFamily("quorum_shard_modules", "Modules the shard runs now.", labels=["shard"])
        for shard in gateway.shards:
            up.add_metric([shard.url], 1.0 if shard.up else 0.0)
            modules.add_metric([shard.url], float(len(shard.in_rotation) if shard.up else 0))
        yield up
        yield modules


class RequestMetrics:
    """ASGI middleware: count and time every HTTP request by route template, method and status."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 500  # an exception that escapes becomes a 500 further out

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            method = scope["method"] if scope["method"] in METHODS else "other"
            self.metrics.requests.labels(route, method, str(status)).inc()
            self.metrics.latency.labels(route, method).observe(time.perf_counter() - t0)
