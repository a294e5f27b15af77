"""gRPC handlers derived from the proto descriptors and the operation registry.

No per-RPC code: for each registered operation we look up its method descriptor, take the
request/response classes from it, and wrap the function with what every call needs:
request context, readiness gate, deadline, admission (heavy), metrics, and the one place
where domain errors become gRPC status codes.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import math
import time
from collections import defaultdict
from typing import Any, AsyncIterator, Callable

import grpc
from google.protobuf import descriptor_pool, message_factory

from compute.errors import ComputeError, ResourceExhausted, Unavailable
from compute.metrics import CallMetrics
from compute.registry import Kind, Operation
from compute.runtime import Runtime
from offload import context

log = logging.getLogger("compute.servicer")


def request_context(grpc_context: grpc.aio.ServicerContext) -> context.RequestContext:
    metadata = {key: value for key, value in (grpc_context.invocation_metadata() or ()) if isinstance(value, str)}
    return context.from_headers(
        metadata.get(context.REQUEST_ID_HEADER),
        metadata.get(context.TRACEPARENT_HEADER),
        metadata.get(context.TRACESTATE_HEADER),
    )


async def abort(grpc_context: grpc.aio.ServicerContext, exc: ComputeError, request_id: str) -> None:
    """The one mapping from domain errors to gRPC status. Raises (ends the RPC)."""
    trailers = [(context.REQUEST_ID_HEADER, request_id)]
    if isinstance(exc, ResourceExhausted):
        trailers.append(("retry-after", str(max(1, math.ceil(exc.retry_after)))))
    await grpc_context.abort(getattr(grpc.StatusCode, exc.code), exc.message, tuple(trailers))


class Dispatcher:
    """Wraps each operation; `handlers()` gives the grpc generic handlers to register."""

    def __init__(self, operations: dict[str, Operation], metrics: CallMetrics) -> None:
        self._operations = operations
        self._metrics = metrics
        # Bound once per method, not looked up on every call.
        self._short_names = {name: name.rsplit(".", 1)[1] for name in operations}
        self._latency = {name: metrics.seconds.labels(short) for name, short in self._short_names.items()}
        self._runtime: Runtime | None = None
        # Request ids of the calls being served, for the heartbeat's stall report.
        self.inflight: dict[int, str] = {}
        # False until the table and pool are up (`activate`), and again while draining.
        self.ready = False

    def activate(self, runtime: Runtime) -> None:
        self._runtime = runtime
        self.ready = True

    def service_names(self) -> list[str]:
        return sorted({op.method.rsplit(".", 1)[0] for op in self._operations.values()})

    def handlers(self) -> list[grpc.GenericRpcHandler]:
        by_service: dict[str, dict[str, grpc.RpcMethodHandler]] = defaultdict(dict)
        pool = descriptor_pool.Default()
        for op in self._operations.values():
            try:
                method = pool.FindMethodByName(op.method)
            except KeyError as exc:
                raise ValueError(f"{op.method}: no such RPC in the loaded protos (run `make protos`?)") from exc
            request_cls = message_factory.GetMessageClass(method.input_type)
            response_cls = message_factory.GetMessageClass(method.output_type)
            if method.server_streaming:
                if op.kind is not Kind.LIGHT or not inspect.isasyncgenfunction(op.fn):
                    raise ValueError(f"{op.method} is server-streaming: use @light on an async generator")
                handler = grpc.unary_stream_rpc_method_handler(
                    self._stream(op), request_cls.FromString, response_cls.SerializeToString
                )
            elif method.client_streaming:
                raise ValueError(f"{op.method}: client-streaming RPCs are not supported")
            else:
                handler = grpc.unary_unary_rpc_method_handler(
                    self._unary(op), request_cls.FromString, response_cls.SerializeToString
                )
            by_service[method.containing_service.full_name][method.name] = handler
        return [grpc.method_handlers_generic_handler(name, methods) for name, methods in by_service.items()]

    @contextlib.asynccontextmanager
    async def _serving(self, op: Operation, grpc_context: grpc.aio.ServicerContext) -> AsyncIterator[context.RequestContext]:
        """Everything a call gets, whatever the operation: context, gate, errors, metrics."""
        started = time.perf_counter()
        code = "OK"
        ctx = request_context(grpc_context)
        self.inflight[id(ctx)] = ctx.request_id
        try:
            with context.bound(ctx):
                try:
                    if not self.ready:
                        raise Unavailable("compute is starting or draining; retry shortly")
                    yield ctx
                except ComputeError as exc:
                    code = exc.code
                    await abort(grpc_context, exc, ctx.request_id)
                except asyncio.CancelledError:
                    code = "CANCELLED"
                    raise
                except Exception:
                    code = "INTERNAL"
                    log.exception("operation failed", extra={"method": op.method})
                    await grpc_context.abort(grpc.StatusCode.INTERNAL, "internal error")
                finally:
                    # A per-call line with the caller's context; off unless log_level=DEBUG.
                    if log.isEnabledFor(logging.DEBUG):
                        log.debug(
                            "call done",
                            extra={"method": op.method, "code": code, "seconds": round(time.perf_counter() - started, 6)},
                        )
        finally:
            self.inflight.pop(id(ctx), None)
            self._metrics.calls.labels(self._short_names[op.method], code).inc()
            self._latency[op.method].observe(time.perf_counter() - started)

    def _unary(self, op: Operation) -> Callable:
        is_async = inspect.iscoroutinefunction(op.fn)

        async def handle(request: Any, grpc_context: grpc.aio.ServicerContext) -> Any:
            async with self._serving(op, grpc_context) as ctx:
                runtime = self._runtime
                if op.kind is Kind.LIGHT:
                    response = op.fn(request, runtime)
                    return (await response) if is_async else response
                if op.validate is not None:
                    op.validate(request, runtime)
                remaining = grpc_context.time_remaining()
                deadline = None if remaining is None else time.time() + remaining
                return await runtime.pool.run(op.fn, request, ctx=ctx, deadline=deadline)

        return handle

    def _stream(self, op: Operation) -> Callable:
        async def handle(request: Any, grpc_context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async with self._serving(op, grpc_context):
                async for item in op.fn(request, self._runtime):
                    yield item

        return handle
