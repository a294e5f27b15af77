"""`CallBatcher`: collects the calls of one event loop and sends them as Dispatch RPCs.

A call joins the batch being collected; the batch leaves at the end of the loop iteration
(`call_soon`: every request woken in this iteration has had its turn) or after `window`
seconds, earlier when it is full (calls or bytes) or when a member's deadline would otherwise
be mostly spent waiting. Each member learns its own outcome through its future: the
serialized response, or a `CallError` with its own status. Used by `offload.client`.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from typing import Any, Protocol

import grpc
from google.protobuf.message import DecodeError
from google.rpc import code_pb2, error_details_pb2, status_pb2

from offload.v1 import batching_pb2

log = logging.getLogger("offload.batcher")

# ErrorInfo reason of an item whose response did not fit in the batch's reply (it may alone).
RESPONSE_TOO_LARGE_FOR_BATCH = "RESPONSE_TOO_LARGE_FOR_BATCH"
# Reason given to the members of a batch compute refused as a whole before running any of them
# (too many calls or bytes for a policy that changed): each may be sent again, plain.
BATCH_REFUSED = "BATCH_REFUSED"
# Bytes a call adds to a DispatchRequest besides its strings and payload (tags, lengths, timeout).
_CALL_FRAMING = 32
_CODES = {code.value[0]: code for code in grpc.StatusCode}
# Where a plain call's google.rpc.Status travels (the gRPC convention grpcio-status reads).
GRPC_DETAILS_KEY = "grpc-status-details-bin"


class CallError(grpc.RpcError):
    """A call that did not succeed, batched or not: the status a unary call would have had.

    Read like a failed grpc.aio call: `code()`, `details()`; plus `retry_after` (seconds, when
    the server asked the caller to wait), `reason` (a google.rpc.ErrorInfo reason) and
    `field_violations` (a google.rpc.BadRequest's (field, description) pairs).
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        retry_after: float | None = None,
        reason: str = "",
        field_violations: list[tuple[str, str]] | None = None,
    ) -> None:
        super().__init__(message)
        self._code = code
        self.message = message
        self.retry_after = retry_after
        self.reason = reason
        self.field_violations = field_violations or []  # google.rpc.BadRequest: (field, description)

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"CallError({self._code.name}, {self.message!r})"

    @classmethod
    def from_rpc_error(cls, exc: grpc.aio.AioRpcError) -> "CallError":
        """From a failed plain call: its code and message, and the rich status in its trailers."""
        retry_after, details = None, None
        for key, value in exc.trailing_metadata() or ():
            if key == "retry-after":
                try:
                    retry_after = float(value)
                except (TypeError, ValueError):
                    pass
            elif key == GRPC_DETAILS_KEY and isinstance(value, bytes):
                try:
                    details = status_pb2.Status.FromString(value)
                except DecodeError:
                    pass
        if details is not None:
            rich = cls.from_status(details)
            return cls(exc.code(), exc.details() or "", retry_after or rich.retry_after, rich.reason, rich.field_violations)
        return cls(exc.code(), exc.details() or "", retry_after)

    @classmethod
    def from_status(cls, status: Any) -> "CallError":
        """From a google.rpc.Status (a batched call's result)."""
        retry_after, reason, violations = None, "", []
        for detail in status.details:
            if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                retry = error_details_pb2.RetryInfo()
                detail.Unpack(retry)
                retry_after = retry.retry_delay.seconds + retry.retry_delay.nanos / 1e9
            elif detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason = info.reason
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                violations += [(v.field, v.description) for v in bad.field_violations]
        return cls(_CODES.get(status.code, grpc.StatusCode.UNKNOWN), status.message, retry_after, reason, violations)


class BatchObserver(Protocol):
    """Told about every batch sent (e.g. to record metrics)."""

    def batch_sent(self, calls: int, waited_seconds: float) -> None: ...


class _Queued:
    """One call waiting for its batch. `deadline` is in loop time (None: no deadline)."""

    __slots__ = ("method", "payload", "request_id", "traceparent", "tracestate", "principal", "deadline", "future", "enqueued")

    def __init__(self, method: str, payload: bytes, request_id: str, traceparent: str, tracestate: str, principal: str,
                 deadline: float | None, future: asyncio.Future, enqueued: float) -> None:
        self.method = method
        self.payload = payload
        self.request_id = request_id
        self.traceparent = traceparent
        self.tracestate = tracestate
        self.principal = principal
        self.deadline = deadline
        self.future = future
        self.enqueued = enqueued


