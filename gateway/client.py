"""The hop to compute: one grpc.aio channel per worker, deadlines, metadata, retries.

Everything about the transport lives here so it can be tuned (or batched) without touching
routes. Precondition: `start()` is called once from inside the worker's running loop (the
lifespan); gRPC channels must never be created at import time or before a fork.

- Fail fast: calls use wait_for_ready=False, so while compute is down a call fails with
  UNAVAILABLE at once instead of hanging until its deadline; the channel reconnects by itself
  with a reconnect backoff capped at `max_reconnect_backoff_ms`, so recovery needs no restart.
- Retries: a gRPC service config gives the idempotent (GET) methods a retryPolicy on
  UNAVAILABLE, bounded by the call's deadline. No hand-written retry loops.
"""

from __future__ import annotations

import json
from typing import Any, Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.settings import GatewaySettings
from gateway.transcoding import Route
from offload.context import REQUEST_ID_HEADER, TRACEPARENT_HEADER, TRACESTATE_HEADER, RequestContext, child_traceparent

TIMEOUT_HEADER = "x-request-timeout"


class TimeoutHeaderError(ValueError):
    pass


def service_config(routes: list[Route], settings: GatewaySettings) -> str:
    """JSON service config: retry UNAVAILABLE for idempotent methods only."""
    names = sorted({(r.service, r.name) for r in routes if r.idempotent})
    # A method bound by both GET and POST is not retried: the POST may not be idempotent.
    unsafe = {(r.service, r.name) for r in routes if not r.idempotent}
    retried = [{"service": s, "method": m} for s, m in names if (s, m) not in unsafe]
    config: dict[str, Any] = {"methodConfig": []}
    if retried and settings.retry_max_attempts > 1:
        config["methodConfig"].append(
            {
                "name": retried,
                "retryPolicy": {
                    "maxAttempts": settings.retry_max_attempts,
                    "initialBackoff": "0.05s",
                    "maxBackoff": "0.5s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        )
    return json.dumps(config)


class ComputeClient:
    def __init__(self, settings: GatewaySettings, routes: list[Route]) -> None:
        self._settings = settings
        self._routes = routes
        self._channel: grpc.aio.Channel | None = None
        self._callables: dict[str, Any] = {}
        self._timeouts = {
            r.full_method: settings.route_timeout(r.name, r.full_method.strip("/").replace("/", "."), r.streaming)
            for r in routes
        }
        self._health: health_pb2_grpc.HealthStub | None = None

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Call once, inside the running loop."""
        if self._channel is not None:
            raise RuntimeError("client already started")
        s = self._settings
        options = [
            ("grpc.service_config", service_config(self._routes, s)),
            ("grpc.enable_retries", 1),
            ("grpc.max_receive_message_length", s.max_message_bytes),
            ("grpc.max_send_message_length", s.max_message_bytes),
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", s.max_reconnect_backoff_ms),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.lb_policy_name", "round_robin"),
        ]
        if s.tls_ca_file is not None:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=s.tls_ca_file.read_bytes(),
                private_key=s.tls_key_file.read_bytes() if s.tls_key_file else None,
                certificate_chain=s.tls_cert_file.read_bytes() if s.tls_cert_file else None,
            )
            if s.tls_server_name:
                options.append(("grpc.ssl_target_name_override", s.tls_server_name))
            self._channel = grpc.aio.secure_channel(s.compute_address, credentials, options=options)
        else:
            self._channel = grpc.aio.insecure_channel(s.compute_address, options=options)
        for route in self._routes:
            if route.full_method in self._callables:
                continue
            factory = self._channel.unary_stream if route.streaming else self._channel.unary_unary
            self._callables[route.full_method] = factory(
                route.full_method,
                request_serializer=_serializer,
                response_deserializer=_deserializer(route),
            )
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def close(self, grace: float | None = None) -> None:
        """Idempotent."""
        if self._channel is not None:
            channel, self._channel = self._channel, None
            await channel.close(grace)

    # -- calls -----------------------------------------------------------------------------

    def timeout(self, route: Route, header: str | None) -> float:
        """The deadline: the route default, or the client's X-Request-Timeout (seconds), clamped."""
        if header is None:
            return self._timeouts[route.full_method]
        try:
            value = float(header)
        except ValueError:
            raise TimeoutHeaderError("X-Request-Timeout must be a number of seconds") from None
        if not value > 0 or value != value:
            raise TimeoutHeaderError("X-Request-Timeout must be a positive number of seconds")
        return min(value, self._settings.max_timeout_seconds)

    @staticmethod
    def metadata(ctx: RequestContext) -> tuple[tuple[str, str], ...]:
        # The gateway is a hop of the trace: same trace id, a new span id for the call.
        md = ((REQUEST_ID_HEADER, ctx.request_id), (TRACEPARENT_HEADER, child_traceparent(ctx.traceparent)))
        if ctx.tracestate:
            md += ((TRACESTATE_HEADER, ctx.tracestate),)
        return md

    def call(self, route: Route, request: Any, ctx: RequestContext, timeout: float) -> Any:
        """Start the call; returns the grpc.aio call object (await it, or iterate a stream)."""
        return self._callables[route.full_method](
            request, timeout=timeout, metadata=self.metadata(ctx), wait_for_ready=False
        )

    async def serving(self) -> bool:
        """True when compute's health service says SERVING for ComputeService (or overall)."""
        if self._health is None:
            return False
        services = sorted({r.service for r in self._routes}) or [""]
        service = "offload.v1.ComputeService" if "offload.v1.ComputeService" in services else ""
        try:
            response = await self._health.Check(
                health_pb2.HealthCheckRequest(service=service),
                timeout=self._settings.readiness_timeout_seconds,
                wait_for_ready=False,
            )
        except grpc.aio.AioRpcError:
            return False
        return response.status == health_pb2.HealthCheckResponse.SERVING


def _serializer(message: Any) -> bytes:
    return message.SerializeToString()


def _deserializer(route: Route) -> Callable[[bytes], Any]:
    from google.protobuf.message_factory import GetMessageClass

    return GetMessageClass(route.response_type).FromString
