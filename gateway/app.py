"""Assembles the gateway ASGI app. Served by `python -m gateway` (uvicorn, factory=True).

`create_app(settings)` runs once per worker: it reads the proto descriptors into routes (no
network, no channel). The lifespan, inside the worker's running loop, opens the one gRPC
channel and starts the heartbeat; on shutdown it closes both.
"""

from __future__ import annotations

import logging
import os
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from gateway.admin import AdminState, build_admin
from gateway.client import ComputeClient
from gateway.dispatcher import Dispatcher
from gateway.json_codec import Codec
from gateway.metrics import GatewayMetrics, worker_exited
from gateway.openapi import build_openapi
from gateway.settings import GatewaySettings
from gateway.transcoding import load_routes
from offload import logs
from offload.heartbeat import Heartbeat

log = logging.getLogger("gateway")


def create_app(settings: GatewaySettings | None = None) -> Dispatcher:
    """The ASGI app: a Dispatcher (its FastAPI part is `.fallback`). Call once per process."""
    settings = settings or GatewaySettings()
    logs.configure("gateway", settings.log_level)
    codec = Codec()
    routes = load_routes(settings.proto_modules, codec)
    registry = CollectorRegistry()
    metrics = GatewayMetrics(registry)
    state = AdminState()
    dispatcher: Dispatcher
    heartbeat = Heartbeat(
        interval=settings.heartbeat_interval,
        stall_threshold=settings.stall_threshold,
        inflight=lambda: list(dispatcher.inflight.values()),
        registry=registry,
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        client = ComputeClient(settings, routes)
        await client.start()
        heartbeat.start()
        state.client, state.heartbeat = client, heartbeat
        dispatcher.client = client
        log.info("gateway worker ready", extra={"routes": len(routes), "compute": settings.compute_address})
        try:
            yield
        finally:
            dispatcher.client = None
            state.client = None
            await heartbeat.stop()
            await client.close(grace=1.0)
            worker_exited(os.getpid())

    openapi = build_openapi(routes)
    admin = build_admin(lifespan, state, metrics, openapi)
    dispatcher = Dispatcher(routes, admin, settings, metrics)
    return dispatcher


def route_table(app: Any) -> list[tuple[str, str, str]]:
    """(HTTP method, path template, gRPC method) of every generated route: for docs and tests."""
    return [(r.http_method, r.path.template, r.full_method) for r in app.routes]
