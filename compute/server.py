"""ComputeServer: assembles table, pool, gRPC server, health, reflection, metrics, heartbeat.

Start-up order matters:
  1. sweep stale segments and semaphores, start the forkserver (before any gRPC object: grpc#16001);
  2. listen, with health NOT_SERVING, so orchestrators see "alive, not ready";
  3. build the table in a thread (the loop keeps answering health: compute/tables.py picks the
     source, the state file's or the settings'), then start the pool;
  4. SERVING.
SIGTERM/SIGINT: NOT_SERVING, new calls refused, in-flight calls get `drain_grace_seconds`,
the pool stops, the segments are removed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, start_http_server

from compute import pool as pool_module
from compute import served, shm
from compute.auth import DISPATCH_SCOPE, TokenInterceptor
from compute.batching import BATCHING_SERVICE, BatchingServicer
from compute.calls import CallPath
from compute.jobs.runner import JobService
from compute.metrics import BatchMetrics, CallMetrics, JobsCollector, PoolCollector, PoolMetrics, TableCollector
from compute.pool import HealingPool
from compute.runtime import Runtime
from compute.servicer import OperationServicer
from compute.settings import ComputeSettings
from compute.table import EmbeddingTable
from compute.tables import TableManager
from offload.config import ConfigError
from offload import loop_debug
from offload.heartbeat import Heartbeat
from offload import tracing
from offload.tracing import Tracing
from offload.keys import KeyRing
from offload.memory import PssCollector
from offload.v1 import http_options_pb2

log = logging.getLogger("compute.server")

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def required_scopes(calls: CallPath) -> dict[str, frozenset[str]]:
    """gRPC path -> the scopes a direct caller's key needs: each RPC's (offload.v1.auth), and
    `dispatch` for batches (compute/auth.py)."""
    scopes = {f"/{BATCHING_SERVICE}/Dispatch": frozenset([DISPATCH_SCOPE])}
    for path, bound in calls.by_path.items():
        options = bound.method.GetOptions()
        if options.HasExtension(http_options_pb2.auth):
            scopes[path] = frozenset(options.Extensions[http_options_pb2.auth].scopes)
    return scopes


class ComputeServer:
    """`await serve()` runs until SIGTERM/SIGINT; or `start()` then `stop()` (tests)."""

    def __init__(self, settings: ComputeSettings) -> None:
        """Raises offload.config.ConfigError when the operations to serve are misconfigured."""
        self.settings = settings
        self._operations = served.operations(settings)
        self._keys = None
        if settings.api_keys or settings.api_keys_file is not None:
            try:
                self._keys = KeyRing(settings.api_keys, settings.api_keys_file)
            except (ValueError, OSError) as exc:
                raise ConfigError([f"API keys: {exc}"]) from None
        try:
            tracing.check_env()  # the tracer itself is built in start(), after the pool's forkserver
        except ValueError as exc:
            raise ConfigError([str(exc)]) from None
        self.tracing: Tracing | None = None
        self.registry = CollectorRegistry()
        self.tables: TableManager | None = None
        self.table: EmbeddingTable | None = None  # the one serving now (self.tables swaps it)
        self.pool: HealingPool | None = None
        self.runtime: Runtime | None = None
        self.jobs: JobService | None = None
        self.heartbeat: Heartbeat | None = None
        self.bound_port: int | None = None
        self.metrics_port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._health_server: grpc.aio.Server | None = None  # health only, plaintext (health_address)
        self.health_port: int | None = None
        self._health = health.aio.HealthServicer()
        self._calls: CallPath | None = None
        self._metrics_httpd = None
        self._readiness_task: asyncio.Task[None] | None = None
        self._stop_requested = asyncio.Event()
        self._started = False
        self._stopped = False
        self._draining = False

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Call once. Returns when the server is SERVING."""
        if self._started:
            raise RuntimeError("ComputeServer already started")
        self._started = True
        settings = self.settings
        started = time.perf_counter()
        if settings.asyncio_debug:
            loop_debug.enable(asyncio.get_running_loop(), settings.slow_callback_seconds)

        for directory in dict.fromkeys([settings.shm_dir, shm.SEMAPHORE_DIR]):
            shm.sweep_stale(directory)
        pool_module.prepare(settings.blas_threads)
        # After the forkserver started, before any gRPC object: its exporter thread (and, for
        # OTLP over gRPC, its channel) must never be in a process that forks (grpc#16001).
        self.tracing = Tracing.from_env("offload-compute")  # None unless OTEL_TRACES_EXPORTER asks
        calls = self._calls = CallPath(self._operations, CallMetrics(self.registry), self.tracing)
        self.heartbeat = Heartbeat(
            interval=settings.heartbeat_interval,
            stall_threshold=settings.stall_threshold,
            inflight=lambda: list(calls.inflight.values()),
            registry=self.registry,
        )
        self.heartbeat.start()
        self._pool_metrics = PoolMetrics(self.registry)
        self.registry.register(
            PoolCollector(lambda: self.pool.stats() if self.pool else None, lambda: self.table.nbytes if self.table else 0)
        )
        self.registry.register(TableCollector(lambda: self.tables))
        self.registry.register(JobsCollector(lambda: self.jobs.store.count_by_state() if self.jobs else None))
        self.registry.register(PssCollector(self._processes))
        self._start_metrics_http()
        await self._start_grpc(calls)

        self.tables = TableManager(settings)
        self.table = await self.tables.start()
        self.pool = HealingPool(
            table_spec=self.table.spec,
            shm_dir=settings.shm_dir,
            size=settings.pool_size,
            max_inflight=settings.max_inflight,
            nice=settings.worker_nice,
            log_level=settings.log_level,
            log_format=settings.log_format,
            chunk_rows=settings.search_chunk_rows,
            backoff=settings.rebuild_backoff_seconds,
            backoff_max=settings.rebuild_backoff_max_seconds,
            backoff_reset=settings.rebuild_reset_seconds,
            max_batch=settings.pool_max_batch,
            max_batch_delay=settings.pool_max_batch_delay_seconds,
            scan_segments=settings.pool_scan_segments,
            jobs_yield_seconds=settings.pool_jobs_yield_seconds,
            observer=self._pool_metrics,
            tracing=self.tracing,
        )
        await self.pool.start()
        self.runtime = Runtime(settings, self.table, self.pool, self.heartbeat, self.tracing, self.tables)
        self.tables.attach(self.pool, self._table_switched)
        if settings.table_watch:
            self.tables.start_watching()
        self.jobs = JobService.from_runtime(self.runtime)
        await self.jobs.start()
        self.runtime.services["jobs"] = self.jobs
        calls.activate(self.runtime)
        await self._update_health()
        self._readiness_task = asyncio.get_running_loop().create_task(self._watch_readiness())
        log.info(
            "compute ready",
            extra={
                "address": settings.address,
                "port": self.bound_port,
                "metrics_port": self.metrics_port,
                "health_port": self.health_port,
                "services": calls.service_names(),
                "pool_workers": self.pool.worker_pids(),
                "startup_seconds": round(time.perf_counter() - started, 3),
            },
        )

    async def serve(self) -> None:
        """Start, wait for SIGTERM/SIGINT, drain, stop."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._stop_requested.set)  # signals only set a flag
        try:
            await self.start()
            await self._stop_requested.wait()
        finally:
            await self.stop()

    def request_stop(self) -> None:
        self._stop_requested.set()

    async def stop(self, grace: float | None = None) -> None:
        """Drain and release everything. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        self._draining = True
        grace = self.settings.drain_grace_seconds if grace is None else grace
        log.info("compute draining", extra={"grace_seconds": grace})
        if self._readiness_task is not None:
            self._readiness_task.cancel()
        if self._calls is not None:
            # New calls are refused by the call path (UNAVAILABLE: retry elsewhere) from now on,
            # not only once the gRPC server stops accepting them: a call that reaches grpc while
            # it shuts down may otherwise be cancelled instead.
            self._calls.ready = False
        await self._set_health(NOT_SERVING)
        if self.jobs is not None:
            self.jobs.drain()  # end watch streams now, or they would hold the whole grace period
        if self.tables is not None:
            await self.tables.stop_loading()  # a load under way stops and removes its segments
        if self._server is not None:
            # New calls are refused at once; in-flight calls get `grace` seconds.
            await self._server.stop(grace)
        if self._health_server is not None:
            await self._health_server.stop(0)
        if self.jobs is not None:
            await self.jobs.stop()  # before the pool: running chunks are stopped, their jobs requeued
        if self.pool is not None:
            await self.pool.stop()
        if self.tables is not None:
            await self.tables.stop()
        if self.heartbeat is not None:
            await self.heartbeat.stop()
        if self._metrics_httpd is not None:
            self._metrics_httpd.shutdown()
            self._metrics_httpd.server_close()
        if self.tracing is not None:
            await asyncio.to_thread(self.tracing.shutdown)  # flushes the spans still queued
        log.info("compute stopped")

    # -- pieces ---------------------------------------------------------------------------

    def _table_switched(self, table: EmbeddingTable) -> None:
        """A new table serves (compute/tables.py): calls that start from now on see it."""
        self.table = table
        if self.runtime is not None:
            self.runtime.table = table
            assert self._calls is not None
            self._calls.table_switched()

    async def _start_grpc(self, calls: CallPath) -> None:
        settings = self.settings
        limit = settings.max_message_bytes
        interceptors = [] if self._keys is None else [TokenInterceptor(self._keys, required_scopes(calls))]
        self._server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                ("grpc.so_reuseport", 0),  # a second compute on the same port must fail, not share it
            ]
        )
        batching = BatchingServicer(
            calls, max_calls=settings.batch_max_calls, max_bytes=limit, metrics=BatchMetrics(self.registry)
        )
        self._server.add_generic_rpc_handlers(OperationServicer(calls).handlers())
        self._server.add_generic_rpc_handlers(batching.handlers())
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        names = calls.service_names()
        reflection.enable_server_reflection(
            [*names, BATCHING_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME], self._server
        )
        if settings.tls_cert_file is not None:
            credentials = grpc.ssl_server_credentials(
                [(settings.tls_key_file.read_bytes(), settings.tls_cert_file.read_bytes())],
                root_certificates=settings.tls_client_ca_file.read_bytes() if settings.tls_client_ca_file else None,
                require_client_auth=settings.tls_client_ca_file is not None,
            )
            self.bound_port = self._server.add_secure_port(settings.address, credentials)
        else:
            self.bound_port = self._server.add_insecure_port(settings.address)
        await self._set_health(NOT_SERVING)
        await self._server.start()
        if settings.health_address:
            # grpc.health.v1 alone, without TLS: what Kubernetes' native gRPC probe can dial
            # (it speaks no TLS). It tells SERVING or NOT_SERVING and nothing else.
            self._health_server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
            health_pb2_grpc.add_HealthServicer_to_server(self._health, self._health_server)
            self.health_port = self._health_server.add_insecure_port(settings.health_address)
            await self._health_server.start()

    def _start_metrics_http(self) -> None:
        if self.settings.metrics_port < 0:
            return
        started = start_http_server(self.settings.metrics_port, addr=self.settings.metrics_host, registry=self.registry)
        self._metrics_httpd = started[0] if isinstance(started, tuple) else None
        if self._metrics_httpd is not None:
            self.metrics_port = self._metrics_httpd.server_port

    def _processes(self) -> dict[int, str]:
        """pid -> role of compute and its pool workers, for the PSS gauge."""
        workers = self.pool.worker_pids() if self.pool else []
        return {os.getpid(): "compute", **{pid: "compute-worker" for pid in workers}}

    def _serving(self) -> bool:
        return (
            not self._draining
            and self.pool is not None
            and self.pool.healthy
            and self.heartbeat is not None
            and self.heartbeat.healthy
        )

    async def _set_health(self, status: int) -> None:
        names = self._calls.service_names() if self._calls else []
        for name in ("", *names):
            await self._health.set(name, status)

    async def _update_health(self) -> None:
        await self._set_health(SERVING if self._serving() else NOT_SERVING)

    async def _watch_readiness(self) -> None:
        """Health follows the pool (rebuilding) and the loop (lagging)."""
        last = None
        while True:
            serving = self._serving()
            if serving != last:
                await self._set_health(SERVING if serving else NOT_SERVING)
                if last is not None:
                    log.warning("readiness changed", extra={"serving": serving})
                last = serving
            await asyncio.sleep(0.1)
