"""An async Python client for compute that batches the calls worth batching.

    async with ComputeChannel("127.0.0.1:50051") as channel:
        get_item = channel.unary("/offload.v1.ComputeService/GetItem", compute_pb2.Item)
        item = await get_item(compute_pb2.GetItemRequest(id="item-42"), timeout=1.0)

What it does for you:
- **Batching.** Calls of the methods compute answers on its loop without awaiting (it says which,
  through `CallBatching.GetBatchingPolicy`) that are issued within one event-loop iteration (or
  `batch_window` seconds) travel as one `Dispatch` RPC (`offload.batcher`). A gRPC call costs
  ~300-400 µs of CPU on each side; a batched one tens of µs per call. Every other call (pool
  work, I/O) is a plain gRPC call of its own, so nothing slow shares an RPC with something
  fast. Until the policy is known (compute not reachable yet), every call is plain unary.
- **Per-call semantics of a unary call:** each call has its own deadline (enforced here and
  in compute), its own status, and its own cancellation: a call cancelled before its batch left
  is never sent. A failed batch fails each member with its status (UNAVAILABLE when compute is
  down); calls of `idempotent_methods` are retried on UNAVAILABLE within their deadline, batched
  or not (plain calls through gRPC's own retry policy). A call that cannot share a batch (too
  big, or its response did not fit next to the others' and it is idempotent) goes alone, plain.
- **Errors** are `CallError`, a `grpc.RpcError` read like a failed call: `code()`, `details()`,
  plus `retry_after` (seconds) when the server asked the caller to wait.

Preconditions: create and use a channel inside one running event loop (gRPC channels must not
cross a fork). `start()` once (or `async with`); `close()` is idempotent.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from typing import Any, Callable, Iterable, Sequence

import grpc

from offload.batcher import BATCH_REFUSED, RESPONSE_TOO_LARGE_FOR_BATCH, BatchObserver, CallBatcher, CallError
from offload.context import (
    PRINCIPAL_HEADER,
    REQUEST_ID_HEADER,
    TABLE_GENERATION_HEADER,
    TRACEPARENT_HEADER,
    TRACESTATE_HEADER,
    RequestContext,
    child_traceparent,
)
from offload.v1 import batching_pb2

__all__ = ["BatchObserver", "CallError", "ComputeChannel", "UnaryMethod"]

log = logging.getLogger("offload.client")

DISPATCH = "/offload.v1.CallBatching/Dispatch"
GET_POLICY = "/offload.v1.CallBatching/GetBatchingPolicy"
_RETRY_BACKOFF = (0.05, 0.5)  # first and largest delay between attempts (full jitter)


def metadata(ctx: RequestContext | None) -> tuple[tuple[str, str], ...]:
    """gRPC metadata of a call: request id, and the caller's trace context (W3C: the caller's
    current span is the parent of compute's; with no context, a new trace)."""
    if ctx is None or not ctx.traceparent:
        traceparent = child_traceparent(None)
        if ctx is None:
            return ((TRACEPARENT_HEADER, traceparent),)
    else:
        traceparent = ctx.traceparent
    md = ((REQUEST_ID_HEADER, ctx.request_id), (TRACEPARENT_HEADER, traceparent))
    if ctx.tracestate:
        md += ((TRACESTATE_HEADER, ctx.tracestate),)
    if ctx.principal:
        md += ((PRINCIPAL_HEADER, ctx.principal),)
    return md


def _generation(trailers: Any) -> int | None:
    """The `offload-table-generation` trailer of a unary call (compute/servicer.py), or None."""
    for key, value in trailers or ():
        if key == TABLE_GENERATION_HEADER:
            try:
                return int(value)
            except (TypeError, ValueError):
                return None
    return None


