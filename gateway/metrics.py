"""Prometheus metrics of one gateway worker, and /metrics for all of them.

With several uvicorn workers each process writes its samples to PROMETHEUS_MULTIPROC_DIR
(set up by the launcher, `gateway/__main__.py`, before any worker imports prometheus_client);
/metrics, whichever worker answers it, aggregates every worker's files. Without that variable
(one process, tests) the app's own registry is served.
"""

from __future__ import annotations

import os

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import multiprocess

BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
BATCH_WAIT_BUCKETS = (0.00001, 0.00003, 0.0001, 0.0003, 0.001, 0.003, 0.01, 0.03, 0.1)
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "offload_gateway_requests",
            "HTTP requests served by generated routes, by RPC and HTTP status.",
            ["rpc", "status"],
            registry=registry,
        )
        self.latency = Histogram(
            "offload_gateway_request_seconds",
            "Time from request to response of generated routes, by RPC.",
            ["rpc"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.inflight = Gauge(
            "offload_gateway_inflight_requests",
            "Requests in flight on generated routes.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.ready = Gauge(
            "offload_gateway_compute_ready",
            "1 when the last readiness check found compute SERVING.",
            registry=registry,
            multiprocess_mode="liveall",
        )

        self.batch_calls = Histogram(
            "offload_gateway_batch_calls",
            "Calls per batched RPC to compute (batch size).",
            buckets=BATCH_SIZE_BUCKETS,
            registry=registry,
        )
        self.batch_wait = Histogram(
            "offload_gateway_batch_wait_seconds",
            "Coalescing wait: from the first call of a batch to the batch leaving.",
            buckets=BATCH_WAIT_BUCKETS,
            registry=registry,
        )

    def batch_sent(self, calls: int, waited_seconds: float) -> None:
        """offload.client.BatchObserver: one observation per batch, not per call."""
        self.batch_calls.observe(calls)
        self.batch_wait.observe(waited_seconds)

    def render(self) -> tuple[bytes, str]:
        """The exposition text: every worker's samples in multiprocess mode, else this app's."""
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def worker_exited(pid: int) -> None:
    """Drop a finished worker's live gauges (call at its shutdown)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.mark_process_dead(pid)