class CallBatcher:
    """`submit()` calls from one loop; `close()` sends what is queued and waits for replies."""

    def __init__(self, dispatch: Any, *, window: float, max_calls: int, max_bytes: int, max_response_bytes: int,
                 observer: BatchObserver | None) -> None:
        self._dispatch = dispatch
        self._window = window
        self.max_calls = max_calls
        self.max_bytes = max_bytes
        self._max_response_bytes = max_response_bytes
        self._observer = observer
        self._queue: list[_Queued] = []
        self._bytes = 0
        self._flush_handle: asyncio.Handle | None = None
        self._flush_at = 0.0
        self._sending: set[asyncio.Task] = set()
        # Flushes run in a context of their own: not in whichever request's context queued first.
        self._context = contextvars.Context()

    def submit(self, method: str, payload: bytes, deadline: float | None, request_id: str = "",
               traceparent: str = "", tracestate: str = "", principal: str = "") -> asyncio.Future | None:
        """A future for the call's `BatchedResult` (its serialized `response`, and the
        `table_generation` that answered), or None when the call alone is bigger
        than a batch may be (send it plain)."""
        size = len(payload) + len(method) + len(request_id) + len(traceparent) + len(tracestate) + len(principal) + _CALL_FRAMING
        if size > self.max_bytes:
            return None
        loop = asyncio.get_running_loop()
        if self._queue and self._bytes + size > self.max_bytes:
            self.flush()
        future = loop.create_future()
        now = loop.time()
        self._queue.append(_Queued(method, payload, request_id, traceparent, tracestate, principal, deadline, future, now))
        self._bytes += size
        if len(self._queue) >= self.max_calls:
            self.flush()
        elif self._window <= 0:
            if self._flush_handle is None:
                # call_soon runs after every callback already due in this iteration: the calls
                # that other requests issue in the same iteration join this batch.
                self._flush_handle = loop.call_soon(self.flush, context=self._context)
        else:
            flush_at = now + self._window if self._flush_handle is None else self._flush_at
            if deadline is not None and deadline - self._window < flush_at:
                flush_at = now  # waiting out the window would eat most of this call's time
            if self._flush_handle is None or flush_at < self._flush_at:
                if self._flush_handle is not None:
                    self._flush_handle.cancel()
                self._flush_at = flush_at
                self._flush_handle = loop.call_at(flush_at, self.flush, context=self._context)
        return future

    def flush(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        queued, self._queue, self._bytes = self._queue, [], 0
        # A caller that gave up (cancelled, timed out) before the batch left is not sent.
        live = [q for q in queued if not q.future.done()]
        if not live:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        waited = now - live[0].enqueued
        if self._observer is not None:
            self._observer.batch_sent(len(live), waited)
        request = batching_pb2.DispatchRequest(max_response_bytes=self._max_response_bytes)
        request.waited.FromNanoseconds(int(waited * 1e9))
        longest: float | None = 0.0
        for q in live:
            call = request.calls.add(method=q.method, request=q.payload, request_id=q.request_id,
                                     traceparent=q.traceparent, tracestate=q.tracestate, principal=q.principal)
            if q.deadline is None:
                longest = None
                continue
            # Time left as the batch leaves, not as the call was queued: compute's deadline for
            # the item is then never later than the caller's.
            remaining = max(0.0, q.deadline - now)
            call.timeout.FromNanoseconds(int(remaining * 1e9))
            if longest is not None:
                longest = max(longest, remaining)
        # The RPC lives as long as its longest-lived item (each item is bounded on its own).
        timeout = None if longest is None else longest + 0.1
        task = loop.create_task(self._send(live, request, timeout), context=self._context)
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self, live: list[_Queued], request: batching_pb2.DispatchRequest, timeout: float | None) -> None:
        try:
            reply = await self._dispatch(request, timeout=timeout, wait_for_ready=False)
        except grpc.aio.AioRpcError as exc:
            code, reason = exc.code(), ""
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                reason = BATCH_REFUSED  # refused before any item ran: each may go alone
            for q in live:
                _settle_error(q, CallError(code, exc.details() or "", None, reason))
            return
        except asyncio.CancelledError:
            for q in live:
                _settle_error(q, CallError(grpc.StatusCode.CANCELLED, "the channel was closed"))
            raise
        except grpc.aio.UsageError:
            for q in live:
                _settle_error(q, CallError(grpc.StatusCode.UNAVAILABLE, "the channel to compute is closed"))
            return
        except Exception:
            log.exception("a batch could not be sent")
            for q in live:
                _settle_error(q, CallError(grpc.StatusCode.INTERNAL, "the batch could not be sent"))
            return
        results = reply.results
        for index, q in enumerate(live):
            if q.future.done():
                continue
            if index >= len(results):  # compute answered fewer calls than it was sent
                _settle_error(q, CallError(grpc.StatusCode.INTERNAL, "compute's reply is missing this call"))
                continue
            result = results[index]
            if result.HasField("status") and result.status.code != code_pb2.OK:
                q.future.set_exception(CallError.from_status(result.status))
            else:
                q.future.set_result(result)

    async def close(self) -> None:
        self.flush()
        if self._sending:
            await asyncio.wait(set(self._sending), timeout=1.0)


def _settle_error(q: _Queued, error: CallError) -> None:
    if not q.future.done():
        q.future.set_exception(error)  # one error object per caller: tracebacks never mix
