"""Server-streaming RPCs served as Server-Sent Events, for any RPC.

Each streamed message becomes one event: `id:` from the method's `(offload.v1.sse).event_id_field`
(so a reconnecting browser sends it back as `Last-Event-ID`, which sets `resume_from_field` in the
request), `data:` its JSON. Failures before the first message are ordinary HTTP errors (404 for an
unknown job...); after it, an `event: error` with the AIP-193 body ends the stream. A comment line
is sent after `sse_keepalive_seconds` of silence so proxies keep the connection. A client that
disconnects cancels the gRPC call.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc
import orjson

from gateway.errors import ApiError, from_rpc_error
from gateway.http import Receive
from gateway.json_codec import EncodeError
from gateway.rest_call import RestCall
from gateway.transcoding import Route
from offload.client import metadata

log = logging.getLogger("gateway.sse")

_JSON_OPTIONS = orjson.OPT_SERIALIZE_NUMPY


def format_event(data: bytes, event_id: str | None = None, event: str | None = None) -> bytes:
    parts = []
    if event:
        parts.append(b"event: " + event.encode() + b"\n")
    if event_id is not None:
        parts.append(b"id: " + event_id.encode() + b"\n")
    parts.append(b"data: " + data + b"\n\n")  # orjson output never contains a newline
    return b"".join(parts)


def stream_event(route: Route, message: Any) -> bytes:
    payload = route.encode_response(message)
    id_field = route.sse.event_id_field if route.sse else ""
    event_id = str(getattr(message, id_field)) if id_field else None
    return format_event(orjson.dumps(payload, option=_JSON_OPTIONS), event_id)


async def serve_stream(rest: RestCall, message: Any, timeout: float, keepalive: float) -> int:
    """Serve the stream; returns the HTTP status sent (499 if the client left before it)."""
    route, send, ctx = rest.route, rest.send, rest.ctx
    call = rest.compute.stream(route)(message, timeout=timeout, metadata=metadata(ctx), wait_for_ready=False)
    reader = asyncio.ensure_future(call.read())
    watcher = asyncio.ensure_future(_wait_disconnect(rest.receive))
    try:
        # Headers wait for the first message (or the failure), so early errors keep their status.
        done, _ = await asyncio.wait({reader, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if watcher in done:
            call.cancel()
            return 499
        try:
            first = reader.result()
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from exc
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/event-stream; charset=utf-8"),
                    (b"cache-control", b"no-cache"),
                    (b"x-accel-buffering", b"no"),
                    (b"x-request-id", ctx.request_id.encode()),
                ],
            }
        )
        message = first
        while message is not grpc.aio.EOF:
            await send({"type": "http.response.body", "body": stream_event(route, message), "more_body": True})
            reader = asyncio.ensure_future(call.read())
            while True:
                done, _ = await asyncio.wait({reader, watcher}, timeout=keepalive, return_when=asyncio.FIRST_COMPLETED)
                if watcher in done:
                    call.cancel()
                    return 200
                if reader in done:
                    break
                await send({"type": "http.response.body", "body": b": keepalive\n\n", "more_body": True})
            try:
                message = reader.result()
            except grpc.aio.AioRpcError as exc:
                error = from_rpc_error(exc)
                await send({"type": "http.response.body", "body": format_event(error.body(ctx.request_id), event="error"), "more_body": True})
                break
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return 200
    except EncodeError as exc:
        log.error("stream message not representable as JSON", extra={"rpc": route.name, "problem": str(exc)})
        call.cancel()
        error = ApiError.http(500, "compute returned a value JSON cannot represent")
        await send({"type": "http.response.body", "body": format_event(error.body(ctx.request_id), event="error"), "more_body": False})
        return 200
    except OSError:
        # The transport went away while sending.
        call.cancel()
        return 499
    finally:
        for task in (reader, watcher):
            task.cancel()
        call.cancel()


async def _wait_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
