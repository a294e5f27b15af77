"""Two compute replicas behind one gateway: gRPC round_robin with client-side health checking.

Module processes (every test leaves them as it found them, a stopped replica is restarted):
- `a`, `b`: two real computes on loopback TCP ports, one pool worker each;
- `gateway`: 2 workers, compute address `ipv4:127.0.0.1:<a>,127.0.0.1:<b>`.
Which replica served what is read from each compute's own /metrics (offload_compute_calls).
Load is a few client threads through the gateway, each stopping by itself after MAX_LOAD_SECONDS.
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from dataclasses import dataclass
from typing import Iterator

import httpx
import psutil
import pytest
from grpc_health.v1 import health_pb2

from gateway.client import names_one_server
from offload.client import service_config
from offload.testing.v1 import testing_pb2, testing_pb2_grpc
from tests.conftest import ComputeLauncher, ComputeProcess, kill_orphans, metric_sample, wait_until
from tests.gateway.conftest import GatewayLauncher, GatewayProcess, free_port

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
ROWS, DIM = 2000, 16
REBUILD_BACKOFF = 4.0  # a second pool crash keeps a replica NOT_SERVING (yet listening) this long
MAX_LOAD_SECONDS = 30.0


@dataclass(frozen=True)
class Replicas:
    a: ComputeProcess
    b: ComputeProcess
    gateway: GatewayProcess


@pytest.fixture(scope="module")
def replicas(tmp_path_factory) -> Iterator[Replicas]:
    workdir = tmp_path_factory.mktemp("replicas")
    computes = ComputeLauncher(workdir)
    gateways = GatewayLauncher(workdir)
    settings = dict(rows=ROWS, dim=DIM, pool_size=1, drain_grace_seconds=10, rebuild_backoff_seconds=REBUILD_BACKOFF)
    try:
        a = computes(address=f"127.0.0.1:{free_port()}", start=False, **settings).start(wait=False)
        b = computes(address=f"127.0.0.1:{free_port()}", **settings)
        a.wait_serving()
        gateway = gateways(f"ipv4:{a.address},{b.address}")  # a list of loopback addresses: plaintext is fine
        yield Replicas(a, b, gateway)
    finally:
        gateways.close()
        computes.close()


@pytest.fixture
def stack(replicas: Replicas) -> Replicas:
    """The module's replicas, both SERVING (a test that stopped one left it for this to restart)."""
    for replica in (replicas.a, replicas.b):
        if replica.proc is None or replica.proc.poll() is not None:
            replica.stop()  # closes the test's own channel to the old process
            replica.start(wait=False)
    for replica in (replicas.a, replicas.b):
        replica.wait_serving(30)
    return replicas


# -- helpers -------------------------------------------------------------------------------------


def calls(replica: ComputeProcess, *methods: str) -> float:
    """Calls of `methods` (every method if none) this replica served, any status."""
    text = replica.metrics_text()
    if not methods:
        return metric_sample(text, "offload_compute_calls_total")
    return sum(metric_sample(text, "offload_compute_calls_total", method=m) for m in methods)


def dispatches(replica: ComputeProcess) -> float:
    """Dispatch RPCs (batches) this replica received."""
    return metric_sample(replica.metrics_text(), "offload_compute_batch_calls_count")


def served_more(replica: ComputeProcess, n: int, *methods: str):
    """A predicate: `replica` served `n` more calls (of `methods`) than when this was called."""
    start = calls(replica, *methods)
    return lambda: calls(replica, *methods) >= start + n


@dataclass(frozen=True)
class Outcome:
    kind: str  # "get" (GetItem) or "search"
    started: float  # time.monotonic()
    ended: float
    status: int  # HTTP status, 0 for a transport error


class Load:
    """GetItem and Search calls through the gateway from `gets` + `searches` threads, until the
    block ends (or MAX_LOAD_SECONDS passed). `outcomes` lists every call."""

    def __init__(self, gateway: GatewayProcess, gets: int = 3, searches: int = 2) -> None:
        self.gateway = gateway
        self.outcomes: list[Outcome] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=("get",), daemon=True) for _ in range(gets)]
        self._threads += [threading.Thread(target=self._run, args=("search",), daemon=True) for _ in range(searches)]

    def __enter__(self) -> "Load":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(15)

    def _run(self, kind: str) -> None:
        rng = random.Random()
        deadline = time.monotonic() + MAX_LOAD_SECONDS
        with self.gateway.client(timeout=10) as client:
            while not self._stop.is_set() and time.monotonic() < deadline:
                started = time.monotonic()
                try:
                    if kind == "get":
                        response = client.get(f"/v1/items/item-{rng.randrange(ROWS)}")
                    else:
                        response = client.post("/v1/search", json={"vector": [rng.random() for _ in range(DIM)], "k": 5})
                    status = response.status_code
                except httpx.HTTPError:
                    status = 0
                self.outcomes.append(Outcome(kind, started, time.monotonic(), status))

    def of(self, kind: str, since: float = 0.0, until: float = float("inf")) -> list[Outcome]:
        """The calls of `kind` that started within [since, until)."""
        return [o for o in self.outcomes if o.kind == kind and since <= o.started < until]


