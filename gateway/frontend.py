"""The ASGI entry: generated routes served directly, everything else handed to FastAPI.

A plain ASGI layer in front of the FastAPI app costs ~85 µs per request where a FastAPI path
operation costs ~230 µs. It also owns what every response needs: the request id (accepted or
generated, returned on every response, bound to log lines) and the per-route metrics. Errors
from any layer end here as one AIP-193 response.

What it needs at run time (the compute client, made inside each worker's loop) comes from the
lifespan state, `scope["state"]`, as Starlette apps get it.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable

from starlette.middleware.cors import CORSMiddleware

from gateway.auth import ADMIN_SCOPE, RateLimiter, build_authenticator, credential_of
from gateway.endpoints import serve_unary
from gateway.errors import ApiError
from gateway.http import ClientDisconnected, Receive, Send, parse_headers, send_error
from gateway.metrics import GatewayMetrics
from gateway.rest_call import RestCall
from gateway.settings import GatewaySettings
from gateway.sse import serve_stream
from gateway.websocket import deny, origin_allowed, serve_websocket
from gateway.transcoding import Route
from offload import context
from offload.tracing import Tracing

log = logging.getLogger("gateway.frontend")

# The admin app's own pages: those not open need the admin scope.
ADMIN_PATHS = frozenset(["/readyz", "/metrics", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"])
_ADMIN = frozenset([ADMIN_SCOPE])

# Lifespan state entries (`scope["state"]`): this worker's ComputeClient, Heartbeat and
# Tracing (None when tracing is off).
COMPUTE_STATE_KEY = "compute"
HEARTBEAT_STATE_KEY = "heartbeat"
TRACING_STATE_KEY = "tracing"


class RestFrontend:
    """ASGI app serving the generated REST routes, with `fallback` (FastAPI) for the rest.

    `inflight` maps id(scope) -> request id of the requests being served (the heartbeat
    reports them when the loop stalls).
    """

    def __init__(
        self,
        routes: list[Route],
        fallback: Callable[..., Any],
        settings: GatewaySettings,
        metrics: GatewayMetrics,
        inflight: dict[int, str],
    ) -> None:
        self.routes = routes
        self.fallback = fallback
        self.settings = settings
        self.metrics = metrics
        self.inflight = inflight
        self._by_method: dict[str, list[Route]] = {}
        for route in routes:
            self._by_method.setdefault(route.http_method, []).append(route)
        # A WebSocket upgrade reaches any server-streaming route by its path (gateway/websocket.py).
        self._streams = [r for r in routes if r.streaming]
        # Who may call: API keys, per-route scopes, per-key rate limits (gateway/auth.py).
        self._auth = build_authenticator(settings) if settings.auth_enabled else None
        self._rate = RateLimiter(settings.rate_limit, settings.rate_limit_storage_uri) if settings.rate_limit else None
        self._open_paths = frozenset(["/healthz", *settings.auth_open_paths])
        # Browser clients: Starlette's CORS middleware around the dispatch, only when configured.
        self._cors = None
        if settings.cors_allow_origins:
            self._cors = CORSMiddleware(
                self._dispatch,
                allow_origins=settings.cors_allow_origins,
                allow_methods=sorted({r.http_method for r in routes} | {"GET"}),
                allow_headers=[
                    "content-type", "authorization", "x-api-key", "x-request-id", "x-request-timeout",
                    "last-event-id", "traceparent", "tracestate",
                ],
                expose_headers=["x-request-id", "retry-after", "location", "www-authenticate", context.TABLE_GENERATION_HEADER],
                max_age=600,
            )
        # Per-RPC metric children, resolved once (labels() costs a lock and a dict lookup).
        self._latency = {r.full_method: metrics.latency.labels(r.name) for r in routes}
        self._counts: dict[tuple[str, int], Any] = {}  # (rpc, status) -> counter child, filled as seen

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind not in ("http", "websocket"):
            await self.fallback(scope, receive, send)  # lifespan
            return
        too_big = self._too_big(scope)
        if too_big is not None:  # before any parsing or routing: no work for oversized requests
            await self._refuse(scope, send, too_big, context.new_request_id())
            return
        if self._cors is not None and kind == "http":  # browsers apply no CORS to WebSockets
            await self._cors(scope, receive, send)
        else:
            await self._dispatch(scope, receive, send)

    @staticmethod
    async def _refuse(scope: dict[str, Any], send: Send, error: ApiError, request_id: str) -> None:
        """An error response: plain HTTP, or the refusal of a WebSocket handshake."""
        if scope["type"] == "websocket":
            await deny(scope, send, error, request_id)
        else:
            await send_error(send, error, request_id)

    def _too_big(self, scope: dict[str, Any]) -> ApiError | None:
        """431 for too many or too large headers, 414 for a too long URL (uvicorn's httptools
        parser sets no limit on either)."""
        headers = scope["headers"]
        s = self.settings
        if len(headers) > s.max_headers:
            return ApiError.http(431, f"too many request headers (at most {s.max_headers})")
        if sum(len(name) + len(value) for name, value in headers) > s.max_header_bytes:
            return ApiError.http(431, f"request headers larger than {s.max_header_bytes} bytes")
        if len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"") > s.max_url_bytes:
            return ApiError.http(414, f"URL longer than {s.max_url_bytes} bytes")
        return None

    async def _dispatch(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        raw_path = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
        websocket = scope["type"] == "websocket"
        if websocket:
            route, values = self._match_stream(raw_path)
        else:
            route, values = self._match(scope["method"], raw_path)
        try:
            headers = parse_headers(scope["headers"])
        except ApiError as exc:
            await self._refuse(scope, send, exc, context.new_request_id())
            return
        ctx = context.from_headers(headers.request_id, headers.traceparent, headers.tracestate)
        if websocket and route is None:
            await deny(scope, send, ApiError.http(404, "no server stream at this path (WebSocket)"), ctx.request_id)
            return
        if websocket and not origin_allowed(scope["headers"], self.settings.ws_allowed_origins):
            self._count(route, 403)
            await deny(scope, send, ApiError(403, "PERMISSION_DENIED", "this Origin may not open WebSockets here"), ctx.request_id)
            return
        if self._auth is not None and not (route is None and scope["path"] in self._open_paths):
            try:
                key = self._auth.principal(credential_of(headers.authorization, headers.api_key))
                self._auth.authorize(key, self._scopes_for(route, scope["path"]))
                if self._rate is not None:
                    await self._rate.check(key.key_id)
            except ApiError as exc:
                if route is not None:
                    self._count(route, exc.http_status)
                await self._refuse(scope, send, exc, ctx.request_id)
                return
            ctx = dataclasses.replace(ctx, principal=key.key_id)
        state = scope.get("state", {})
        tracing: Tracing | None = state.get(TRACING_STATE_KEY)
        span = None
        if tracing is None:
            # The gateway is a hop of the trace: its log lines and compute's carry its own span id.
            ctx = dataclasses.replace(ctx, traceparent=context.child_traceparent(ctx.traceparent))
        elif route is not None:
            # The request's span: a child of the caller's traceparent (if valid), and the parent
            # of everything compute does for it (ctx carries it on).
            span = tracing.start(f"{scope.get('method', 'GET')} {route.path.template}",
                                 context.valid_traceparent(headers.traceparent), kind=tracing.SERVER,
                                 attributes={"http.request.method": scope.get("method", "GET"),
                                             "http.route": route.path.template, "url.path": scope["path"],
                                             "rpc.method": route.name, "offload.request_id": ctx.request_id})
            ctx = dataclasses.replace(ctx, traceparent=tracing.traceparent(span))
        with context.bound(ctx):
            if route is None:
                await self._fallback(scope, receive, send, ctx.request_id, raw_path)
                return
            call = RestCall(route, values, scope, receive, send, headers, ctx, state.get(COMPUTE_STATE_KEY))
            await self._serve(call, span, tracing)

    def _match(self, method: str, raw_path: str) -> tuple[Route | None, dict[str, str]]:
        return _first_match(self._by_method.get(method, ()), raw_path)

    def _match_stream(self, raw_path: str) -> tuple[Route | None, dict[str, str]]:
        return _first_match(self._streams, raw_path)

    async def _serve(self, call: RestCall, span: Any = None, tracing: Tracing | None = None) -> None:
        route = call.route
        started = time.perf_counter()
        key = id(call.scope)
        self.inflight[key] = call.ctx.request_id
        self.metrics.inflight.inc()
        status = 500
        try:
            if call.compute is None:
                raise ApiError.http(503, "gateway is starting")
            if call.scope["type"] == "websocket":
                status = await serve_websocket(call, self.settings)
                return
            message, timeout = await call.prepare(self.settings.max_body_bytes)
            if route.streaming:
                status = await serve_stream(call, message, timeout, self.settings.sse_keepalive_seconds)
            else:
                status = await serve_unary(call, message, timeout)
        except ApiError as exc:
            status = exc.http_status
            await self._refuse(call.scope, call.send, exc, call.ctx.request_id)
        except ClientDisconnected:
            status = 499
        except Exception:
            # A bug, never a stack trace to the client: log it with the request id.
            log.exception("unhandled error", extra={"rpc": route.name})
            status = 500
            await self._refuse(call.scope, call.send, ApiError.http(500, "internal error"), call.ctx.request_id)
        finally:
            del self.inflight[key]
            self.metrics.inflight.dec()
            elapsed = time.perf_counter() - started
            self._latency[route.full_method].observe(elapsed)
            self._count(route, status)
            if span is not None:
                span.set_attribute("http.response.status_code", status)
                tracing.end(span, None if status < 500 else str(status))
            if self.settings.access_log:
                log.info("request", extra={"rpc": route.name, "method": call.scope.get("method", "WEBSOCKET"), "path": call.scope["path"],
                                           "status": status, "seconds": round(elapsed, 6)})

    @staticmethod
    def _scopes_for(route: Route | None, path: str) -> frozenset[str]:
        """A route's declared scopes; admin for the admin app's pages; none for anything else
        (a 404 or a 405 needs only a valid key)."""
        if route is not None:
            return route.scopes
        return _ADMIN if path in ADMIN_PATHS else frozenset()

    def _count(self, route: Route, status: int) -> None:
        counter = self._counts.get((route.name, status))
        if counter is None:
            counter = self._counts[(route.name, status)] = self.metrics.requests.labels(route.name, str(status))
        counter.inc()

    async def _fallback(self, scope: dict[str, Any], receive: Receive, send: Send, request_id: str, raw_path: str) -> None:
        matching = [r for r in self.routes if r.path.match(raw_path) is not None]
        if any(r.path.verb for r in matching):  # "/v1/jobs/7:cancel" is the custom method's path
            matching = [r for r in matching if r.path.verb]
        allowed = sorted({r.http_method for r in matching})
        if allowed:
            error = ApiError(405, "UNIMPLEMENTED", f"method {scope['method']} not allowed here",
                             [(b"allow", ", ".join(allowed).encode())])
            await send_error(send, error, request_id)
            return
        scope.setdefault("state", {})["request_id"] = request_id
        rid = request_id.encode()

        async def send_with_id(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), (b"x-request-id", rid)]
            await send(message)

        await self.fallback(scope, receive, send_with_id)


def _first_match(routes, raw_path: str) -> tuple[Route | None, dict[str, str]]:
    for route in routes:
        values = route.path.match(raw_path)
        if values is not None:
            return route, values
    return None, {}
