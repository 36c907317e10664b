"""Prometheus metrics of one serving process (prometheus-client, a registry per app).

    capsule_requests_total{status}                    requests answered, by HTTP status
    capsule_request_duration_seconds{status}          latency histogram, by HTTP status
    capsule_batch_size                                histogram of batch sizes run
    capsule_queue_depth                               requests waiting for a batch (at scrape)
    capsule_model_info{name,version}                  1 for the version serving now
    capsule_model_reloads_total{result}               hot reloads: loaded | rejected
"""
from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, queue_depth: Callable[[], float]) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.requests = Counter("capsule_requests", "Requests answered, by HTTP status.", ["status"], registry=r)
        self.latency = Histogram("capsule_request_duration_seconds", "Request latency, by HTTP status.",
                                 ["status"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("capsule_batch_size", "Requests per batched forward.",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.queue_depth = Gauge("capsule_queue_depth", "Requests waiting for a batch.", registry=r)
        self.queue_depth.set_function(queue_depth)
        self.model_info = Gauge("capsule_model_info", "1 for the model version serving now.",
                                ["name", "version"], registry=r)
        self.reloads = Counter("capsule_model_reloads", "Hot reloads, by result.", ["result"], registry=r)
        # label lookups cost more than the observation itself: cache the children per status
        self._by_status: dict[int, tuple] = {}

    def observe(self, status: int, seconds: float) -> None:
        pair = self._by_status.get(status)
        if pair is None:
            s = str(status)
            pair = self._by_status[status] = (self.requests.labels(s), self.latency.labels(s))
        pair[0].inc()
        pair[1].observe(seconds)

    def set_model(self, name: str, version: str) -> None:
        self.model_info.clear()
        self.model_info.labels(name, version).set(1)

    def render(self) -> bytes:
        return generate_latest(self.registry)
