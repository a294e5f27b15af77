"""offload.client against a real compute (no gateway): batching keeps unary semantics per call.

Every test compares a batched call with what the same call answers as plain unary gRPC, and
proves from compute's own metrics (its Prometheus port) or log lines which transport was used.
Two module-scoped computes: `debug_compute` (log level DEBUG: one "call done" line per call,
with its request id) and `limits_compute` (batch_max_calls=3, a 64 KiB gRPC message limit and
40 KB vectors, so a response can outgrow the limit). Tests leave both as they found them.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
import pytest
from google.rpc import code_pb2

from offload.client import CallError, ComputeChannel
from offload.context import RequestContext
from offload.testing.v1 import testing_pb2
from offload.v1 import batching_pb2, compute_pb2, search_pb2
from tests.conftest import ComputeLauncher, ComputeProcess, metric_sample, wait_until

COMPUTE = "/offload.v1.ComputeService"
TESTING = "/offload.testing.v1.TestingService"
GET_ITEM = f"{COMPUTE}/GetItem"
GET_STATS = f"{COMPUTE}/GetStats"
SEARCH = f"{COMPUTE}/Search"
SUBMIT_JOB = f"{COMPUTE}/SubmitJob"
ECHO = f"{TESTING}/Echo"
BLOCK = f"{TESTING}/Block"
FAIL = f"{TESTING}/Fail"
SPIN = f"{TESTING}/Spin"
DISPATCH = "/offload.v1.CallBatching/Dispatch"
GET_POLICY = "/offload.v1.CallBatching/GetBatchingPolicy"
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
LIMIT_BYTES = 64 * 1024  # limits_compute's gRPC message limit
LIMIT_DIM = 10_000  # one GetItem response: ~40 KB, so two do not fit in one 64 KiB response


# -- processes -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def launcher(tmp_path_factory):
    launcher = ComputeLauncher(tmp_path_factory.mktemp("client"))
    yield launcher
    launcher.close()


@pytest.fixture(scope="module")
def debug_compute(launcher) -> ComputeProcess:
    # A Block of up to ~1 s stalls the loop on purpose: keep the heartbeat from calling that a stall.
    return launcher(log_level="DEBUG", pool_size=1, stall_threshold=3)


@pytest.fixture(scope="module")
def limits_compute(launcher) -> ComputeProcess:
    return launcher(batch_max_calls=3, max_message_bytes=LIMIT_BYTES, rows=50, dim=LIMIT_DIM, pool_size=1)


# -- helpers -------------------------------------------------------------------------------------


class Metrics:
    """Compute's metrics now, and later the change of any sample."""

    def __init__(self, compute: ComputeProcess) -> None:
        self.compute = compute
        self.before = compute.metrics_text()

    def delta(self, name: str, **labels: str) -> float:
        return metric_sample(self.compute.metrics_text(), name, **labels) - metric_sample(self.before, name, **labels)

    def calls(self, method: str, code: str | None = None) -> float:
        labels = {"method": method} if code is None else {"method": method, "code": code}
        return self.delta("offload_compute_calls_total", **labels)


