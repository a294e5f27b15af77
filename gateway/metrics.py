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

from offload.buckets import BATCH_SIZE_BUCKETS, BATCH_WAIT_BUCKETS, LATENCY_BUCKETS
from offload.memory import PssCollector, children, is_resource_tracker



# Set by the master (gateway/prefork.py) before it forks: its workers know whose children they are.
MASTER_PID_VARIABLE = "OFFLOAD_GATEWAY_MASTER_PID"


def gateway_processes() -> dict[int, str]:
    """pid -> role of this gateway's processes: gunicorn's master and every worker it forked
    (its children). Outside the launcher (an app made in-process, tests), this process alone."""
    master = int(os.environ.get(MASTER_PID_VARIABLE) or 0)
    if master != os.getppid():
        return {os.getpid(): "gateway"}
    forked = [pid for pid in children(master) if not is_resource_tracker(pid)]
    return {master: "gateway-master", **{pid: "gateway" for pid in forked}}


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        # Read at scrape time by the worker that answers, for all of them (the files of
        # multiprocess mode hold no memory figures).
        self._pss = PssCollector(gateway_processes)
        registry.register(self._pss)
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
            registry.register(self._pss)
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def worker_exited(pid: int) -> None:
    """Drop a finished worker's live gauges (call at its shutdown)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.mark_process_dead(pid)
