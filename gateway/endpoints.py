"""Serving one generated route: HTTP request -> request message -> compute -> JSON response.

Generic over every RPC: all per-RPC knowledge comes from the `Route` (built from the proto).
While a unary call is in flight a watcher waits for `http.disconnect` and cancels the gRPC call,
so a client that gives up stops the work in compute too.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any
from urllib.parse import parse_qsl

import grpc
import orjson

from gateway.client import ComputeClient, TimeoutHeaderError
from gateway.errors import ApiError, from_rpc_error
from gateway.http import ClientDisconnected, Receive, RequestHeaders, Send, check_json_content_type, read_body, send_bytes
from gateway.json_codec import CodecError, EncodeError
from gateway.transcoding import RequestError, Route
from offload.context import RequestContext

log = logging.getLogger("gateway.endpoints")

_JSON_OPTIONS = orjson.OPT_SERIALIZE_NUMPY
_MAX_QUERY_FIELDS = 1000


async def prepare(
    route: Route,
    path_values: dict[str, str],
    scope: dict[str, Any],
    receive: Receive,
    headers: RequestHeaders,
    client: ComputeClient,
    max_body: int,
) -> tuple[Any, float]:
    """The request message and the deadline, or ApiError 400/413/415."""
    body = None
    if route.has_body:
        body = await read_body(receive, max_body, headers.content_length)
        if body:
            check_json_content_type(headers.content_type)
    query = _query_pairs(scope.get("query_string", b""))
    extra = None
    if route.sse is not None and route.sse.resume_from_field and headers.last_event_id:
        extra = {route.sse.resume_from_field: headers.last_event_id}
    try:
        request = route.build_request(path_values, query, body, extra)
        timeout = client.timeout(route, headers.timeout)
    except CodecError as exc:
        raise ApiError.http(400, f"invalid request: {exc}") from exc
    except (RequestError, TimeoutHeaderError) as exc:
        raise ApiError.http(400, str(exc)) from exc
    return request, timeout


def _query_pairs(raw: bytes) -> list[tuple[str, str]]:
    if not raw:
        return []
    try:
        return parse_qsl(raw.decode("utf-8"), keep_blank_values=True, strict_parsing=False, max_num_fields=_MAX_QUERY_FIELDS)
    except (UnicodeDecodeError, ValueError):
        raise ApiError.http(400, "malformed query string") from None


async def serve_unary(
    route: Route,
    path_values: dict[str, str],
    scope: dict[str, Any],
    receive: Receive,
    send: Send,
    headers: RequestHeaders,
    ctx: RequestContext,
    client: ComputeClient,
    max_body: int,
) -> int:
    """Serve the route; returns the HTTP status sent (499 when the client went away)."""
    request, timeout = await prepare(route, path_values, scope, receive, headers, client, max_body)
    call = client.call(route, request, ctx, timeout)
    disconnected = asyncio.Event()
    watcher = asyncio.ensure_future(_cancel_on_disconnect(receive, call, disconnected))
    try:
        response = await call
    except grpc.aio.AioRpcError as exc:
        raise from_rpc_error(exc) from exc
    except asyncio.CancelledError:
        if disconnected.is_set():
            log.info("client disconnected; compute call cancelled", extra={"rpc": route.name})
            return 499
        raise
    finally:
        watcher.cancel()
    try:
        payload = route.encode_response(response)
    except EncodeError as exc:
        log.error("response not representable as JSON", extra={"rpc": route.name, "problem": str(exc)})
        raise ApiError.http(500, "compute returned a value JSON cannot represent") from exc
    if route.response_body:
        payload = payload.get(route.response_body_json)
    out_headers = [(b"x-request-id", ctx.request_id.encode())]
    location = route.location_for(response)
    if location is not None:
        out_headers.append((b"location", location.encode()))
    await send_bytes(send, route.success_status, orjson.dumps(payload, option=_JSON_OPTIONS), out_headers)
    return route.success_status


async def _cancel_on_disconnect(receive: Receive, call: Any, disconnected: asyncio.Event) -> None:
    # Any unread request body is drained here; the only message that matters is the disconnect.
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            disconnected.set()
            call.cancel()
            return


__all__ = ["ClientDisconnected", "prepare", "serve_unary"]