class Recorder:
    """A BatchObserver: the size of every batch the channel sent."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    def batch_sent(self, calls: int, waited_seconds: float) -> None:
        assert waited_seconds >= 0
        self.batches.append(calls)


def run(coro, timeout: float = 30) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def open_channel(compute: ComputeProcess, **options) -> ComputeChannel:
    channel = ComputeChannel(compute.address, **options)
    await channel.start()
    assert await channel.wait_policy(10), "compute's batching policy never arrived"
    return channel


def raw(message: Any) -> bytes:
    return message if isinstance(message, bytes) else message.SerializeToString()


def plain(compute: ComputeProcess, path: str, request: Any, timeout: float = 10) -> tuple[str, Any]:
    """(code name, response bytes or status details) of a plain unary call."""
    rpc = compute.channel().unary_unary(path, request_serializer=raw, response_deserializer=None)
    try:
        return "OK", rpc(request, timeout=timeout)
    except grpc.RpcError as exc:
        return exc.code().name, exc.details()


def item(path: str, request: Any, timeout: float | None = 10, request_id: str = "") -> batching_pb2.BatchedCall:
    call = batching_pb2.BatchedCall(method=path, request=raw(request), request_id=request_id)
    if timeout is not None:
        call.timeout.FromNanoseconds(int(timeout * 1e9))
    return call


def dispatch(compute: ComputeProcess, calls: list[batching_pb2.BatchedCall], timeout: float = 20):
    rpc = compute.channel().unary_unary(
        DISPATCH,
        request_serializer=batching_pb2.DispatchRequest.SerializeToString,
        response_deserializer=batching_pb2.DispatchResponse.FromString,
    )
    return rpc(batching_pb2.DispatchRequest(calls=calls), timeout=timeout)


def outcome(result: batching_pb2.BatchedResult) -> tuple[str, Any]:
    """(code name, response bytes or message) of one Dispatch result, like `plain`."""
    if result.HasField("status") and result.status.code != code_pb2.OK:
        assert result.response == b"", "a failed item carries no response"
        return code_pb2.Code.Name(result.status.code), result.status.message
    return "OK", result.response


def log_lines(compute: ComputeProcess, **fields) -> list[dict]:
    return [r for r in compute.log_records() if all(r.get(k) == v for k, v in fields.items())]


def echo_request(name: str, size: int = 0) -> testing_pb2.EchoRequest:
    return testing_pb2.EchoRequest(name=name, payload=testing_pb2.Payload(blob=b"x" * size) if size else None)


# -- the policy ----------------------------------------------------------------------------------


def test_policy_advertises_only_the_inline_methods(debug_compute):
    async def main():
        channel = await open_channel(debug_compute)
        try:
            return channel.batched_methods
        finally:
            await channel.close()

    batched = run(main())
    assert {GET_ITEM, GET_STATS, ECHO, FAIL, BLOCK} <= batched
    # Pool work, I/O and streams never share an RPC with fast calls.
    assert not batched & {SEARCH, SPIN, SUBMIT_JOB, f"{TESTING}/Crash", f"{TESTING}/Ticks", f"{COMPUTE}/WatchJob"}
    rpc = debug_compute.channel().unary_unary(
        GET_POLICY, request_serializer=raw, response_deserializer=batching_pb2.BatchingPolicy.FromString
    )
    policy = rpc(batching_pb2.GetBatchingPolicyRequest(), timeout=5)
    assert set(policy.methods) == batched
    assert policy.max_calls == 256 and policy.max_bytes == 4 * 1024 * 1024  # compute's defaults


# -- batched vs plain ----------------------------------------------------------------------------


def test_inline_calls_share_one_dispatch_and_the_others_go_plain(debug_compute):
    query = search_pb2.SearchRequest(vector=[1.0] + [0.0] * 15, k=3)
    recorder = Recorder()
    metrics = Metrics(debug_compute)

    async def main():
        channel = await open_channel(debug_compute, observer=recorder)
        try:
            get_item = channel.unary(GET_ITEM, compute_pb2.Item)
            search = channel.unary(SEARCH, search_pb2.SearchResponse)
            return await asyncio.gather(
                get_item(compute_pb2.GetItemRequest(id="item-1"), timeout=10),
                get_item(compute_pb2.GetItemRequest(id="nope"), timeout=10),
                search(query, timeout=10),
                get_item(compute_pb2.GetItemRequest(id="item-2"), timeout=10),
                return_exceptions=True,
            )
        finally:
            await channel.close()

    item1, missing, hits, item2 = run(main())
    assert recorder.batches == [3], "the three GetItem calls of one loop iteration: one Dispatch; Search: plain"
    assert metrics.delta("offload_compute_batch_calls_count") == 1
    assert metrics.delta("offload_compute_batch_calls_sum") == 3
    assert metrics.calls("GetItem", "OK") == 2 and metrics.calls("GetItem", "NOT_FOUND") == 1
    assert metrics.calls("Search", "OK") == 1

    # Each answer is what plain unary answers.
    assert plain(debug_compute, GET_ITEM, compute_pb2.GetItemRequest(id="item-1")) == ("OK", item1.SerializeToString())
    assert plain(debug_compute, GET_ITEM, compute_pb2.GetItemRequest(id="item-2")) == ("OK", item2.SerializeToString())
    assert item1.id == "item-1" and len(item1.vector) == 16
    assert isinstance(missing, CallError) and missing.code() == grpc.StatusCode.NOT_FOUND
    assert plain(debug_compute, GET_ITEM, compute_pb2.GetItemRequest(id="nope")) == ("NOT_FOUND", missing.message)
    assert plain(debug_compute, SEARCH, query) == ("OK", hits.SerializeToString())
    assert len(hits.hits) == 3


def test_each_item_keeps_its_own_deadline(debug_compute):
    """One batch: [Block 0.8 s (deadline 0.2 s), Echo (10 s), GetItem (0.3 s)]. The Block's caller
    gets DEADLINE_EXCEEDED at its own deadline, not when the batch comes back; the Echo is answered;
    the GetItem, whose deadline passed while the Block held compute's loop, is never run."""
    recorder = Recorder()
    metrics = Metrics(debug_compute)

    async def timed(coro):
        started = time.monotonic()
        try:
            return await coro, time.monotonic() - started
        except CallError as exc:
            return exc, time.monotonic() - started

    async def main():
        channel = await open_channel(debug_compute, observer=recorder)
        try:
            block = channel.unary(BLOCK, testing_pb2.BlockResponse)
            echo = channel.unary(ECHO, testing_pb2.EchoRequest)
            get_item = channel.unary(GET_ITEM, compute_pb2.Item)
            return await asyncio.gather(
                timed(block(testing_pb2.BlockRequest(seconds=0.8), timeout=0.2)),
                timed(echo(echo_request("neighbour"), timeout=10)),
                timed(get_item(compute_pb2.GetItemRequest(id="item-3"), timeout=0.3)),
            )
        finally:
            await channel.close()

    (blocked, blocked_after), (echoed, _), (late, _) = run(main())
    assert recorder.batches == [3], "all three in one Dispatch"
    assert isinstance(blocked, CallError) and blocked.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert blocked_after < 0.75, f"the caller waited {blocked_after:.2f}s: for the batch, not its own deadline"
    assert echoed == echo_request("neighbour")
    assert isinstance(late, CallError) and late.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert metrics.calls("Block", "OK") == 1  # it ran (as a unary call past its deadline would)
    assert metrics.calls("Echo", "OK") == 1
    # Compute, too, saw the GetItem's deadline pass before its turn: refused, not run.
    assert metrics.calls("GetItem", "DEADLINE_EXCEEDED") == 1 and metrics.calls("GetItem", "OK") == 0


