"""The loop heartbeat: the watchdog reports a blocked loop's stack while it is still blocked."""

from __future__ import annotations

import asyncio
import logging
import time
import urllib.request

from prometheus_client import CollectorRegistry, generate_latest

from offload.heartbeat import Heartbeat
from offload.testing.v1 import testing_pb2, testing_pb2_grpc
from offload.v1 import compute_pb2, compute_pb2_grpc
from tests.conftest import Captured, wait_until


def a_distinctively_named_blocking_call(seconds: float) -> float:
    time.sleep(seconds)  # blocks the event loop, on purpose
    return time.time()


async def _until(predicate, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {predicate}"
        await asyncio.sleep(0.01)


def test_watchdog_reports_the_blocked_stack_while_blocked():
    captured = Captured()
    logger = logging.getLogger("offload.heartbeat")
    logger.addHandler(captured)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    registry = CollectorRegistry()

    async def scenario():
        heartbeat = Heartbeat(
            interval=0.02, stall_threshold=0.2, inflight=lambda: ["req-a", "req-b"], registry=registry
        )
        heartbeat.start()
        first_tick = heartbeat._last_tick
        await _until(lambda: heartbeat._last_tick != first_tick, 2)  # it ticks
        assert heartbeat.healthy and heartbeat.stats().stalls == 0
        returned_at = a_distinctively_named_blocking_call(1.0)
        await _until(lambda: captured.named("event loop recovered"), 2)
        await _until(lambda: heartbeat.healthy, 2)  # once a tick is on time again
        await heartbeat.stop()
        return heartbeat, returned_at

    try:
        heartbeat, returned_at = asyncio.run(scenario())
    finally:
        logger.removeHandler(captured)
        logger.setLevel(old_level)

    stalls = captured.named("event loop stalled")
    assert len(stalls) == 1, ("one warning per stall, however long it lasts", [vars(r) for r in stalls])
    stall = stalls[0]
    assert stall.levelno == logging.WARNING
    assert stall.created < returned_at, "the stack must be captured while the loop is still blocked"
    assert "a_distinctively_named_blocking_call" in stall.stack
    assert "time.sleep(seconds)" in stall.stack
    assert 0.2 <= stall.stall_seconds < 1.0
    assert stall.inflight_request_ids == ["req-a", "req-b"]
    recovered = captured.named("event loop recovered")
    assert len(recovered) == 1 and recovered[0].created > stall.created
    assert recovered[0].stall_seconds >= 0.9
    assert heartbeat.stats().stalls == 1
    assert heartbeat.stats().max_lag_seconds >= 0.9
    exposition = generate_latest(registry).decode()
    assert "offload_loop_stalls_total 1.0" in exposition
    assert "offload_loop_lag_seconds_bucket" in exposition


def test_watchdog_survives_a_failing_inflight_callable():
    def broken():
        raise RuntimeError("mutated during iteration")

    captured = Captured()
    logger = logging.getLogger("offload.heartbeat")
    logger.addHandler(captured)
    old_level = logger.level
    logger.setLevel(logging.INFO)

    async def scenario():
        heartbeat = Heartbeat(interval=0.02, stall_threshold=0.2, inflight=broken, registry=CollectorRegistry())
        heartbeat.start()
        a_distinctively_named_blocking_call(0.6)
        await _until(lambda: captured.named("event loop recovered"), 2)
        await heartbeat.stop()

    try:
        asyncio.run(scenario())
    finally:
        logger.removeHandler(captured)
        logger.setLevel(old_level)
    stalls = captured.named("event loop stalled")
    assert len(stalls) == 1, [vars(r) for r in stalls]
    assert stalls[0].inflight_request_ids == []
    assert "a_distinctively_named_blocking_call" in stalls[0].stack


def test_compute_watchdog_end_to_end(compute_factory):
    compute = compute_factory(pool_size=1, stall_threshold=0.3)
    testing = testing_pb2_grpc.TestingServiceStub(compute.channel())
    testing.Block(testing_pb2.BlockRequest(seconds=1.5), metadata=[("x-request-id", "blocker-42")], timeout=10)

    def stalled():
        return [r for r in compute.log_records() if r.get("msg") == "event loop stalled"]

    wait_until(lambda: stalled(), 5, message="the stall warning")
    [warning] = stalled()
    assert warning["process"] == "compute" and warning["level"] == "warning"
    assert "block_the_loop_on_purpose" in warning["stack"]
    assert "blocker-42" in warning["inflight_request_ids"]
    assert warning["stall_seconds"] >= 0.3
    wait_until(
        lambda: any(r.get("msg") == "event loop recovered" for r in compute.log_records()), 5, message="recovery"
    )

    stats = compute_pb2_grpc.ComputeServiceStub(compute.channel()).GetStats(compute_pb2.GetStatsRequest(), timeout=2)
    assert stats.loop.stalls >= 1
    assert stats.loop.max_lag_seconds >= 1.0

    [ready] = [r for r in compute.log_records() if r.get("msg") == "compute ready"]
    with urllib.request.urlopen(f"http://127.0.0.1:{ready['metrics_port']}/metrics", timeout=5) as response:
        metrics = response.read().decode()
    assert "offload_loop_lag_seconds_bucket" in metrics
    stall_lines = [line for line in metrics.splitlines() if line.startswith("offload_loop_stalls_total ")]
    assert stall_lines and float(stall_lines[0].split()[1]) >= 1
    assert 'offload_compute_calls_total{code="OK",method="Block"} 1.0' in metrics


def test_asyncio_debug_switch_logs_the_slow_callback(compute_factory):
    """OFFLOAD_COMPUTE_ASYNCIO_DEBUG: the callback that held the loop is named in compute's own
    JSON log (the asyncio logger through our formatter), even below the stall threshold."""
    compute = compute_factory(pool_size=1, asyncio_debug=True, slow_callback_seconds=0.1)
    testing = testing_pb2_grpc.TestingServiceStub(compute.channel())
    testing.Block(testing_pb2.BlockRequest(seconds=0.3), timeout=10)  # below the 0.5 s stall threshold

    def blocks() -> list[dict]:
        """Slow-callback warnings of at least the Block's 0.3 s (start-up may log shorter ones)."""
        return [
            r for r in compute.log_records()
            if r.get("logger") == "asyncio" and r["msg"].startswith("Executing ")
            and float(r["msg"].rsplit(" took ", 1)[-1].split()[0]) >= 0.3
        ]

    wait_until(blocks, 10, message="the Block's slow-callback warning in compute's log")
    record = blocks()[0]
    assert record["level"] == "warning" and record["process"] == "compute"
    assert [r for r in compute.log_records() if r["msg"].startswith("asyncio debug mode on")]


def test_asyncio_debug_is_off_by_default(compute):
    testing = testing_pb2_grpc.TestingServiceStub(compute.channel())
    testing.Block(testing_pb2.BlockRequest(seconds=0.2), timeout=10)
    compute.stop()
    assert not [r for r in compute.log_records() if r.get("logger") == "asyncio"]