def _expire(future: asyncio.Future) -> None:
    if not future.done():
        future.set_exception(CallError(grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline passed before compute answered"))


class UnaryMethod:
    """A callable bound to one method and response type, like a gRPC multi-callable."""

    __slots__ = ("_channel", "path", "_response_cls", "_plain", "idempotent")

    def __init__(self, channel: "ComputeChannel", path: str, response_cls: Any, plain: Any, idempotent: bool) -> None:
        self._channel = channel
        self.path = path
        self._response_cls = response_cls
        self._plain = plain
        self.idempotent = idempotent

    async def __call__(self, request: Any, *, timeout: float | None = None, ctx: RequestContext | None = None) -> Any:
        """The response message; raises CallError. `timeout` in seconds (None: no deadline)."""
        return (await self._call(request, timeout, ctx, want_generation=False))[0]

    async def with_generation(
        self, request: Any, *, timeout: float | None = None, ctx: RequestContext | None = None
    ) -> tuple[Any, int | None]:
        """(the response message, the table generation that answered it: compute's
        `offload-table-generation`; None if compute did not say). Raises CallError."""
        return await self._call(request, timeout, ctx, want_generation=True)

    async def _call(
        self, request: Any, timeout: float | None, ctx: RequestContext | None, want_generation: bool
    ) -> tuple[Any, int | None]:
        channel = self._channel
        batcher = channel._batcher
        if batcher is None or self.path not in channel._batched:
            return await self._call_plain(request, timeout, ctx, want_generation)
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        try:
            result = await self._batched(batcher, request.SerializeToString(), deadline, ctx)
        except CallError as exc:
            # Alone it may work: a refused batch ran nothing; a response too big to share the
            # reply ran once already, so only an idempotent call may run again.
            if not (exc.reason == BATCH_REFUSED or (exc.reason == RESPONSE_TOO_LARGE_FOR_BATCH and self.idempotent)):
                raise
            result = None
        if result is None:  # too big to share an RPC: alone, as a unary call
            remaining = None if deadline is None else max(0.0, deadline - loop.time())
            return await self._call_plain(request, remaining, ctx, want_generation)
        return self._response_cls.FromString(result.response), result.table_generation or None

    async def _batched(self, batcher: CallBatcher, payload: bytes, deadline: float | None, ctx: RequestContext | None) -> Any:
        """The call's BatchedResult, or None if the call is too big for a batch."""
        loop = asyncio.get_running_loop()
        attempt = 0
        while True:
            if ctx is None:
                future = batcher.submit(self.path, payload, deadline)
            else:
                future = batcher.submit(self.path, payload, deadline, ctx.request_id,
                                        ctx.traceparent or child_traceparent(None), ctx.tracestate, ctx.principal)
            if future is None:
                return None
            # A timer handle, not asyncio.timeout(): the same effect for ~1/5 of the cost.
            timer = None if deadline is None else loop.call_at(deadline, _expire, future)
            try:
                return await future
            except CallError as exc:
                delay = self._retry_delay(exc, attempt, deadline, loop.time())
                if delay is None:
                    raise
            finally:
                if timer is not None:
                    timer.cancel()
            attempt += 1
            await asyncio.sleep(delay)

    def _retry_delay(self, exc: CallError, attempt: int, deadline: float | None, now: float) -> float | None:
        """Seconds to wait before the next attempt, or None: do not retry."""
        if not (self.idempotent and exc.code() == grpc.StatusCode.UNAVAILABLE and attempt + 1 < self._channel.retry_max_attempts):
            return None
        first, largest = _RETRY_BACKOFF
        delay = random.uniform(0, min(largest, first * 2**attempt))
        if deadline is not None and now + delay >= deadline:
            return None
        return delay

    async def _call_plain(
        self, request: Any, timeout: float | None, ctx: RequestContext | None, want_generation: bool
    ) -> tuple[Any, int | None]:
        try:
            call = self._plain(request, timeout=timeout, metadata=metadata(ctx), wait_for_ready=False)
            response = await call
            return response, (_generation(await call.trailing_metadata()) if want_generation else None)
        except grpc.aio.AioRpcError as exc:
            raise CallError.from_rpc_error(exc) from None
        except grpc.aio.UsageError:
            raise CallError(grpc.StatusCode.UNAVAILABLE, "the channel to compute is closed") from None
        except asyncio.CancelledError:
            call.cancel()  # the caller left: so does the call, and compute stops its work
            raise


def service_config(idempotent_methods: Iterable[str], max_attempts: int, health_check_service: str | None = None) -> str:
    """gRPC service config: plain calls of idempotent methods are retried on UNAVAILABLE; with a
    `health_check_service` ("" = the server as a whole), client-side health checking (gRPC A17):
    each connection watches `grpc.health.v1.Health/Watch`, and the `round_robin` policy sends
    nothing to a server that answers NOT_SERVING (the default `pick_first` ignores it)."""
    names = []
    for path in sorted(set(idempotent_methods)):
        service, _, method = path.strip("/").partition("/")
        names.append({"service": service, "method": method})
    config: dict[str, Any] = {"methodConfig": []}
    if health_check_service is not None:
        config["healthCheckConfig"] = {"serviceName": health_check_service}
    if names and max_attempts > 1:
        config["methodConfig"].append(
            {
                "name": names,
                "retryPolicy": {
                    "maxAttempts": max_attempts,
                    "initialBackoff": f"{_RETRY_BACKOFF[0]}s",
                    "maxBackoff": f"{_RETRY_BACKOFF[1]}s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        )
    return json.dumps(config)


class _BearerKey(grpc.aio.UnaryUnaryClientInterceptor, grpc.aio.UnaryStreamClientInterceptor):
    """Adds `authorization: Bearer <key>` to every call of the channel (plain, batched, streams)."""

    def __init__(self, key: str) -> None:
        self._entry = ("authorization", f"Bearer {key}")

    def _with_key(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()), self._entry)
        return details._replace(metadata=metadata)

    async def intercept_unary_unary(self, continuation, client_call_details, request):  # type: ignore[override]
        return await continuation(self._with_key(client_call_details), request)

    async def intercept_unary_stream(self, continuation, client_call_details, request):  # type: ignore[override]
        return await continuation(self._with_key(client_call_details), request)


class ComputeChannel:
    """One gRPC channel to compute (or several replicas behind one target), batching included.

    `target`: "host:port", "unix:/path.sock", "dns:///name:port". `credentials`: None for
    plaintext, else `grpc.ssl_channel_credentials(...)`. `batch_window`: seconds a call may
    wait for others (0: only the calls of the same loop iteration). `batching=False` sends every
    call plain. `api_key`: sent as `authorization: Bearer <key>` on every call, for a compute
    that requires one (compute/auth.py).

    Replicas: a target with several addresses ("ipv4:127.0.0.1:50051,127.0.0.1:50052", or a
    `dns:///` name with several records) plus `options=[("grpc.lb_policy_name", "round_robin")]`
    spreads calls, Dispatch RPCs included, over every replica. `health_check_service` ("", the
    default: compute as a whole; None: off) then keeps calls off a replica whose health says
    NOT_SERVING (draining, pool rebuilding, loop stalled); a dead one is dropped when its
    connection breaks. When none serves, calls fail at once with UNAVAILABLE. With the default
    `pick_first` policy the health check is ignored.
    """

    def __init__(
        self,
        target: str,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        api_key: str | None = None,
        options: Sequence[tuple[str, Any]] = (),
        idempotent_methods: Iterable[str] = (),
        retry_max_attempts: int = 3,
        batching: bool = True,
        batch_window: float = 0.0,
        batch_max_calls: int = 128,
        batch_max_bytes: int = 1 << 20,
        max_message_bytes: int = 4 << 20,
        observer: BatchObserver | None = None,
        health_check_service: str | None = "",
    ) -> None:
        self.target = target
        self._credentials = credentials
        self._interceptors = [_BearerKey(api_key)] if api_key else []
        self._idempotent = frozenset(idempotent_methods)
        self.retry_max_attempts = retry_max_attempts
        self._batching = batching
        self._batch_window = batch_window
        self._batch_max_calls = batch_max_calls
        self._batch_max_bytes = min(batch_max_bytes, max_message_bytes)
        self._max_message_bytes = max_message_bytes
        self._observer = observer
        self._options = [
            ("grpc.service_config", service_config(self._idempotent, retry_max_attempts, health_check_service)),
            ("grpc.enable_retries", 1),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            *options,
        ]
        self._channel: grpc.aio.Channel | None = None
        self._batcher: CallBatcher | None = None
        self._batched: frozenset[str] = frozenset()
        self._policy_task: asyncio.Task | None = None
        self._closed = False

    @property
    def grpc_channel(self) -> grpc.aio.Channel:
        """The underlying channel, for what this client does not wrap (streams, health)."""
        if self._channel is None:
            raise RuntimeError("ComputeChannel not started")
        return self._channel

    @property
    def batched_methods(self) -> frozenset[str]:
        """The methods currently sent in batches (empty until compute's policy is known)."""
        return self._batched

    async def start(self) -> None:
        """Call once, inside the running loop that will use the channel."""
        if self._channel is not None or self._closed:
            raise RuntimeError("ComputeChannel already started")
        if self._credentials is None:
            self._channel = grpc.aio.insecure_channel(self.target, options=self._options, interceptors=self._interceptors)
        else:
            self._channel = grpc.aio.secure_channel(
                self.target, self._credentials, options=self._options, interceptors=self._interceptors
            )
        if self._batching:
            self._policy_task = asyncio.get_running_loop().create_task(self._follow_policy(), name="offload-batching-policy")

    async def close(self, grace: float | None = None) -> None:
        """Send what is queued, then close. Idempotent."""
        self._closed = True
        if self._policy_task is not None:
            self._policy_task.cancel()
            await asyncio.gather(self._policy_task, return_exceptions=True)
        if self._batcher is not None:
            await self._batcher.close()
        if self._channel is not None:
            channel, self._channel = self._channel, None
            await channel.close(grace)

    async def __aenter__(self) -> "ComputeChannel":
        await self.start()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()

    def unary(self, path: str, response_cls: Any) -> UnaryMethod:
        """A callable for one unary method, e.g. ("/offload.v1.ComputeService/GetItem", Item)."""
        plain = self.grpc_channel.unary_unary(
            path, request_serializer=_serialize, response_deserializer=response_cls.FromString
        )
        return UnaryMethod(self, path, response_cls, plain, path in self._idempotent)

    def stream(self, path: str, response_cls: Any) -> Callable[..., Any]:
        """A server-streaming multi-callable (plain gRPC: streams are never batched)."""
        return self.grpc_channel.unary_stream(path, request_serializer=_serialize, response_deserializer=response_cls.FromString)

    async def wait_policy(self, timeout: float) -> bool:
        """Wait until compute's batching policy is known; True if it is."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._batcher is None and loop.time() < deadline:
            await asyncio.sleep(0.01)
        return self._batcher is not None

    async def _follow_policy(self) -> None:
        """Read compute's batching policy whenever the channel (re)connects: a restarted compute
        may serve other methods. Until it is known, calls are plain. Never gives up: a failure
        is logged and retried with backoff, so batching cannot silently stay off."""
        channel = self.grpc_channel
        get_policy = channel.unary_unary(
            GET_POLICY, request_serializer=_serialize, response_deserializer=batching_pb2.BatchingPolicy.FromString
        )
        dispatch = channel.unary_unary(
            DISPATCH, request_serializer=_serialize, response_deserializer=batching_pb2.DispatchResponse.FromString
        )
        failures = 0
        while True:
            try:
                state = channel.get_state(try_to_connect=True)
                if state is grpc.ChannelConnectivity.READY:
                    try:
                        policy = await get_policy(batching_pb2.GetBatchingPolicyRequest(), timeout=2.0)
                    except grpc.aio.AioRpcError as exc:
                        if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                            raise
                        self._batched = frozenset()  # a compute without batching: every call plain
                    else:
                        self._apply(policy, dispatch)
                    failures = 0
                await channel.wait_for_state_change(state)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures += 1
                delay = min(5.0, 0.1 * 2**failures)
                if not isinstance(exc, grpc.aio.AioRpcError):
                    log.warning("reading compute's batching policy failed; retrying", exc_info=exc,
                                extra={"retry_in_seconds": delay})
                await asyncio.sleep(delay)

    def _apply(self, policy: batching_pb2.BatchingPolicy, dispatch: Any) -> None:
        max_calls = min(self._batch_max_calls, policy.max_calls or self._batch_max_calls)
        max_bytes = min(self._batch_max_bytes, policy.max_bytes or self._batch_max_bytes)
        if self._batcher is None:
            self._batcher = CallBatcher(
                dispatch,
                window=self._batch_window,
                max_calls=max_calls,
                max_bytes=max_bytes,
                max_response_bytes=self._max_message_bytes,
                observer=self._observer,
            )
        else:
            self._batcher.max_calls, self._batcher.max_bytes = max_calls, max_bytes
        self._batched = frozenset(policy.methods)


def _serialize(message: Any) -> bytes:
    return message.SerializeToString()