def failed(outcomes: list[Outcome]) -> list[Outcome]:
    return [o for o in outcomes if o.status != 200]


# -- tests ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "target, one",
    [
        ("127.0.0.1:50051", True),
        ("unix:/run/offload/compute.sock", True),
        ("ipv4:10.0.0.7:50051", True),
        ("[::1]:50051", True),
        ("ipv4:127.0.0.1:50051,127.0.0.1:50052", False),
        ("ipv6:[::1]:50051,[::1]:50052", False),
        ("dns:///compute:50051", False),
        ("compute:50051", False),
    ],
)
def test_health_checking_is_on_when_the_target_may_name_replicas(target, one):
    assert names_one_server(target) is one
    config = json.loads(service_config([], 3, None if one else ""))
    assert ("healthCheckConfig" in config) is not one
    if not one:
        assert config["healthCheckConfig"] == {"serviceName": ""}


@pytest.mark.slow
def test_traffic_spreads_over_both_replicas(stack):
    """round_robin per call: plain calls (Search) and Dispatch RPCs (batched GetItem) alike."""
    a, b = stack.a, stack.b
    before = {r.address: (calls(r, "GetItem"), calls(r, "Search"), dispatches(r)) for r in (a, b)}

    def both_served() -> bool:
        return all(
            calls(r, "GetItem") >= before[r.address][0] + 50
            and calls(r, "Search") >= before[r.address][1] + 10
            and dispatches(r) > before[r.address][2]
            for r in (a, b)
        )

    with Load(stack.gateway) as load:
        wait_until(both_served, 20, 0.1, "GetItem, Search and Dispatch RPCs on both replicas")
    assert not failed(load.outcomes)
    shares = {r.address: calls(r, "GetItem", "Search") - sum(before[r.address][:2]) for r in (a, b)}
    print(f"\ncalls served per replica under load: {shares}")


@pytest.mark.slow
def test_a_killed_replica_fails_over_then_rejoins(stack):
    a, b = stack.a, stack.b
    with Load(stack.gateway) as load:
        a_served, b_served = served_more(a, 20, "GetItem", "Search"), served_more(b, 20, "GetItem", "Search")
        wait_until(lambda: a_served() and b_served(), 20, 0.1, "both replicas serving")
        # SIGKILL b (its sockets close as it dies), then what it forked (forkserver, pool worker).
        descendants = psutil.Process(b.pid).children(recursive=True)
        killed_at = time.monotonic()
        b.kill()
        dead_at = time.monotonic()  # reaped: its connections are closed
        kill_orphans(descendants)
        wait_until(served_more(a, 300, "GetItem", "Search"), 20, 0.1, "the survivor serving on")

        # Same port, new process: the gateway's channel reconnects by itself (capped backoff).
        b.stop()  # closes the test's own channel to the dead process
        restarted_at = time.monotonic()
        b.start()
        serving_at = time.monotonic()
        wait_until(lambda: calls(b, "GetItem") >= 20 and calls(b, "Search") >= 5, 15, 0.05,
                   "traffic on the restarted replica")
        spread_at = time.monotonic()

    gets, searches = load.of("get", until=restarted_at), load.of("search", until=restarted_at)
    assert gets and searches
    assert not failed(gets), "GET routes are retried on UNAVAILABLE: none may fail"
    lost = failed(searches)
    # In flight at the kill: sent before b was reaped, answered after the SIGKILL.
    in_flight = [o for o in searches if o.started <= dead_at and o.ended >= killed_at]
    assert all(o.status == 503 for o in lost), lost
    spans = [(round((o.started - killed_at) * 1e3), round((o.ended - killed_at) * 1e3)) for o in lost]
    assert len(lost) <= len(in_flight), (
        f"{len(lost)} Searches failed, {len(in_flight)} were in flight at the kill; "
        f"the failed ones' (start, end) in ms from the kill: {spans}"
    )
    assert not failed(load.of("get", since=restarted_at) + load.of("search", since=restarted_at)), "none once restarted"
    failover = max((o.ended for o in lost), default=killed_at) - killed_at
    slowest_get = max(o.ended - o.started for o in gets if o.ended >= killed_at)
    print(
        f"\nSIGKILL of one replica under load: {len(lost)} Search failed ({len(in_flight)} in flight at the kill), "
        f"0 of {len(gets)} GetItem failed (slowest after the kill {slowest_get * 1000:.0f} ms); "
        f"failover {failover * 1000:.0f} ms (kill -> last failed call answered); "
        f"restart: SERVING after {serving_at - restarted_at:.2f} s, its traffic back "
        f"{(spread_at - serving_at) * 1000:.0f} ms after that"
    )


