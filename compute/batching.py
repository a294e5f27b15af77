"""The Dispatch RPC (offload.v1.CallBatching): many unary calls in one RPC, each on its own.

Every item goes through the same `CallPath` as a unary call of its method and gets its own
`google.rpc.Status`: a bad, failing or late item never fails its neighbours, whatever it
raises or returns. Inline methods (plain `def` @light) are answered in order, synchronously;
anything else a client sends here anyway (a stale policy, another client) still works: it runs
as a task with its own deadline, and the response waits for it (it can be cancelled only with
the whole RPC). `GetBatchingPolicy` tells clients which methods are inline, so they send only
those and a slow call never holds a fast one.

Limits: at most `max_calls` items and the gRPC message limit per request; a reply is kept
within the smaller of compute's message limit and the client's receive limit, and the items
whose response does not fit fail alone with RESOURCE_EXHAUSTED (marked, so that the client
may send them again as plain calls).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from google.rpc import code_pb2, error_details_pb2

from compute.calls import BoundOperation, CallPath
from compute.errors import Cancelled, ComputeError, DeadlineExceeded, Internal, InvalidArgument, ResourceExhausted
from compute.metrics import BatchMetrics
from compute.servicer import status_details
from offload import context
from offload.batcher import RESPONSE_TOO_LARGE_FOR_BATCH  # the ErrorInfo reason the client resends on
from offload.v1 import batching_pb2

log = logging.getLogger("compute.batching")

BATCHING_SERVICE = "offload.v1.CallBatching"
# Bytes kept per result for its framing and, should it fail, its status (a message, RetryInfo, ErrorInfo).
_RESULT_RESERVE = 256
_CODE_VALUES = dict(code_pb2.Code.items())


def _fail(result: Any, exc: ComputeError) -> None:
    result.status.code = _CODE_VALUES.get(exc.code, code_pb2.UNKNOWN)
    result.status.message = exc.message
    for detail in status_details(exc):
        result.status.details.add().Pack(detail)


def _bug(bound: BoundOperation, exc: BaseException, ctx: context.RequestContext) -> Internal:
    """A failure outside the operation's own code (e.g. a response of the wrong type)."""
    with context.bound(ctx):
        log.error("operation failed", exc_info=exc, extra={"method": bound.op.method})
    return Internal("internal error")


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
        return [grpc.method_handlers_generic_handler(BATCHING_SERVICE, methods)]

    async def get_policy(self, request: Any, grpc_context: grpc.aio.ServicerContext) -> batching_pb2.BatchingPolicy:
        return self.policy()

    async def dispatch(self, request: batching_pb2.DispatchRequest, grpc_context: grpc.aio.ServicerContext) -> Any:
        items = request.calls
        if len(items) > self._max_calls:
            await grpc_context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED, f"a batch may hold at most {self._max_calls} calls"
            )
        metrics = self._metrics
        metrics.calls.observe(len(items))
        metrics.bytes.observe(request.ByteSize())
        if request.HasField("waited"):
            metrics.wait.observe(request.waited.ToNanoseconds() / 1e9)
        reply = batching_pb2.DispatchResponse()
        # Inline items are answered now, on the table serving now; awaited ones each say theirs.
        generation = self._calls.generation
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
                    _fail(results[index], InvalidArgument("the request is not a valid message of this method"))
                    continue
                ctx = context.from_headers(item.request_id, item.traceparent, item.tracestate, item.principal)
                deadline = now + item.timeout.ToNanoseconds() / 1e9 if item.HasField("timeout") else None
                if not bound.inline:
                    task = asyncio.ensure_future(self._awaited(bound, message, ctx, deadline))
                    pending[task] = index
                    continue
                try:
                    # The class's own serializer checks the response type, as the unary handler's does.
                    encoded[index] = bound.response_cls.SerializeToString(calls.answer_now(bound, message, ctx, deadline))
                    results[index].table_generation = generation
                except ComputeError as exc:
                    _fail(results[index], exc)
                except Exception as exc:
                    _fail(results[index], _bug(bound, exc, ctx))
            if pending:
                await asyncio.wait(pending)
                for task, index in pending.items():
                    try:
                        encoded[index], results[index].table_generation = task.result()
                    except ComputeError as exc:
                        _fail(results[index], exc)
                    except asyncio.CancelledError:
                        _fail(results[index], Cancelled("the call was cancelled"))
        finally:
            for task in pending:  # the whole RPC was cancelled: so is every item still running
                task.cancel()
        limit = min(self._max_bytes, request.max_response_bytes or self._max_bytes)
        self._fill(results, encoded, limit)
        return reply

    async def _awaited(
        self, bound: BoundOperation, message: Any, ctx: context.RequestContext, deadline: float | None
    ) -> tuple[bytes, int]:
        """(the serialized response, the table generation that answered)."""
        # gRPC enforces a unary call's deadline by cancelling its handler; an item gets the same.
        timeout = None if deadline is None else max(0.0, deadline - time.time())
        generation = self._calls.generation  # the one answer() starts on: no await in between
        try:
            async with asyncio.timeout(timeout):
                response = await self._calls.answer(bound, message, ctx, deadline)
            return bound.response_cls.SerializeToString(response), generation
        except TimeoutError:
            raise DeadlineExceeded("the deadline passed before compute answered") from None
        except (ComputeError, asyncio.CancelledError):
            raise
        except Exception as exc:
            raise _bug(bound, exc, ctx) from exc

    @staticmethod
    def _fill(results: list[Any], encoded: list[bytes | None], limit: int) -> None:
        """Put the responses in, within `limit` bytes for the whole reply.

        A response that does not fit next to the others fails alone, marked so that the client
        may send it again as a plain call (where it has the whole message to itself).
        """
        # Every result has room reserved for a status, so failing an item never needs more.
        room = limit - _RESULT_RESERVE * len(results) - 64
        for result, payload in zip(results, encoded):
            if payload is None:
                room -= max(0, result.status.ByteSize() - _RESULT_RESERVE)
            elif len(payload) <= room:
                room -= len(payload)
                result.response = payload
            elif len(payload) + _RESULT_RESERVE + 64 <= limit:
                _fail(result, ResourceExhausted("the response did not fit in the batch; send it alone"))
                info = error_details_pb2.ErrorInfo(reason=RESPONSE_TOO_LARGE_FOR_BATCH, domain="offload")
                result.status.details.add().Pack(info)
            else:
                _fail(result, ResourceExhausted("the response is larger than the gRPC message limit"))