def test_a_call_cancelled_before_the_flush_is_never_sent(debug_compute):
    recorder = Recorder()
    metrics = Metrics(debug_compute)

    async def main():
        channel = await open_channel(debug_compute, observer=recorder, batch_window=0.2)
        try:
            get_item = channel.unary(GET_ITEM, compute_pb2.Item)
            echo = channel.unary(ECHO, testing_pb2.EchoRequest)
            doomed = asyncio.ensure_future(
                get_item(compute_pb2.GetItemRequest(id="item-9"), timeout=10, ctx=RequestContext("cancelled-item"))
            )
            await asyncio.sleep(0)  # its first step: queued for the batch, waiting for the window
            assert not doomed.done()
            doomed.cancel()
            # A neighbour queued in the same window: the batch leaves with it alone.
            reply = await echo(echo_request("sentinel"), timeout=10, ctx=RequestContext("sentinel-item"))
            with pytest.raises(asyncio.CancelledError):
                await doomed
            return reply
        finally:
            await channel.close()

    assert run(main()) == echo_request("sentinel")
    assert recorder.batches == [1], "the cancelled call left the batch"
    assert metrics.calls("Echo") == 1
    assert metrics.calls("GetItem") == 0, "compute never ran the cancelled call"
    wait_until(lambda: log_lines(debug_compute, msg="call done", request_id="sentinel-item"), 5, message="sentinel's line")
    assert log_lines(debug_compute, request_id="cancelled-item") == []


def test_request_id_and_trace_of_batched_calls_reach_compute_logs(debug_compute):
    recorder = Recorder()

    async def main():
        channel = await open_channel(debug_compute, observer=recorder)
        try:
            get_item = channel.unary(GET_ITEM, compute_pb2.Item)
            return await asyncio.gather(
                get_item(compute_pb2.GetItemRequest(id="item-4"), ctx=RequestContext("batched-ok", TRACEPARENT)),
                get_item(compute_pb2.GetItemRequest(id="nope"), ctx=RequestContext("batched-missing", TRACEPARENT)),
                return_exceptions=True,
            )
        finally:
            await channel.close()

    found, missing = run(main())
    assert recorder.batches == [2]
    assert found.id == "item-4" and isinstance(missing, CallError) and missing.code() == grpc.StatusCode.NOT_FOUND
    for request_id, code in (("batched-ok", "OK"), ("batched-missing", "NOT_FOUND")):
        wait_until(lambda: log_lines(debug_compute, msg="call done", request_id=request_id), 5, message=request_id)
        [line] = log_lines(debug_compute, msg="call done", request_id=request_id)
        assert line["method"] == "offload.v1.ComputeService.GetItem" and line["code"] == code
        assert line["process"] == "compute" and line["pid"] == debug_compute.pid
        # The caller's trace context, as W3C sends it: the caller's span is the parent of compute's.
        assert line["traceparent"] == TRACEPARENT


