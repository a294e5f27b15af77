"""The one place where failures become HTTP responses.

gRPC status -> HTTP status follows google/rpc/code.proto (its "HTTP Mapping" lines), and the
body is AIP-193's `{"error": {"code", "status", "message", "request_id"}}`. Notes:
- FAILED_PRECONDITION is 400, as code.proto says (not 412: that is for HTTP conditionals).
- Messages of codes the gRPC library itself produces (UNAVAILABLE, DEADLINE_EXCEEDED,
  CANCELLED, UNKNOWN, INTERNAL, DATA_LOSS) are replaced by fixed texts: the library's own text
  names socket paths and addresses. Compute's domain messages (INVALID_ARGUMENT, NOT_FOUND...)
  are meant for clients and pass through, truncated.
- Responses never carry stack traces; the original detail is logged with the request id.
"""

from __future__ import annotations

import logging

import grpc
import orjson

from offload.client import CallError

log = logging.getLogger("gateway.errors")

_HTTP_STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
}

_FIXED_MESSAGES = {
    grpc.StatusCode.UNAVAILABLE: "compute is unavailable; retry later",
    grpc.StatusCode.DEADLINE_EXCEEDED: "the request deadline expired before compute answered",
    grpc.StatusCode.CANCELLED: "the request was cancelled",
    grpc.StatusCode.UNKNOWN: "internal error",
    grpc.StatusCode.INTERNAL: "internal error",
    grpc.StatusCode.DATA_LOSS: "internal error",
}

BAD_REQUEST_TYPE = "type.googleapis.com/google.rpc.BadRequest"

# What grpc itself answers for a method the server has no handler for.
_GRPC_METHOD_NOT_FOUND = "Method not found!"

_MAX_MESSAGE = 1024

# Statuses raised by the gateway itself, by HTTP code.
_STATUS_NAMES = {
    400: "INVALID_ARGUMENT",
    404: "NOT_FOUND",
    405: "UNIMPLEMENTED",
    413: "INVALID_ARGUMENT",
    414: "INVALID_ARGUMENT",
    415: "INVALID_ARGUMENT",
    431: "INVALID_ARGUMENT",
    500: "INTERNAL",
    503: "UNAVAILABLE",
}


class ApiError(Exception):
    """An error response: HTTP status, google.rpc status name, client-safe message."""

    def __init__(
        self,
        http_status: int,
        status: str,
        message: str,
        headers: list[tuple[bytes, bytes]] | None = None,
        field_violations: list[tuple[str, str]] | None = None,
    ) -> None:
        super().__init__(message)
        self.http_status = http_status
        self.status = status
        self.message = message
        self.headers = headers or []
        self.field_violations = field_violations or []

    @classmethod
    def http(cls, http_status: int, message: str, headers: list[tuple[bytes, bytes]] | None = None) -> "ApiError":
        return cls(http_status, _STATUS_NAMES.get(http_status, "UNKNOWN"), message, headers)

    def body(self, request_id: str) -> bytes:
        error: dict = {"code": self.http_status, "status": self.status, "message": self.message, "request_id": request_id}
        if self.field_violations:
            error["details"] = [
                {
                    "@type": BAD_REQUEST_TYPE,
                    "fieldViolations": [{"field": f, "description": d} for f, d in self.field_violations],
                }
            ]
        return orjson.dumps({"error": error})


def http_status_for(code: grpc.StatusCode) -> int:
    return _HTTP_STATUS.get(code, 500)


def from_call_error(exc: CallError) -> ApiError:
    """Map a failed call, batched or not. A server's retry hint becomes Retry-After."""
    code = exc.code()
    message = _FIXED_MESSAGES.get(code)
    if code == grpc.StatusCode.UNIMPLEMENTED and exc.message == _GRPC_METHOD_NOT_FOUND:
        message = "compute does not serve this RPC (see the gateway's /readyz and log)"
    if message is None:
        message = (exc.message or code.name.lower().replace("_", " "))[:_MAX_MESSAGE]
    headers: list[tuple[bytes, bytes]] = []
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        retry_after = 1 if exc.retry_after is None else max(0, min(round(exc.retry_after), 3600))
        headers.append((b"retry-after", str(retry_after).encode()))
    elif code == grpc.StatusCode.UNAVAILABLE:
        headers.append((b"retry-after", b"1"))
    status = http_status_for(code)
    if status >= 500:
        log.warning("compute call failed", extra={"grpc_code": code.name, "grpc_detail": (exc.message or "")[:_MAX_MESSAGE]})
    return ApiError(status, code.name, message, headers, exc.field_violations)


def from_rpc_error(exc: grpc.aio.AioRpcError) -> ApiError:
    """Map a failed plain gRPC call (server streams)."""
    return from_call_error(CallError.from_rpc_error(exc))
