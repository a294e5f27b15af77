"""Direct gRPC callers of compute may be required to present an API key, besides mTLS.

On when `OFFLOAD_COMPUTE_API_KEYS` or `_API_KEYS_FILE` is set (the entries of offload/keys.py).
Every RPC then needs `authorization: Bearer <key>` metadata, except health checks and
reflection (orchestrators and tools probe those). A plain RPC also needs the scopes its proto
declares (`offload.v1.auth`), as at the gateway. A `Dispatch` batch carries calls of any
batched method, so it needs the `dispatch` scope: the key of a trusted forwarder such as the
gateway (`OFFLOAD_GATEWAY_COMPUTE_API_KEY_FILE`), which has authorized each call itself.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable

import grpc

from offload.keys import KeyRing

DISPATCH_SCOPE = "dispatch"
OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


class TokenInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, keys: KeyRing, scopes_by_path: dict[str, frozenset[str]]) -> None:
        self._keys = keys
        self._scopes = scopes_by_path

    async def intercept_service(
        self, continuation: Callable[[Any], Awaitable[grpc.RpcMethodHandler]], details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method = details.method
        if handler is None or method.startswith(OPEN_PREFIXES):
            return handler
        credential = ""
        for key, value in details.invocation_metadata or ():
            if key == "authorization" and isinstance(value, str) and value[:7].lower() == "bearer ":
                credential = value[7:].strip()
        found = self._keys.lookup(credential) if credential else None
        if found is None:
            return _refusal(handler, grpc.StatusCode.UNAUTHENTICATED, "an API key is required: authorization: Bearer <key>")
        missing = self._scopes.get(method, frozenset()) - found.scopes
        if missing:
            return _refusal(handler, grpc.StatusCode.PERMISSION_DENIED, f"this API key lacks the scope(s) {', '.join(sorted(missing))}")
        return handler


def _refusal(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as the method's that only answers `code`."""

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(code, message)

    async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(code, message)
        yield  # pragma: no cover  (makes this an async generator)

    deserializer, serializer = handler.request_deserializer, handler.response_serializer
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(stream, deserializer, serializer)
    return grpc.unary_unary_rpc_method_handler(unary, deserializer, serializer)