# -- poison and invalid items --------------------------------------------------------------------


def test_poison_and_invalid_items_never_fail_their_neighbours(debug_compute):
    """A raw Dispatch mixing every kind of bad item with good ones: each gets its own status,
    the same as the same call made plain (where plain unary can express it), in order."""
    block_bug = testing_pb2.BlockRequest(seconds=-1)  # time.sleep(-1): a plain ValueError, i.e. a bug
    cases: list[tuple[str, Any, dict, str | None]] = [
        # (method, request, item options, expected code; None: as plain unary)
        (GET_ITEM, compute_pb2.GetItemRequest(id="item-5"), {}, None),
        (GET_ITEM, b"\x0a\x05ab", {}, "INVALID_ARGUMENT"),  # undecodable: a truncated field
        (f"{COMPUTE}/NoSuchMethod", compute_pb2.GetItemRequest(id="item-5"), {}, "UNIMPLEMENTED"),
        ("", b"", {}, "UNIMPLEMENTED"),
        (FAIL, testing_pb2.FailRequest(code="INTERNAL"), {}, None),
        (BLOCK, block_bug, {"request_id": "poison-bug"}, None),
        (SEARCH, search_pb2.SearchRequest(vector=[1.0, 2.0, 3.0], k=1), {}, None),  # heavy, wrong dimension
        (ECHO, echo_request("survivor", 100), {}, None),
        (GET_ITEM, compute_pb2.GetItemRequest(id="nope"), {}, None),
        (SPIN, testing_pb2.SpinRequest(seconds=0), {}, "OK"),  # heavy, valid: awaited in the batch
        (GET_ITEM, compute_pb2.GetItemRequest(id="item-6"), {"timeout": 0}, "DEADLINE_EXCEEDED"),  # expired on arrival
        (FAIL, testing_pb2.FailRequest(code="OK"), {}, None),
        (GET_STATS, compute_pb2.GetStatsRequest(), {}, "OK"),
        (GET_ITEM, compute_pb2.GetItemRequest(id="item-7"), {}, None),
    ]
    metrics = Metrics(debug_compute)
    reply = dispatch(debug_compute, [item(method, request, **options) for method, request, options, _ in cases])
    assert len(reply.results) == len(cases)
    assert metrics.calls("GetItem", "DEADLINE_EXCEEDED") == 1 and metrics.calls("GetItem", "OK") == 2

    for (method, request, _, expected), result in zip(cases, reply.results):
        got = outcome(result)
        if expected is None:
            assert got == plain(debug_compute, method, request), (method, request)
        else:
            assert got[0] == expected, (method, request, got)

    codes = [outcome(r)[0] for r in reply.results]
    assert codes == [
        "OK", "INVALID_ARGUMENT", "UNIMPLEMENTED", "UNIMPLEMENTED", "INTERNAL", "INTERNAL", "INVALID_ARGUMENT",
        "OK", "NOT_FOUND", "OK", "DEADLINE_EXCEEDED", "INVALID_ARGUMENT", "OK", "OK",
    ]
    assert compute_pb2.Item.FromString(reply.results[0].response).id == "item-5"
    assert compute_pb2.Item.FromString(reply.results[-1].response).id == "item-7"
    assert testing_pb2.EchoRequest.FromString(reply.results[7].response) == echo_request("survivor", 100)
    assert testing_pb2.SpinResponse.FromString(reply.results[9].response).finished
    assert compute_pb2.Stats.FromString(reply.results[12].response).cache.rows == 2000
    assert outcome(reply.results[5]) == ("INTERNAL", "internal error")  # no stack, no input in the answer
    # The bug is logged where it happened, with the item's own request id.
    [bug] = log_lines(debug_compute, msg="operation failed", request_id="poison-bug")
    assert bug["method"] == "offload.testing.v1.TestingService.Block" and "ValueError" in bug["exc"]
    # An empty batch is a valid batch.
    assert list(dispatch(debug_compute, []).results) == []


# -- bounds --------------------------------------------------------------------------------------


