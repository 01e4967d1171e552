"""Prometheus metrics of the serving API (one registry per process).

``feedbeam_http_requests_total{route,status}`` and
``feedbeam_http_request_seconds{route}`` for every request,
``feedbeam_serving_events_total{event}`` for fallbacks, failures and
rebuilds, and ``feedbeam_store_breaker_open{store}`` (1 while a circuit is
open). With several workers each process answers ``/metrics`` for itself
(the ``worker`` label tells them apart).
"""
from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST

# Feed reads take ~1 ms; the fallback path tens of ms.
_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        worker = str(os.getpid())
        self._requests = Counter("feedbeam_http_requests", "HTTP requests by route and status",
                                 ["route", "status", "worker"], registry=self.registry)
        self._latency = Histogram("feedbeam_http_request_seconds", "HTTP request latency",
                                  ["route", "worker"], buckets=_BUCKETS, registry=self.registry)
        self._events = Counter("feedbeam_serving_events", "Fallbacks, store failures, rebuilds",
                               ["event", "worker"], registry=self.registry)
        self._breaker = Gauge("feedbeam_store_breaker_open", "1 while the store's circuit is open",
                              ["store", "worker"], registry=self.registry)
        self._worker = worker
        self._by_route: dict[tuple[str, int], tuple] = {}

    def request(self, route: str, status: int, seconds: float) -> None:
        key = (route, status)
        children = self._by_route.get(key)
        if children is None:  # label lookups cost more than the observation: cache them
            children = (self._requests.labels(route, str(status), self._worker),
                        self._latency.labels(route, self._worker))
            self._by_route[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def event(self, name: str) -> None:
        self._events.labels(name, self._worker).inc()

    def render(self, breakers: dict[str, str]) -> bytes:
        for store, state in breakers.items():
            self._breaker.labels(store, self._worker).set(0 if state == "closed" else 1)
        return generate_latest(self.registry)
