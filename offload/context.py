"""Request context that crosses process boundaries: request id and W3C trace context.

The gateway reads `X-Request-ID` / `traceparent` from HTTP, sends them as gRPC metadata,
compute puts them into each pool task envelope, and every log line carries them.
"""

from __future__ import annotations

import contextvars
import os
import re
import secrets
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

REQUEST_ID_HEADER = "x-request-id"
# compute's trailer on every unary response (and the gateway's HTTP header): the table
# generation that answered (compute/tables.py).
TABLE_GENERATION_HEADER = "offload-table-generation"
TRACEPARENT_HEADER = "traceparent"
TRACESTATE_HEADER = "tracestate"
PRINCIPAL_HEADER = "x-offload-principal"  # gateway -> compute: the caller's API key id

# A request id is echoed into logs and headers: keep it short and printable.
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")
# A principal travels as gRPC metadata: printable ASCII, no spaces (gateway/auth.py makes it so).
_PRINCIPAL_RE = re.compile(r"^[\x21-\x7e]{1,256}$")
_TRACEPARENT_RE = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


@dataclass(frozen=True, slots=True)
class RequestContext:
    request_id: str
    traceparent: str = ""
    tracestate: str = ""
    # Who is calling: the API key's id the gateway authenticated (never the key), or "".
    principal: str = ""
    # False when `traceparent` was made up here (the caller sent none): logs still carry it,
    # but a trace span must not claim it as a parent that nobody recorded (offload/tracing.py).
    trace_from_caller: bool = True


_current: contextvars.ContextVar[RequestContext | None] = contextvars.ContextVar(
    "offload_request_context", default=None
)


def new_request_id() -> str:
    return os.urandom(8).hex()  # what secrets.token_hex(8) does, without its two extra calls


def valid_request_id(value: str | None) -> str | None:
    """The caller's request id if it is safe to log and echo, else None."""
    if value and _REQUEST_ID_RE.match(value):
        return value
    return None


def valid_traceparent(value: str | None) -> str | None:
    if value and _TRACEPARENT_RE.match(value) and not value.startswith("00-" + "0" * 32):
        return value
    return None


def child_traceparent(parent: str | None) -> str:
    """A traceparent for the next hop: same trace id, new span id (or a new trace)."""
    match = _TRACEPARENT_RE.match(parent or "")
    trace_id = match.group(1) if match else secrets.token_hex(16)
    flags = match.group(3) if match else "01"
    return f"00-{trace_id}-{os.urandom(8).hex()}-{flags}"


def from_headers(
    request_id: str | None, traceparent: str | None, tracestate: str | None = None, principal: str | None = None
) -> RequestContext:
    """Build a context from inbound values, generating what is missing or malformed."""
    received = valid_traceparent(traceparent)
    return RequestContext(
        request_id=valid_request_id(request_id) or new_request_id(),
        traceparent=received or child_traceparent(None),
        tracestate=(tracestate or "")[:512],
        principal=principal if principal and _PRINCIPAL_RE.match(principal) else "",
        trace_from_caller=received is not None,
    )


def current() -> RequestContext | None:
    return _current.get()


def bind(ctx: RequestContext) -> contextvars.Token:
    """Make `ctx` current until `unbind(token)` (for code where a `with bound()` block does not fit)."""
    return _current.set(ctx)


def unbind(token: contextvars.Token) -> None:
    _current.reset(token)


@contextmanager
def bound(ctx: RequestContext) -> Iterator[RequestContext]:
    """Make `ctx` the current context (for logs) inside the block."""
    token = _current.set(ctx)
    try:
        yield ctx
    finally:
        _current.reset(token)
