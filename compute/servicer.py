"""gRPC handlers for every registered operation, derived from the proto descriptors.

No per-RPC code: each operation bound by the `CallPath` becomes a unary or server-streaming
generic handler. This module only adapts gRPC to the call path: it reads the request context
from the metadata and the deadline from the call, and is the one place where a `ComputeError`
becomes a gRPC status (with a `retry-after` trailer for RESOURCE_EXHAUSTED). Every unary
response carries an `offload-table-generation` trailer: the table generation that answered.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import defaultdict
from typing import Any, AsyncIterator, Callable

import grpc
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2

from compute.calls import BoundOperation, CallPath
from compute.errors import ComputeError, InvalidArgument, ResourceExhausted
from offload import context

GRPC_DETAILS_KEY = "grpc-status-details-bin"
_CODE_VALUES = dict(code_pb2.Code.items())


def request_context(grpc_context: grpc.aio.ServicerContext) -> context.RequestContext:
    metadata = {key: value for key, value in (grpc_context.invocation_metadata() or ()) if isinstance(value, str)}
    return context.from_headers(
        metadata.get(context.REQUEST_ID_HEADER),
        metadata.get(context.TRACEPARENT_HEADER),
        metadata.get(context.TRACESTATE_HEADER),
        metadata.get(context.PRINCIPAL_HEADER),
    )


def wall_clock_deadline(grpc_context: grpc.aio.ServicerContext) -> float | None:
    remaining = grpc_context.time_remaining()
    return None if remaining is None else time.time() + remaining


def retry_after_seconds(exc: ResourceExhausted) -> int:
    return max(1, math.ceil(exc.retry_after))


def status_details(exc: ComputeError) -> list[Message]:
    """The google.rpc error details of a domain error: RetryInfo, BadRequest."""
    if isinstance(exc, ResourceExhausted):
        info = error_details_pb2.RetryInfo()
        info.retry_delay.seconds = retry_after_seconds(exc)
        return [info]
    if isinstance(exc, InvalidArgument) and exc.field_violations:
        violation = error_details_pb2.BadRequest.FieldViolation
        return [error_details_pb2.BadRequest(field_violations=[violation(field=f, description=d) for f, d in exc.field_violations])]
    return []


async def abort(grpc_context: grpc.aio.ServicerContext, exc: ComputeError, request_id: str) -> None:
    """The one mapping from domain errors to a gRPC status. Raises (ends the RPC).

    Details go the standard way (`grpc-status-details-bin`: a google.rpc.Status, what
    grpcio-status reads); RESOURCE_EXHAUSTED also gets a plain `retry-after` trailer.
    """
    trailers = [(context.REQUEST_ID_HEADER, request_id)]
    if isinstance(exc, ResourceExhausted):
        trailers.append(("retry-after", str(retry_after_seconds(exc))))
    details = status_details(exc)
    if details:
        status = status_pb2.Status(code=_CODE_VALUES[exc.code], message=exc.message)
        for detail in details:
            status.details.add().Pack(detail)
        trailers.append((GRPC_DETAILS_KEY, status.SerializeToString()))
    await grpc_context.abort(getattr(grpc.StatusCode, exc.code), exc.message, tuple(trailers))


class OperationServicer:
    """`handlers()` gives the grpc generic handlers of every operation the call path serves."""

    def __init__(self, calls: CallPath) -> None:
        self._calls = calls

    def handlers(self) -> list[grpc.GenericRpcHandler]:
        by_service: dict[str, dict[str, grpc.RpcMethodHandler]] = defaultdict(dict)
        for bound in self._calls.by_path.values():
            request_cls, response_cls = bound.request_cls, bound.response_cls
            if bound.method.server_streaming:
                handler = grpc.unary_stream_rpc_method_handler(
                    self._stream(bound), request_cls.FromString, response_cls.SerializeToString
                )
            else:
                handler = grpc.unary_unary_rpc_method_handler(
                    self._unary(bound), request_cls.FromString, response_cls.SerializeToString
                )
            by_service[bound.method.containing_service.full_name][bound.method.name] = handler
        return [grpc.method_handlers_generic_handler(name, methods) for name, methods in by_service.items()]

    def _unary(self, bound: BoundOperation) -> Callable:
        calls = self._calls

        async def handle(request: Any, grpc_context: grpc.aio.ServicerContext) -> Any:
            ctx = request_context(grpc_context)
            deadline = wall_clock_deadline(grpc_context)
            # The generation the call starts on is the one it runs on (compute/runtime.py).
            grpc_context.set_trailing_metadata(((context.TABLE_GENERATION_HEADER, calls.generation_text),))
            try:
                if bound.inline:
                    return calls.answer_now(bound, request, ctx, deadline)
                return await calls.answer(bound, request, ctx, deadline)
            except ComputeError as exc:
                await abort(grpc_context, exc, ctx.request_id)

        return handle

    def _stream(self, bound: BoundOperation) -> Callable:
        calls = self._calls

        async def handle(request: Any, grpc_context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            ctx = request_context(grpc_context)
            deadline = wall_clock_deadline(grpc_context)
            try:
                # aclosing: an abandoned stream is finalised here, in its own task, not by the GC.
                async with contextlib.aclosing(calls.stream(bound, request, ctx, deadline)) as messages:
                    async for message in messages:
                        yield message
            except ComputeError as exc:
                await abort(grpc_context, exc, ctx.request_id)

        return handle
