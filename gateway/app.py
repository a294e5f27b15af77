"""Assembles the gateway ASGI app. Served by `python -m gateway` (uvicorn, factory=True).

`create_app(settings)` runs once, in the master before it forks the workers
(gateway/prefork.py): it reads the proto descriptors into routes (no network, no channel, no
thread). The lifespan, inside each worker's running loop, opens the compute client, starts the
heartbeat and the span exporter, and hands them to the routes through the lifespan state; on
shutdown it closes them.
"""

from __future__ import annotations

import asyncio
import logging
import os
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from gateway.admin import build_admin
from gateway.client import ComputeClient
from gateway.frontend import COMPUTE_STATE_KEY, HEARTBEAT_STATE_KEY, TRACING_STATE_KEY, RestFrontend
from gateway.json_codec import Codec
from gateway.metrics import GatewayMetrics, worker_exited
from gateway.openapi import build_openapi
from gateway.settings import GatewaySettings
from gateway.transcoding import routes_from_settings
from offload import config, logs, loop_debug
from offload.heartbeat import Heartbeat
from offload.tracing import Tracing

log = logging.getLogger("gateway")


def create_app(settings: GatewaySettings | None = None) -> RestFrontend:
    """The ASGI app: a RestFrontend (its FastAPI part is `.fallback`). Call once per process."""
    settings = settings or config.load(GatewaySettings)
    logs.configure("gateway", settings.log_level, settings.log_format)
    routes = routes_from_settings(settings, Codec())
    registry = CollectorRegistry()
    metrics = GatewayMetrics(registry)
    inflight: dict[int, str] = {}  # shared by the frontend (writes) and the heartbeat (reports)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[dict[str, Any]]:
        if settings.asyncio_debug:  # here: the lifespan runs on this worker's own loop
            loop_debug.enable(asyncio.get_running_loop(), settings.slow_callback_seconds)
        heartbeat = Heartbeat(
            interval=settings.heartbeat_interval,
            stall_threshold=settings.stall_threshold,
            inflight=lambda: list(inflight.values()),
            registry=registry,
        )
        client = ComputeClient(settings, routes, observer=metrics)
        tracing = None
        try:
            await client.start()
            heartbeat.start()
            # Per worker, after the fork: its own span exporter thread (None: tracing off).
            tracing = Tracing.from_env("offload-gateway")
            log.info("gateway worker ready", extra={"routes": len(routes), "compute": settings.compute_address})
            yield {COMPUTE_STATE_KEY: client, HEARTBEAT_STATE_KEY: heartbeat, TRACING_STATE_KEY: tracing}
        finally:
            await heartbeat.stop()
            await client.close(grace=1.0)
            if tracing is not None:
                await asyncio.to_thread(tracing.shutdown)  # flushes the spans still queued
            worker_exited(os.getpid())

    document = build_openapi(routes, max_timeout_seconds=settings.max_timeout_seconds, auth=settings.auth_enabled)
    admin = build_admin(lifespan, metrics, document)
    return RestFrontend(routes, admin, settings, metrics, inflight)


def route_table(app: Any) -> list[tuple[str, str, str]]:
    """(HTTP method, path template, gRPC method) of every generated route: for docs and tests."""
    return [(r.http_method, r.path.template, r.full_method) for r in app.routes]
