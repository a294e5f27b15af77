"""The Dispatch RPC (offload.v1.CallBatching): many unary calls in one RPC, each on its own.

Every item goes through the same `CallPath` as a unary call of its method and gets its own
`google.rpc.Status`: a bad, failing or late item never fails its neighbours. Inline methods
(plain `def` @light) are answered in order, synchronously; anything else a client sends here
anyway (a stale policy, another client) still works: it runs as a task with its own deadline,
and the response waits for it. `GetBatchingPolicy` tells clients which methods are inline, so
they send only those and a slow call never holds a fast one.

Limits: at most `max_calls` items and the gRPC message limit per request; a response that
would pass the message limit answers the items that do not fit with RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from google.rpc import code_pb2, error_details_pb2
from prometheus_client import CollectorRegistry, Histogram

from compute.calls import BoundOperation, CallPath
from compute.errors import ComputeError, DeadlineExceeded, ResourceExhausted
from compute.servicer import retry_after_seconds
from offload import context
from offload.v1 import batching_pb2

SERVICE = "offload.v1.CallBatching"
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
BATCH_BYTES_BUCKETS = (256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304)


class BatchMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.calls = Histogram(
            "offload_compute_batch_calls", "Calls per Dispatch RPC (batch size)", buckets=BATCH_SIZE_BUCKETS, registry=registry
        )
        self.bytes = Histogram(
            "offload_compute_batch_bytes", "Request bytes per Dispatch RPC", buckets=BATCH_BYTES_BUCKETS, registry=registry
        )


def _fail(result: Any, exc: ComputeError) -> None:
    result.status.code = code_pb2.Code.Value(exc.code)
    result.status.message = exc.message
    if isinstance(exc, ResourceExhausted):
        info = error_details_pb2.RetryInfo()
        info.retry_delay.seconds = retry_after_seconds(exc)
        result.status.details.add().Pack(info)


class BatchingServicer:
    def __init__(self, calls: CallPath, *, max_calls: int, max_bytes: int, metrics: BatchMetrics) -> None:
        self._calls = calls
        self._max_calls = max_calls
        self._max_bytes = max_bytes
        self._metrics = metrics

    def policy(self) -> batching_pb2.BatchingPolicy:
        return batching_pb2.BatchingPolicy(
            methods=self._calls.inline_paths(), max_calls=self._max_calls, max_bytes=self._max_bytes
        )

    def handlers(self) -> list[grpc.GenericRpcHandler]:
        methods = {
            "Dispatch": grpc.unary_unary_rpc_method_handler(
                self.dispatch, batching_pb2.DispatchRequest.FromString, batching_pb2.DispatchResponse.SerializeToString
            ),
            "GetBatchingPolicy": grpc.unary_unary_rpc_method_handler(
                self.get_policy,
                batching_pb2.GetBatchingPolicyRequest.FromString,
                batching_pb2.BatchingPolicy.SerializeToString,
            ),
        }
        return [grpc.method_handlers_generic_handler(SERVICE, methods)]

    async def get_policy(self, request: Any, grpc_context: grpc.aio.ServicerContext) -> batching_pb2.BatchingPolicy:
        return self.policy()

    async def dispatch(self, request: batching_pb2.DispatchRequest, grpc_context: grpc.aio.ServicerContext) -> Any:
        items = request.calls
        if len(items) > self._max_calls:
            await grpc_context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED, f"a batch may hold at most {self._max_calls} calls"
            )
        self._metrics.calls.observe(len(items))
        self._metrics.bytes.observe(request.ByteSize())
        reply = batching_pb2.DispatchResponse()
        results = [reply.results.add() for _ in items]
        encoded: list[bytes | None] = [None] * len(items)
        pending: dict[asyncio.Task, int] = {}
        now = time.time()
        calls = self._calls
        try:
            for index, item in enumerate(items):
                bound = calls.by_path.get(item.method)
                if bound is None:
                    results[index].status.code = code_pb2.UNIMPLEMENTED
                    results[index].status.message = "no operation is registered for this method"
                    continue
                try:
                    message = bound.request_cls.FromString(item.request)
                except DecodeError:
                    results[index].status.code = code_pb2.INVALID_ARGUMENT
                    results[index].status.message = "the request is not a valid message of this method"
                    continue
                ctx = context.from_headers(item.request_id, item.traceparent, item.tracestate)
                deadline = now + item.timeout.ToNanoseconds() / 1e9 if item.HasField("timeout") else None
                if bound.inline:
                    try:
                        encoded[index] = calls.answer_now(bound, message, ctx, deadline).SerializeToString()
                    except ComputeError as exc:
                        _fail(results[index], exc)
                else:
                    task = asyncio.ensure_future(self._awaited(bound, message, ctx, deadline))
                    pending[task] = index
            if pending:
                await asyncio.wait(pending)
                for task, index in pending.items():
                    try:
                        encoded[index] = task.result()
                    except ComputeError as exc:
                        _fail(results[index], exc)
        finally:
            for task in pending:  # the whole RPC was cancelled: so is every item still running
                task.cancel()
        self._fill(results, encoded)
        return reply

    async def _awaited(self, bound: BoundOperation, message: Any, ctx: context.RequestContext, deadline: float | None) -> bytes:
        # gRPC enforces a unary call's deadline by cancelling its handler; an item gets the same.
        timeout = None if deadline is None else max(0.0, deadline - time.time())
        try:
            async with asyncio.timeout(timeout):
                response = await self._calls.answer(bound, message, ctx, deadline)
        except TimeoutError:
            raise DeadlineExceeded("the deadline passed before compute answered") from None
        return response.SerializeToString()

    def _fill(self, results: list[Any], encoded: list[bytes | None]) -> None:
        """Put the responses in, within the message limit (room is left for the framing)."""
        room = self._max_bytes - 64 * len(results)
        for result, payload in zip(results, encoded):
            if payload is None:
                room -= result.status.ByteSize()
                continue
            if len(payload) > room:
                _fail(result, ResourceExhausted("the response is larger than the gRPC message limit"))
                continue
            room -= len(payload)
            result.response = payload
