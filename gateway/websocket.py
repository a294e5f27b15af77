"""Server-streaming RPCs served over WebSocket, for any RPC: the SSE route's path, upgraded.

`GET /v1/jobs/{id}/events` with `Upgrade: websocket` streams the same messages as the SSE route,
one text frame each, holding the same JSON as the SSE `data:`. What a client needs to know:

- **A request body**, for a stream whose HTTP rule has one, is the client's first message.
- **Resume** with the request field the SSE rule names as `resume_from_field`, in the query
  (`?after_sequence=7`: browsers cannot set `Last-Event-ID` on a WebSocket; that header works too).
- **Before the socket opens**, a bad request is an ordinary HTTP answer with the AIP-193 body:
  400, 401/403 (auth), 403 (an Origin not allowed), 404 (no stream at this path), 429, 503.
- **Closing**: 1000 after the last message (a job's terminal event). A failure from compute sends
  one last text frame, the AIP-193 error body `{"error": {...}}`, then closes with
  4000 + the gRPC code (4005 NOT_FOUND, 4004 DEADLINE_EXCEEDED, 4014 UNAVAILABLE, ...); the
  reason is the code's name. 1012 when the gateway restarts; resume from the last message.
- **Keepalive**: protocol pings every `ws_ping_interval_seconds` (uvicorn's websockets-sansio
  protocol sends them; browsers answer by themselves). A peer whose pong is late is closed, 1011.
- **The client closing** the socket cancels the gRPC stream (compute stops watching); it never
  cancels the job. Text the client sends is read and ignored, never buffered.
- **A slow reader** is bounded: the next message is read from compute only once the previous one
  is in the socket's buffer (uvicorn pauses `send` at its high-water mark), so nothing grows; a
  reader that takes nothing for `ws_send_timeout_seconds` is dropped.

The handshake is ASGI's (`websocket.accept`); errors before it use the `websocket.http.response`
extension (uvicorn has it), or a plain close (403) where a server lacks it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any
from urllib.parse import urlsplit

import grpc
import orjson

from gateway.errors import ApiError, from_rpc_error
from gateway.http import Receive, Send, send_error
from gateway.json_codec import EncodeError
from gateway.rest_call import RestCall
from gateway.settings import GatewaySettings
from offload.client import metadata

log = logging.getLogger("gateway.websocket")

_JSON_OPTIONS = orjson.OPT_SERIALIZE_NUMPY
NORMAL_CLOSURE = 1000
APPLICATION_CODE_BASE = 4000  # + the gRPC status code
_HTTP_RESPONSE_EXTENSION = "websocket.http.response"


def close_code(status: str) -> int:
    """The close code of a failure named by its google.rpc code (e.g. NOT_FOUND -> 4005)."""
    try:
        return APPLICATION_CODE_BASE + grpc.StatusCode[status].value[0]
    except KeyError:
        return APPLICATION_CODE_BASE + grpc.StatusCode.UNKNOWN.value[0]


def origin_allowed(headers: list[tuple[bytes, bytes]], allowed: list[str]) -> bool:
    """Browsers send Origin on every WebSocket; other clients usually do not (allowed).

    Same-origin pages are always allowed; other origins only if listed (or `*`). Without this
    check any web page could open a socket to the gateway with its visitors' network access.
    """
    origin = host = None
    for name, value in headers:
        if name == b"origin":
            origin = value.decode("latin-1")
        elif name == b"host":
            host = value.decode("latin-1")
    if origin is None or "*" in allowed or origin in allowed:
        return True
    return host is not None and urlsplit(origin).netloc.lower() == host.lower()


async def deny(scope: dict[str, Any], send: Send, error: ApiError, request_id: str) -> None:
    """Refuse the handshake with an HTTP response (status and AIP-193 body), or a bare close."""
    if _HTTP_RESPONSE_EXTENSION not in scope.get("extensions", {}):
        await send({"type": "websocket.close", "code": 1008})  # the server answers 403
        return

    async def as_websocket(message: dict[str, Any]) -> None:
        await send({**message, "type": "websocket." + message["type"]})

    await send_error(as_websocket, error, request_id)


async def serve_websocket(rest: RestCall, settings: GatewaySettings) -> int:
    """Serve one socket; returns the status for metrics: 101 once accepted, 499 if the client left first.

    Raises ApiError (to `deny`) only before the handshake.
    """
    route, send, ctx = rest.route, rest.send, rest.ctx
    connect = await rest.receive()
    if connect["type"] != "websocket.connect":
        return 499
    if not route.has_body:
        message, timeout = rest.bind(None)
    await send({"type": "websocket.accept", "headers": [(b"x-request-id", ctx.request_id.encode())]})
    if route.has_body:  # the request body is the client's first message
        body = await _first_message(rest.receive)
        if body is None:
            return 101
        try:
            message, timeout = rest.bind(body)
        except ApiError as exc:
            await _close_with_error(send, exc, ctx.request_id)
            return 101
    call = rest.compute.stream(route)(message, timeout=timeout, metadata=metadata(ctx), wait_for_ready=False)
    # The client closing cancels the gRPC stream: a read in progress ends with CancelledError.
    # One watcher for the whole socket, not a race per message: the loop below stays two
    # awaits per message (the read, the send), which is most of what a message costs.
    watcher = asyncio.ensure_future(_wait_disconnect(rest.receive))
    watcher.add_done_callback(lambda _: call.cancel())
    this_task = asyncio.current_task()
    try:
        while True:
            try:
                item = await call.read()
            except asyncio.CancelledError:
                if watcher.done() and this_task is not None and not this_task.cancelling():
                    return 101  # the client closed: compute's stream is cancelled
                raise
            except grpc.aio.AioRpcError as exc:
                await _close_with_error(send, from_rpc_error(exc), ctx.request_id)
                return 101
            if item is grpc.aio.EOF:
                await send({"type": "websocket.close", "code": NORMAL_CLOSURE})
                return 101
            text = orjson.dumps(route.encode_response(item), option=_JSON_OPTIONS).decode()
            try:
                # uvicorn's send waits while the socket's buffer is above its high-water mark, and
                # raises ClientDisconnected (an OSError) once the peer is gone.
                async with asyncio.timeout(settings.ws_send_timeout_seconds):
                    await send({"type": "websocket.send", "text": text})
            except TimeoutError:
                log.warning("dropping a WebSocket reader that took nothing", extra={
                    "rpc": route.name, "seconds": settings.ws_send_timeout_seconds})
                return 101  # returning drops the connection (uvicorn closes the transport)
    except EncodeError as exc:
        log.error("stream message not representable as JSON", extra={"rpc": route.name, "problem": str(exc)})
        await _close_with_error(send, ApiError.http(500, "compute returned a value JSON cannot represent"), ctx.request_id)
        return 101
    except OSError:
        return 101  # uvicorn's ClientDisconnected: the transport went away while sending
    except Exception:
        # A bug, never a stack trace to the client: log it with the request id, close 1011.
        log.exception("unhandled error", extra={"rpc": route.name})
        await send({"type": "websocket.close", "code": 1011, "reason": "INTERNAL"})
        return 101
    finally:
        watcher.cancel()
        call.cancel()


async def _close_with_error(send: Send, error: ApiError, request_id: str) -> None:
    await send({"type": "websocket.send", "text": error.body(request_id).decode()})
    await send({"type": "websocket.close", "code": close_code(error.status), "reason": error.status})


async def _first_message(receive: Receive) -> bytes | None:
    """The first frame (text or binary) as bytes; None if the client closed first."""
    message = await receive()
    if message["type"] == "websocket.disconnect":
        return None
    text = message.get("text")
    return text.encode() if text is not None else message.get("bytes") or b""


async def _wait_disconnect(receive: Receive) -> None:
    """Read (and drop) what the client sends, until it closes."""
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            return