@pytest.mark.slow
def test_a_replica_whose_health_says_not_serving_gets_no_calls(stack):
    """Client-side health checking, not connection state: b keeps listening and would answer
    GetItem (answered on its loop), but its health says NOT_SERVING while its pool waits to be
    rebuilt: the gateway sends it nothing until it says SERVING again."""
    a, b = stack.a, stack.b
    # A first pool crash is rebuilt at once; a second one within rebuild_reset_seconds waits
    # REBUILD_BACKOFF seconds, NOT_SERVING all along.
    first = b.worker_pids()
    os.kill(first[0], signal.SIGKILL)
    wait_until(lambda: b.health() == SERVING and b.worker_pids() not in ([], first), 30, 0.05, "b's pool rebuilt")
    with Load(stack.gateway) as load:
        wait_until(served_more(b, 20, "GetItem"), 20, 0.1, "b serving")
        os.kill(b.worker_pids()[0], signal.SIGKILL)
        wait_until(lambda: b.health() == NOT_SERVING, 5, 0.02, "b NOT_SERVING")
        # The health watch of each gateway worker hears it as soon as the test does: give in-flight
        # calls time to land (a's next 20 calls), then b must get none while a serves 300 more.
        wait_until(served_more(a, 20, "GetItem"), 10, 0.05, "a serving")
        settled_at = time.monotonic()
        frozen = calls(b)
        wait_until(served_more(a, 300, "GetItem", "Search"), 20, 0.05, "a serving on alone")
        assert b.health() == NOT_SERVING, f"b served again too soon for this test (REBUILD_BACKOFF={REBUILD_BACKOFF})"
        assert calls(b) == frozen, "a NOT_SERVING replica got calls"
        window_closed_at = time.monotonic()
        # Healthy again (the backoff passed, the pool rebuilt): b gets traffic again.
        wait_until(lambda: b.health() == SERVING, REBUILD_BACKOFF + 20, 0.05, "b SERVING again")
        wait_until(served_more(b, 20, "GetItem"), 15, 0.05, "traffic on b again")
    assert not failed(load.of("get")), "GetItem answered throughout"
    # A Search sent to b's rebuilding pool would fail with 503: none did.
    searches = load.of("search", since=settled_at, until=window_closed_at)
    assert searches and not failed(searches)


@pytest.mark.slow
def test_a_draining_replica_gets_no_new_calls(stack):
    """SIGTERM with a call in flight: b goes NOT_SERVING and finishes that call within its drain
    grace (10 s); meanwhile a serves everything and b gets nothing new. (The gRPC server's stop
    also sends GOAWAY, which alone keeps new calls off b: the test above is the one that needs
    client-side health checking.)"""
    a, b = stack.a, stack.b
    spins_started = sum(r.get("msg") == "spin started" for r in b.log_records())
    spin = testing_pb2_grpc.TestingServiceStub(b.channel()).Spin.future(testing_pb2.SpinRequest(seconds=4), timeout=30)
    wait_until(lambda: sum(r.get("msg") == "spin started" for r in b.log_records()) > spins_started, 10, 0.05,
               "the Spin running in b's pool")
    b.signal(signal.SIGTERM)
    wait_until(lambda: b.health() != SERVING, 5, 0.02, "b draining")
    frozen = calls(b, "GetItem", "Search")
    with Load(stack.gateway) as load:
        wait_until(served_more(a, 300, "GetItem", "Search"), 20, 0.05, "a serving alone")
        assert b.proc.poll() is None, "b still draining (its Spin is in flight)"
        assert calls(b, "GetItem", "Search") == frozen, "a draining replica got new calls"
    assert load.outcomes and not failed(load.outcomes)
    assert spin.result(timeout=20).finished, "the in-flight call completed within the drain grace"
    assert b.proc.wait(20) == 0
