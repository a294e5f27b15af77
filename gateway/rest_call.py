"""`RestCall`: one HTTP request on a generated route, as Starlette's `Request` is one request.

It carries what every step of serving the request needs (the route, the matched path values,
the ASGI callables, the headers read once, the request context, the compute client) so those
steps take one argument instead of nine. `prepare()` turns the HTTP request into the request
message and its deadline; it is called once, by the frontend, for unary and streaming routes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

from gateway.client import ComputeClient, TimeoutHeaderError
from gateway.errors import ApiError
from gateway.http import Receive, RequestHeaders, Send, check_json_content_type, read_body
from gateway.json_codec import CodecError
from gateway.binder import RequestError
from gateway.transcoding import Route
from offload.context import RequestContext

_MAX_QUERY_FIELDS = 1000


@dataclass(slots=True)
class RestCall:
    route: Route
    path_values: dict[str, str]
    scope: dict[str, Any]
    receive: Receive
    send: Send
    headers: RequestHeaders
    ctx: RequestContext
    compute: ComputeClient | None  # None until the lifespan has made it (the frontend answers 503)

    async def prepare(self, max_body: int) -> tuple[Any, float]:
        """The request message and the deadline (seconds), or ApiError 400/413/415."""
        body = None
        if self.route.has_body:
            body = await read_body(self.receive, max_body, self.headers.content_length)
            if body:
                check_json_content_type(self.headers.content_type)
        return self.bind(body)

    def bind(self, body: bytes | None) -> tuple[Any, float]:
        """The request message from the path, query and `body` (JSON), and the deadline; ApiError 400."""
        route, headers = self.route, self.headers
        query = _query_pairs(self.scope.get("query_string", b""))
        extra = None
        if route.sse is not None and route.sse.resume_from_field and headers.last_event_id:
            extra = {route.sse.resume_from_field: headers.last_event_id}
        try:
            message = route.binder.bind(self.path_values, query, body, extra)
            timeout = self.compute.timeout(route, headers.timeout)
        except CodecError as exc:
            raise ApiError.http(400, f"invalid request: {exc}") from exc
        except (RequestError, TimeoutHeaderError) as exc:
            raise ApiError.http(400, str(exc)) from exc
        return message, timeout


def _query_pairs(raw: bytes) -> list[tuple[str, str]]:
    if not raw:
        return []
    try:
        return parse_qsl(raw.decode("utf-8"), keep_blank_values=True, strict_parsing=False, max_num_fields=_MAX_QUERY_FIELDS)
    except (UnicodeDecodeError, ValueError):
        raise ApiError.http(400, "malformed query string") from None
