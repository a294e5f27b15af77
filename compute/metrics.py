"""Prometheus metrics of compute, served on its own port (a thread: answers even if the loop stalls)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from compute.jobs.store import STATES

if TYPE_CHECKING:
    from compute.tables import TableManager
from compute.pool import PoolStats
from offload.buckets import BATCH_BYTES_BUCKETS, BATCH_SIZE_BUCKETS, BATCH_WAIT_BUCKETS, LATENCY_BUCKETS


class CallMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.calls = Counter("offload_compute_calls", "RPCs served, by status code", ["method", "code"], registry=registry)
        self.seconds = Histogram(
            "offload_compute_call_seconds", "RPC latency inside compute", ["method"], buckets=LATENCY_BUCKETS, registry=registry
        )


class BatchMetrics:
    """Of the Dispatch RPCs (batches of calls from offload.client and the gateway)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.calls = Histogram(
            "offload_compute_batch_calls", "Calls per Dispatch RPC (batch size)", buckets=BATCH_SIZE_BUCKETS, registry=registry
        )
        self.bytes = Histogram(
            "offload_compute_batch_bytes", "Request bytes per Dispatch RPC", buckets=BATCH_BYTES_BUCKETS, registry=registry
        )
        self.wait = Histogram(
            "offload_compute_batch_wait_seconds",
            "Coalescing wait the client reported: how long a batch's oldest call waited for it to leave",
            buckets=BATCH_WAIT_BUCKETS,
            registry=registry,
        )


class PoolMetrics:
    """Of the pool's dynamic batching, per heavy operation (compute.pool.DispatchObserver)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._size = Histogram(
            "offload_compute_pool_batch_size",
            "Calls per pool task (1: the call ran alone; a segmented scan has one task per segment)",
            ["method"],
            buckets=BATCH_SIZE_BUCKETS,
            registry=registry,
        )
        self._wait = Histogram(
            "offload_compute_pool_queue_wait_seconds",
            "How long a heavy call waited for a worker",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self._calls = Counter(
            "offload_compute_pool_calls", "Heavy calls handed to a worker", ["method"], registry=registry
        )
        self._batched = Counter(
            "offload_compute_pool_batched_calls",
            "Heavy calls that shared a pool task with others (divide by offload_compute_pool_calls: the fraction batched)",
            ["method"],
            registry=registry,
        )

    def dispatched(self, operation: str, size: int, queue_waits: list[float], newly_batched: int) -> None:
        self._size.labels(operation).observe(size)
        wait = self._wait.labels(operation)
        for seconds in queue_waits:
            wait.observe(seconds)
        self._calls.labels(operation).inc(len(queue_waits))
        if newly_batched:
            self._batched.labels(operation).inc(newly_batched)


class PoolCollector(Collector):
    """Reads pool and table figures at scrape time (no bookkeeping on the hot path)."""

    def __init__(self, pool_stats: Callable[[], PoolStats | None], table_bytes: Callable[[], int]) -> None:
        self._pool_stats = pool_stats
        self._table_bytes = table_bytes

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily("offload_cache_bytes", "Bytes of the shared table", value=self._table_bytes())
        stats = self._pool_stats()
        if stats is None:
            return
        yield GaugeMetricFamily("offload_pool_size", "Pool worker processes", value=stats.size)
        yield GaugeMetricFamily("offload_pool_busy", "Workers running a task", value=stats.busy)
        yield GaugeMetricFamily("offload_pool_queued", "Tasks waiting for a worker", value=stats.queued)
        yield GaugeMetricFamily("offload_pool_healthy", "1 when the pool serves, 0 while rebuilding", value=int(stats.healthy))
        yield GaugeMetricFamily("offload_pool_rebuilds", "Pool rebuilds after a worker died", value=stats.rebuilds)


class TableCollector(Collector):
    """The table generation serving, its source and load, read at scrape time (compute/tables.py)."""

    def __init__(self, tables: Callable[[], "TableManager | None"]) -> None:
        self._tables = tables

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        tables = self._tables()
        if tables is None or tables.table is None:
            return
        status = tables.status()
        spec = status.table.spec
        info = GaugeMetricFamily(
            "offload_compute_table_info", "The table serving now (value 1), its generation and source", labels=["generation", "source"]
        )
        info.add_metric([str(spec.generation), spec.source], 1)
        yield info
        yield GaugeMetricFamily("offload_compute_table_generation", "Generation of the table serving now", value=spec.generation)
        yield GaugeMetricFamily(
            "offload_compute_table_loaded_timestamp_seconds", "When the table serving now started serving", value=status.loaded_at
        )
        yield GaugeMetricFamily("offload_compute_table_load_seconds", "How long the table serving now took to load", value=status.load_seconds)
        yield GaugeMetricFamily("offload_compute_table_loading", "1 while a LoadTable is under way", value=int(status.loading))
        yield GaugeMetricFamily(
            "offload_compute_table_retiring_generations",
            "Old generations still finishing calls (their shared memory is not released yet)",
            value=len(status.retiring),
        )
        loads = CounterMetricFamily("offload_compute_table_loads", "LoadTable calls that switched (ok) or not (failed)", labels=["outcome"])
        for outcome, count in tables.loads.items():
            loads.add_metric([outcome], count)
        yield loads


class JobsCollector(Collector):
    """`offload_compute_jobs{state}`: jobs in the store per state, read at scrape time."""

    def __init__(self, counts: Callable[[], dict[str, int] | None]) -> None:
        self._counts = counts

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            counts = self._counts()
        except Exception:  # the store unreadable for a moment: no sample beats a failed scrape
            counts = None
        if counts is None:
            return
        family = GaugeMetricFamily("offload_compute_jobs", "Jobs in the store, by state", labels=["state"])
        for state in STATES:
            family.add_metric([state], counts.get(state, 0))
        yield family
