"""The one path every call takes, whichever transport brought it (a unary RPC or a batch item).

`CallPath(operations, metrics)` resolves each registered operation against the proto
descriptors once at start-up (`bind()` -> `BoundOperation`: request/response classes, metric
children, whether it runs inline, whether its request type declares constraints). Then per
call: the readiness gate, the request context bound for log lines, the in-flight registry the
heartbeat reports from, the proto's constraints (compute/constraints.py), cheap validation on the loop, admission into the pool (heavy), the
deadline, and the per-method metrics. It raises `ComputeError` (domain errors, and `Internal`
for a bug, logged here with the request id) or `CancelledError`; turning those into a gRPC
status is the transport's job (compute/servicer.py, compute/batching.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator

from google.protobuf import descriptor_pool, message_factory
from google.rpc import code_pb2
from google.protobuf.descriptor import MethodDescriptor

from compute import constraints
from compute.errors import ComputeError, DeadlineExceeded, Internal, Unavailable
from compute.metrics import CallMetrics
from compute.registry import Kind, Operation
from compute.runtime import Runtime
from offload import context
from offload.tracing import Tracing

log = logging.getLogger("compute.calls")

# A cancellation this close to the deadline is the deadline: our copy of it is taken when the
# handler starts, after the call arrived, and the client's own timer (which cancels the call
# from its side) fires before ours by the transport's latency, more under load.
_DEADLINE_SLACK = 0.05
# google.rpc code name -> number, for the span's rpc.grpc.status_code.
_GRPC_CODES = dict(code_pb2.Code.items())


def grpc_path(full_name: str) -> str:
    """'pkg.Service.Method' -> '/pkg.Service/Method' (the name gRPC puts on the wire)."""
    service, _, method = full_name.rpartition(".")
    return f"/{service}/{method}"


@dataclass(frozen=True, slots=True)
class BoundOperation:
    """An operation resolved against its RPC once, at start-up."""

    op: Operation
    method: MethodDescriptor
    path: str  # "/pkg.Service/Method"
    short_name: str  # "Method": the metrics label
    request_cls: Any
    response_cls: Any
    # Answered on the loop without awaiting (a plain `def` @light): microseconds, never blocks
    # on pool work or I/O. Only these are worth batching.
    inline: bool
    # The request type (or a message in it) declares buf.validate constraints: checked per call.
    constrained: bool
    latency: Any  # the Histogram child of this method


def bind(op: Operation, metrics: CallMetrics) -> BoundOperation:
    try:
        method = descriptor_pool.Default().FindMethodByName(op.method)
    except KeyError as exc:
        raise ValueError(f"{op.method}: no such RPC in the loaded protos") from exc
    if method.client_streaming:
        raise ValueError(f"{op.method}: client-streaming RPCs are not supported")
    if method.server_streaming and (op.kind is not Kind.LIGHT or not inspect.isasyncgenfunction(op.fn)):
        raise ValueError(f"{op.method} is server-streaming: use @light on an async generator")
    short = method.name
    inline = op.kind is Kind.LIGHT and not method.server_streaming and not (
        inspect.iscoroutinefunction(op.fn) or inspect.isasyncgenfunction(op.fn)
    )
    return BoundOperation(
        op=op,
        method=method,
        path=grpc_path(op.method),
        short_name=short,
        request_cls=message_factory.GetMessageClass(method.input_type),
        response_cls=message_factory.GetMessageClass(method.output_type),
        inline=inline,
        constrained=constraints.has_rules(method.input_type),
        latency=metrics.seconds.labels(short),
    )


class CallPath:
    """Runs calls. `activate(runtime)` once the table and pool are up; `ready = False` to drain."""

    def __init__(self, operations: dict[str, Operation], metrics: CallMetrics, tracing: Tracing | None = None) -> None:
        self._metrics = metrics
        self.tracing = tracing  # None: tracing off (offload/tracing.py)
        self.by_path: dict[str, BoundOperation] = {}
        for op in operations.values():
            bound = bind(op, metrics)
            self.by_path[bound.path] = bound
        self._live: Runtime | None = None  # streaming operations read the table served now
        self._runtime: Runtime | None = None  # a unary call keeps the snapshot it started with
        # The table generation new calls run on, formatted once per switch for the trailer that names it.
        self.generation_text = ""
        self._counters: dict[tuple[str, str], Any] = {}
        # Request ids of the calls being served, for the heartbeat's stall report.
        self.inflight: dict[int, str] = {}
        # False until the table and pool are up (`activate`), and again while draining.
        self.ready = False

    def activate(self, runtime: Runtime) -> None:
        self._live = runtime
        self.table_switched()
        self.ready = True

    def table_switched(self) -> None:
        """The live runtime has a new table: calls that start from now on use it. Calls in
        flight keep the snapshot they captured; nothing else changes for them."""
        assert self._live is not None
        self._runtime = self._live.snapshot()
        self.generation_text = str(self.generation)

    @property
    def generation(self) -> int:
        """The table generation new calls run on (0 before `activate`: none yet)."""
        return 0 if self._runtime is None else self._runtime.table.spec.generation

    def service_names(self) -> list[str]:
        return sorted({b.method.containing_service.full_name for b in self.by_path.values()})

    def inline_paths(self) -> list[str]:
        return sorted(path for path, b in self.by_path.items() if b.inline)

    # -- per call ----------------------------------------------------------------------------

    def answer_now(self, bound: BoundOperation, request: Any, ctx: context.RequestContext, deadline: float | None) -> Any:
        """Serve an inline operation (`bound.inline`) synchronously."""
        with _Served(self, bound, ctx, deadline):
            self._admit(deadline)
            if bound.constrained:
                constraints.check(request)
            return bound.op.fn(request, self._runtime)

    async def answer(self, bound: BoundOperation, request: Any, ctx: context.RequestContext, deadline: float | None) -> Any:
        """Serve any unary operation. `deadline` is wall-clock (time.time()) or None.

        The transport enforces the deadline around this coroutine (gRPC does for unary calls);
        heavy work gets it too, so queued work that expires is never started.
        """
        with _Served(self, bound, ctx, deadline) as served:
            self._admit(deadline)
            if bound.constrained:
                constraints.check(request)
            runtime = self._runtime
            op = bound.op
            if op.kind is Kind.LIGHT:
                response = op.fn(request, runtime)
                return (await response) if inspect.isawaitable(response) else response
            if op.validate is not None:
                op.validate(request, runtime)
            merge = None if op.merge is None else (lambda partials: op.merge(request, partials, runtime))
            return await runtime.pool.run(
                op.fn, request, ctx=served.ctx, deadline=deadline, batch=op.batch, merge=merge, name=bound.short_name,
                generation=runtime.table.spec.generation,
            )

    async def stream(
        self, bound: BoundOperation, request: Any, ctx: context.RequestContext, deadline: float | None = None
    ) -> AsyncIterator[Any]:
        """The messages of a server-streaming operation, with the same gate, errors and metrics."""
        with _Served(self, bound, ctx, deadline):
            self._admit(deadline)
            if bound.constrained:
                constraints.check(request)
            async for message in bound.op.fn(request, self._live):
                yield message

    # -- pieces ------------------------------------------------------------------------------

    def _admit(self, deadline: float | None) -> None:
        if not self.ready:
            raise Unavailable("compute is starting or draining; retry shortly")
        if deadline is not None and time.time() >= deadline:
            raise DeadlineExceeded("the deadline passed before the call started; it was not run")

    def _observe(self, bound: BoundOperation, code: str, started: float) -> None:
        elapsed = time.perf_counter() - started
        counter = self._counters.get((bound.short_name, code))
        if counter is None:  # one labels() lookup per (method, code), not per call
            counter = self._counters[(bound.short_name, code)] = self._metrics.calls.labels(bound.short_name, code)
        counter.inc()
        bound.latency.observe(elapsed)
        # A per-call line with the caller's context; off unless log_level=DEBUG.
        if log.isEnabledFor(logging.DEBUG):
            log.debug("call done", extra={"method": bound.op.method, "code": code, "seconds": round(elapsed, 6)})


class _Served:
    """What every call gets around its work: the request context bound (log lines carry it),
    an entry in the in-flight registry, the per-method metrics with the outcome's code, and a
    bug turned into `Internal` (logged here, with its stack, while the context is still bound).
    A call cancelled once its deadline has passed is the transport enforcing that deadline
    (gRPC cancels the handler): it counts as DEADLINE_EXCEEDED, not CANCELLED.

    With tracing on, the call gets a span too (child of the caller's traceparent), and `ctx`
    (bound for logs, sent on to the pool) names that span as the parent of what follows.

    A class, not @contextmanager: this runs per call and costs a third as much.
    """

    __slots__ = ("_calls", "_bound", "ctx", "_deadline", "_token", "_started", "_span")

    def __init__(
        self, calls: CallPath, bound: BoundOperation, ctx: context.RequestContext, deadline: float | None
    ) -> None:
        self._calls, self._bound, self.ctx, self._deadline = calls, bound, ctx, deadline
        self._span = None

    def __enter__(self) -> "_Served":
        self._started = time.perf_counter()
        self._calls.inflight[id(self)] = self.ctx.request_id
        tracing = self._calls.tracing
        if tracing is not None:
            parent = self.ctx.traceparent if self.ctx.trace_from_caller else None  # no made-up parent
            self._span = tracing.start(self._bound.op.method, parent, kind=tracing.SERVER, attributes={
                "rpc.system": "grpc", "rpc.method": self._bound.short_name,
                "rpc.service": self._bound.method.containing_service.full_name,
                "offload.request_id": self.ctx.request_id,
            })  # fmt: skip
            self.ctx = dataclasses.replace(self.ctx, traceparent=tracing.traceparent(self._span), trace_from_caller=True)
        self._token = context.bind(self.ctx)
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        calls, bound = self._calls, self._bound
        try:
            if exc is None:
                code = "OK"
            elif isinstance(exc, ComputeError):
                code = exc.code
            elif isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
                expired = self._deadline is not None and time.time() >= self._deadline - _DEADLINE_SLACK
                code = "DEADLINE_EXCEEDED" if expired else "CANCELLED"
            elif isinstance(exc, Exception):
                code = "INTERNAL"
                log.error("operation failed", exc_info=exc, extra={"method": bound.op.method})
                raise Internal("internal error") from exc
            else:
                code = "CANCELLED"  # KeyboardInterrupt, SystemExit: the process is going away
        finally:
            del calls.inflight[id(self)]
            calls._observe(bound, code, self._started)  # its DEBUG line carries the context too
            if self._span is not None:
                self._span.set_attribute("rpc.grpc.status_code", _GRPC_CODES.get(code, 2))
                calls.tracing.end(self._span, None if code == "OK" else code)
            try:
                context.unbind(self._token)
            except ValueError:
                pass  # a stream finalised outside the task that ran it (abandoned): nothing to restore