def test_batches_hold_at_most_batch_max_calls(debug_compute):
    recorder = Recorder()
    metrics = Metrics(debug_compute)
    ids = [f"item-{n}" for n in range(100, 110)]

    async def main():
        channel = await open_channel(debug_compute, observer=recorder, batch_max_calls=4)
        try:
            get_item = channel.unary(GET_ITEM, compute_pb2.Item)
            return await asyncio.gather(*(get_item(compute_pb2.GetItemRequest(id=i), timeout=10) for i in ids))
        finally:
            await channel.close()

    items = run(main())
    assert [i.id for i in items] == ids
    assert recorder.batches == [4, 4, 2]
    assert metrics.delta("offload_compute_batch_calls_count") == 3
    assert metrics.delta("offload_compute_batch_calls_sum") == 10
    assert all(len(i.vector) == 16 for i in items)


def test_batches_stay_under_batch_max_bytes_and_bigger_calls_go_plain(debug_compute):
    recorder = Recorder()
    metrics = Metrics(debug_compute)
    small = [echo_request(f"small-{n}", 300) for n in range(6)]
    big = echo_request("big", 3000)
    size = len(small[0].SerializeToString())
    limit = 1024
    assert 3 * size <= limit < 4 * size and len(big.SerializeToString()) > limit

    async def main():
        channel = await open_channel(debug_compute, observer=recorder, batch_max_bytes=limit)
        try:
            echo = channel.unary(ECHO, testing_pb2.EchoRequest)
            requests = [*small[:3], big, *small[3:]]
            return requests, await asyncio.gather(*(echo(r, timeout=10) for r in requests))
        finally:
            await channel.close()

    requests, replies = run(main())
    assert replies == requests, "every call answered, the big one too"
    assert sum(recorder.batches) == 6 and len(recorder.batches) >= 2, "the big call went alone, as plain unary"
    assert all(n * size <= limit for n in recorder.batches)  # the calls' own fields count too: fewer per batch
    assert metrics.calls("Echo", "OK") == 7
    assert metrics.delta("offload_compute_batch_calls_sum") == 6


def test_the_server_policy_caps_a_client_batch(limits_compute):
    recorder = Recorder()
    metrics = Metrics(limits_compute)

    async def main():
        channel = await open_channel(limits_compute, observer=recorder)  # the client would allow 128
        try:
            echo = channel.unary(ECHO, testing_pb2.EchoRequest)
            return await asyncio.gather(*(echo(echo_request(f"e{n}"), timeout=10) for n in range(7)))
        finally:
            await channel.close()

    assert run(main()) == [echo_request(f"e{n}") for n in range(7)]
    assert recorder.batches == [3, 3, 1]
    assert metrics.delta("offload_compute_batch_calls_sum") == 7


def test_a_dispatch_over_the_server_max_calls_is_resource_exhausted(limits_compute):
    calls = [item(ECHO, echo_request(f"e{n}")) for n in range(4)]
    with pytest.raises(grpc.RpcError) as raised:
        dispatch(limits_compute, calls)
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "at most 3 calls" in raised.value.details()
    reply = dispatch(limits_compute, calls[:3])  # at the limit: served
    assert [testing_pb2.EchoRequest.FromString(r.response).name for r in reply.results] == ["e0", "e1", "e2"]


def test_responses_past_the_message_limit_fail_only_the_items_that_do_not_fit(limits_compute):
    """Each GetItem answer (~40 KB) fits the 64 KiB limit alone, two do not: the second one gets
    RESOURCE_EXHAUSTED; a small item after it still fits and is answered."""
    first, second = compute_pb2.GetItemRequest(id="item-1"), compute_pb2.GetItemRequest(id="item-2")
    for request in (first, second):
        code, response = plain(limits_compute, GET_ITEM, request)
        assert code == "OK" and LIMIT_BYTES / 2 < len(response) < LIMIT_BYTES  # fits one by one
    reply = dispatch(limits_compute, [item(GET_ITEM, first), item(GET_ITEM, second), item(ECHO, echo_request("small"))])
    results = [outcome(r) for r in reply.results]
    assert results[0] == plain(limits_compute, GET_ITEM, first)
    assert results[1][0] == "RESOURCE_EXHAUSTED"
    assert results[2] == ("OK", echo_request("small").SerializeToString())

    # Through offload.client: an idempotent call that did not fit is sent again alone, plain, and
    # answered; one that is not idempotent (it ran once already) keeps its RESOURCE_EXHAUSTED.
    async def main(idempotent):
        channel = await open_channel(limits_compute, idempotent_methods=[GET_ITEM] if idempotent else [])
        try:
            get_item = channel.unary(GET_ITEM, compute_pb2.Item)
            echo = channel.unary(ECHO, testing_pb2.EchoRequest)
            return await asyncio.gather(
                get_item(first, timeout=10), get_item(second, timeout=10), echo(echo_request("small"), timeout=10),
                return_exceptions=True,
            )
        finally:
            await channel.close()

    got_first, got_second, got_small = run(main(idempotent=True))
    assert got_first.id == "item-1" and len(got_first.vector) == LIMIT_DIM
    assert got_second.id == "item-2" and len(got_second.vector) == LIMIT_DIM
    assert got_small == echo_request("small")
    got_first, got_second, got_small = run(main(idempotent=False))
    assert got_first.id == "item-1" and got_small == echo_request("small")
    assert isinstance(got_second, CallError) and got_second.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert got_second.retry_after is not None and got_second.retry_after >= 1


