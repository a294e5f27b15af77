"""The gateway's hop to compute: one `offload.client.ComputeChannel` per worker, set up from settings.

Everything about the transport lives here and in `offload.client`, so routes never see it:
- batching: the calls compute answers on its loop (GetItem, GetStats...) that this worker issues
  in one loop iteration travel as one Dispatch RPC; every other call is plain unary;
- deadlines: the route's default, or the client's `X-Request-Timeout`, clamped;
- fail fast: while compute is down a call fails with UNAVAILABLE at once (no wait_for_ready),
  and the channel reconnects by itself with a capped backoff;
- retries: the methods of GET routes are retried on UNAVAILABLE within their deadline;
- replicas: `round_robin` over every address of the target (`ipv4:a:p1,b:p2`, `dns:///name:port`),
  Dispatch RPCs included, with client-side health checking: a replica whose health says
  NOT_SERVING (draining, pool rebuilding) gets no new calls, a dead one none once its
  connection broke. Not for a target that names one server (see `names_one_server`).

Precondition: `start()` once, inside the worker's running loop (the lifespan): gRPC channels
must never be created at import time or before a fork.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.settings import GatewaySettings
from gateway.transcoding import Route
from offload.client import BatchObserver, ComputeChannel, UnaryMethod

TIMEOUT_HEADER = "x-request-timeout"

POLICY_WAIT_SECONDS = 2.0

log = logging.getLogger("gateway.client")


@dataclass(frozen=True, slots=True)
class Readiness:
    """What compute's health service says of the services this gateway routes to."""

    serving: bool  # every routed service answered SERVING
    unserved: list[str] = field(default_factory=list)  # routed, but compute has no such service


class TimeoutHeaderError(ValueError):
    pass


def idempotent_methods(routes: list[Route]) -> set[str]:
    """gRPC paths only ever bound by GET: a method also bound by a POST may not be idempotent."""
    unsafe = {r.full_method for r in routes if not r.idempotent}
    return {r.full_method for r in routes if r.idempotent and r.full_method not in unsafe}


def names_one_server(target: str) -> bool:
    """True for a unix socket or one IP address; False for an address list or a name (DNS may
    answer several records).

    Client-side health checking is for replicas: it sends calls to the others while one says
    NOT_SERVING. With a single compute there is no other; it would only turn compute's NOT_SERVING
    moments into failures here, where compute itself still answers its light calls (GetItem during
    a pool rebuild, ~0.1 s after a worker crash, longer with the crash backoff).
    """
    if target.startswith(("unix:", "unix-abstract:")):
        return True
    for scheme in ("ipv4:", "ipv6:", "dns:///"):
        target = target.removeprefix(scheme)
    if "," in target:
        return False
    try:
        ipaddress.ip_address(target.rsplit(":", 1)[0].strip("[]"))
    except ValueError:
        return False
    return True


def channel_credentials(settings: GatewaySettings) -> grpc.ChannelCredentials | None:
    if settings.tls_ca_file is None:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=settings.tls_ca_file.read_bytes(),
        private_key=settings.tls_key_file.read_bytes() if settings.tls_key_file else None,
        certificate_chain=settings.tls_cert_file.read_bytes() if settings.tls_cert_file else None,
    )


class ComputeClient:
    """`start()` once in the running loop; `unary(route)` / `stream(route)` per route; `close()`."""

    def __init__(self, settings: GatewaySettings, routes: list[Route], observer: BatchObserver | None = None) -> None:
        s = settings
        self._settings = s
        self._routes = routes
        self._timeouts = {
            r.full_method: s.route_timeout(r.name, r.full_method.strip("/").replace("/", "."), r.streaming) for r in routes
        }
        options: list[tuple[str, Any]] = [
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", s.max_reconnect_backoff_ms),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.lb_policy_name", "round_robin"),
        ]
        if s.tls_server_name:
            options.append(("grpc.ssl_target_name_override", s.tls_server_name))
        self.channel = ComputeChannel(
            s.compute_address,
            credentials=channel_credentials(s),
            api_key=s.compute_api_key_file.read_text().strip() if s.compute_api_key_file else None,
            options=options,
            idempotent_methods=idempotent_methods(routes),
            retry_max_attempts=s.retry_max_attempts,
            batching=s.batching,
            batch_window=s.batch_window_seconds,
            batch_max_calls=s.batch_max_calls,
            batch_max_bytes=s.batch_max_bytes,
            max_message_bytes=s.max_message_bytes,
            observer=observer,
            # compute as a whole ("": it sets every service alike), when there may be replicas
            health_check_service=None if names_one_server(s.compute_address) else "",
        )
        self._unary: dict[str, UnaryMethod] = {}
        self._streams: dict[str, Any] = {}
        self._health: health_pb2_grpc.HealthStub | None = None
        # No routes at all: ask about compute as a whole ("").
        self._services = sorted({r.service for r in routes}) or [""]
        self._reported_unserved: list[str] = []

    async def start(self) -> None:
        """Call once, inside the running loop."""
        await self.channel.start()
        for route in self._routes:
            response_cls = GetMessageClass(route.response_type)
            if route.streaming:
                self._streams.setdefault(route.full_method, self.channel.stream(route.full_method, response_cls))
            elif route.full_method not in self._unary:
                self._unary[route.full_method] = self.channel.unary(route.full_method, response_cls)
        self._health = health_pb2_grpc.HealthStub(self.channel.grpc_channel)
        # Workers accept connections only once this returns: when compute is up, a worker's first
        # calls are batched like the rest (forked workers are ready in milliseconds, before the
        # policy would arrive). When compute is not up yet, calls go plain until it is.
        await self.channel.wait_policy(POLICY_WAIT_SECONDS)

    async def close(self, grace: float | None = None) -> None:
        """Idempotent."""
        await self.channel.close(grace)

    def unary(self, route: Route) -> UnaryMethod:
        return self._unary[route.full_method]

    def stream(self, route: Route) -> Any:
        return self._streams[route.full_method]

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
        if value > self._settings.max_timeout_seconds:
            raise TimeoutHeaderError(f"X-Request-Timeout must be at most {self._settings.max_timeout_seconds:g} seconds")
        return value

    async def readiness(self) -> Readiness:
        """Ask compute's health service about every routed service, at once.

        Compute answers SERVING per service it serves and NOT_FOUND for one it does not have:
        routes to that service would all answer 501, so it is reported (and logged once) as
        unserved, and the gateway is not ready.
        """
        if self._health is None:
            return Readiness(False)
        answers = await asyncio.gather(*(self._check(service) for service in self._services))
        unserved = [service for service, answer in zip(self._services, answers) if answer is grpc.StatusCode.NOT_FOUND]
        if unserved != self._reported_unserved:
            self._reported_unserved = unserved
            if unserved:
                log.error(
                    "compute does not serve services this gateway routes to: their routes answer 501",
                    extra={
                        "services": unserved,
                        "fix": "list the module of their operations in compute's OFFLOAD_COMPUTE_EXTRA_OPERATION_MODULES, "
                        "or drop their *_pb2 module from OFFLOAD_GATEWAY_EXTRA_PROTO_MODULES",
                    },
                )
        return Readiness(all(answer == health_pb2.HealthCheckResponse.SERVING for answer in answers), unserved)

    async def _check(self, service: str) -> Any:
        """The service's health status, or the gRPC code of a failed check."""
        assert self._health is not None
        try:
            response = await self._health.Check(
                health_pb2.HealthCheckRequest(service=service),
                timeout=self._settings.readiness_timeout_seconds,
                wait_for_ready=False,
            )
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        return response.status
