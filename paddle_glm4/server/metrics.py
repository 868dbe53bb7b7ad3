"""The server's Prometheus metrics (GET /metrics, text format), through prometheus_client: requests running and
waiting, tokens generated, time to first token, inter-token latency, and KV cache memory in use.

Each app has its own registry, so that two apps in one process (tests) do not share counts.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

if TYPE_CHECKING:
    from .worker import Worker

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self, worker: Worker):
        self.registry = CollectorRegistry()
        engine = worker.engine
        Gauge(
            "glm4_requests_admitted", "Requests admitted (generating or waiting)", registry=self.registry
        ).set_function(worker.admitted)
        if engine is not None:
            Gauge(
                "glm4_requests_running", "Requests in the running batch (prefilling included)", registry=self.registry
            ).set_function(lambda: len(engine.running) + len(engine.prefilling))
            Gauge(
                "glm4_requests_waiting", "Requests waiting for a row or KV memory", registry=self.registry
            ).set_function(lambda: len(engine.waiting))
            Gauge("glm4_kv_cache_bytes", "KV cache memory held", registry=self.registry).set_function(
                lambda: engine.kv_bytes
            )
        self.tokens = Counter("glm4_generated_tokens", "Tokens generated", registry=self.registry)
        self.ttft = Histogram(
            "glm4_time_to_first_token_seconds",
            "From admission to the first token",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.inter_token = Histogram(
            "glm4_inter_token_latency_seconds",
            "Between two tokens of one request",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )

    def token(self, admitted: float, previous: float | None) -> None:
        """One token of a request admitted at `admitted`, whose previous token came at `previous`
        (time.perf_counter() times)."""
        now = time.perf_counter()
        self.tokens.inc()
        if previous is None:
            self.ttft.observe(now - admitted)
        else:
            self.inter_token.observe(now - previous)