# -- limits and deadlines at the edges --------------------------------------------------------


def test_a_batch_within_the_advertised_max_bytes_is_not_rejected_whole(limits_compute):
    # Two Echo calls of ~32.7 KB: each alone fits the 64 KiB limit; together the payloads fit
    # too (65,422 <= 65,536 bytes), so the client puts them in one Dispatch.
    requests = [echo_request(f"half-{n}", 32_700) for n in range(2)]
    assert all(plain(limits_compute, ECHO, r)[0] == "OK" for r in requests)
    assert sum(len(r.SerializeToString()) for r in requests) <= LIMIT_BYTES

    async def main():
        channel = await open_channel(limits_compute)
        try:
            echo = channel.unary(ECHO, testing_pb2.EchoRequest)
            return await asyncio.gather(*(echo(r, timeout=10) for r in requests), return_exceptions=True)
        finally:
            await channel.close()

    replies = run(main())
    # The calls' own fields count against the limit too: they go in two batches, both answered.
    assert replies == requests, replies


def test_a_call_with_a_deadline_shorter_than_the_window_is_still_answered(debug_compute):
    async def main():
        channel = await open_channel(debug_compute, batch_window=0.2)
        try:
            echo = channel.unary(ECHO, testing_pb2.EchoRequest)
            return await echo(echo_request("hurry"), timeout=0.1)
        finally:
            await channel.close()

    assert plain(debug_compute, ECHO, echo_request("hurry"), timeout=0.1)[0] == "OK"
    assert run(main()) == echo_request("hurry")  # sent at once, not after the window


def test_items_failed_for_size_never_push_the_response_past_the_limit(limits_compute):
    # An answer that nearly fills the 64 KiB response, then two (~40 KB) that cannot fit.
    big = echo_request("nearly-full", 65_320)
    assert plain(limits_compute, ECHO, big) == ("OK", big.SerializeToString())
    calls = [item(ECHO, big), *(item(GET_ITEM, compute_pb2.GetItemRequest(id=f"item-{n}")) for n in (1, 2))]
    try:
        reply = dispatch(limits_compute, calls)
    except grpc.RpcError as exc:  # the whole reply past the message limit
        pytest.fail(f"the whole Dispatch failed: {exc.code().name} {exc.details()}")
    # Each item either fits (and is right) or fails alone, marked to be sent again plain.
    outcomes = [outcome(r) for r in reply.results]
    assert {code for code, _ in outcomes} <= {"OK", "RESOURCE_EXHAUSTED"} and "RESOURCE_EXHAUSTED" in {c for c, _ in outcomes}
    for call, (code, response) in zip(calls, outcomes):
        if code == "OK":
            assert (code, response) == plain(limits_compute, call.method, call.request)
    assert reply.ByteSize() <= LIMIT_BYTES


def test_a_batch_refused_whole_is_sent_again_call_by_call(limits_compute):
    """A policy gone stale (compute now takes fewer calls per batch than the client thinks):
    compute refuses the Dispatch before running any item, and each call goes alone, plain."""
    metrics = Metrics(limits_compute)

    async def main():
        channel = await open_channel(limits_compute)
        try:
            channel._batcher.max_calls = 10  # stale: compute says 3
            echo = channel.unary(ECHO, testing_pb2.EchoRequest)
            return await asyncio.gather(*(echo(echo_request(f"r{n}"), timeout=10) for n in range(5)))
        finally:
            await channel.close()

    assert run(main()) == [echo_request(f"r{n}") for n in range(5)]
    assert metrics.calls("Echo", "OK") == 5  # each ran once: as a plain call, after the refusal
