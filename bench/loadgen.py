"""A small load generator, run in its own process: `python -m bench.loadgen '<json config>'`.

Modes:
- closed: `connections` clients, each sends its next request when the previous one answered.
- open: requests are *scheduled* at a fixed offered `rate` whatever the server does; latency is
  measured from the scheduled send time, so time spent waiting for a free connection or in a
  server queue is counted (no coordinated omission). Up to `connections` sockets are opened.

Request classes are mixed by weight (e.g. 95% GetItem with random ids, 5% Search with random
vectors), or, closed loop, each class gets its own `connections` clients (e.g. 16 Search
clients saturating the pool while 1 GetItem client measures light latency); requests are pre-built bytes (HTTP/1.1 keep-alive over raw asyncio streams) so the
generator spends little CPU per request. `protocol: grpc` drives compute directly with
grpc.aio, one plain unary RPC per call; `protocol: grpc-batched` drives it through
`offload.client.ComputeChannel`, which sends the calls compute answers on its loop (GetItem)
issued within one loop iteration as one `Dispatch` RPC, as the gateway does (closed loop; the
batching policy is known before the clock starts). Both map a gRPC status to an HTTP-like one
(RESOURCE_EXHAUSTED 429, NOT_FOUND 404, ...). Everything is bounded: `warmup + duration + drain`
seconds at most.

Output on stdout: `EVENT start` / `EVENT end` when the measured window opens/closes (the
orchestrator samples server CPU there), then `RESULT <json>`: per-class counts, throughput,
latency percentiles, status codes, errors, timeouts, unfinished requests, and the generator's
own CPU time in the window.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

PREBUILT = 2048  # distinct requests per class, cycled


# -- request classes ----------------------------------------------------------------------------


@dataclass
class RequestClass:
    name: str
    kind: str  # get_item | search | hello
    weight: float
    payloads: list[Any] = field(default_factory=list)
    next_index: int = 0
    ok: list[float] = field(default_factory=list)  # latencies of 2xx answers
    rejected: list[float] = field(default_factory=list)  # latencies of 429 answers
    other: list[float] = field(default_factory=list)  # latencies of other statuses
    statuses: collections.Counter = field(default_factory=collections.Counter)
    errors: collections.Counter = field(default_factory=collections.Counter)
    timeouts: int = 0
    unfinished: int = 0
    sent: int = 0

    def payload(self) -> Any:
        value = self.payloads[self.next_index]
        self.next_index = (self.next_index + 1) % len(self.payloads)
        return value


def _random_vectors(rng: np.random.Generator, count: int, dim: int) -> list[list[float]]:
    return rng.standard_normal((count, dim), dtype=np.float32).round(6).tolist()


def build_http_payloads(cls: RequestClass, config: dict, rng: np.random.Generator) -> None:
    host = f"{config['host']}:{config['port']}"
    if cls.kind == "get_item":
        ids = rng.integers(0, config["rows"], PREBUILT)
        cls.payloads = [f"GET /v1/items/item-{i} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode() for i in ids]
    elif cls.kind == "hello":
        cls.payloads = [f"GET /hello HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()]
    elif cls.kind == "search":
        bodies = [
            json.dumps({"vector": v, "k": config.get("k", 10)}, separators=(",", ":")).encode()
            for v in _random_vectors(rng, min(PREBUILT, 256), config["dim"])
        ]
        cls.payloads = [
            b"POST /v1/search HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (host.encode(), len(body), body)
            for body in bodies
        ]
    else:
        raise ValueError(f"unknown request kind {cls.kind!r}")


def build_grpc_payloads(cls: RequestClass, config: dict, rng: np.random.Generator) -> None:
    from offload.v1 import compute_pb2, search_pb2

    if cls.kind == "get_item":
        ids = rng.integers(0, config["rows"], PREBUILT)
        cls.payloads = [("GetItem", compute_pb2.GetItemRequest(id=f"item-{i}")) for i in ids]
    elif cls.kind == "search":
        cls.payloads = [
            ("Search", search_pb2.SearchRequest(vector=v, k=config.get("k", 10)))
            for v in _random_vectors(rng, 256, config["dim"])
        ]
    else:
        raise ValueError(f"request kind {cls.kind!r} has no gRPC form")


# -- transports ---------------------------------------------------------------------------------


class HttpConnection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.reusable = True

    async def request(self, data: bytes) -> int:
        self.writer.write(data)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        lower = head.lower()
        position = lower.find(b"\r\ncontent-length:")
        if position >= 0:
            end = lower.find(b"\r\n", position + 2)
            length = int(lower[position + 17 : end])
            if length:
                await self.reader.readexactly(length)
        elif b"\r\ntransfer-encoding: chunked" in lower:
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                await self.reader.readexactly(size + 2)
                if size == 0:
                    break
        else:
            self.reusable = False  # body until close: not expected from our servers
        if b"\r\nconnection: close" in lower:
            self.reusable = False
        return status

    def close(self) -> None:
        self.writer.close()


class HttpTransport:
    """A pool of keep-alive connections; at most `max_connections` open at once."""

    def __init__(self, host: str, port: int, max_connections: int) -> None:
        self.host, self.port, self.max_connections = host, port, max_connections
        self.idle: list[HttpConnection] = []
        self.open = 0
        self.waiters: collections.deque[asyncio.Future] = collections.deque()
        self.connects = 0

    async def _acquire(self) -> HttpConnection:
        if self.idle:
            return self.idle.pop()
        if self.open < self.max_connections:
            self.open += 1
            try:
                reader, writer = await asyncio.open_connection(self.host, self.port)
            except BaseException:
                self.open -= 1
                self._slot_freed()
                raise
            self.connects += 1
            return HttpConnection(reader, writer)
        waiter = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._release(waiter.result())
            raise

    def _release(self, conn: HttpConnection) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        self.idle.append(conn)

    def _discard(self, conn: HttpConnection) -> None:
        conn.close()
        self.open -= 1
        self._slot_freed()

    def _slot_freed(self) -> None:
        """A connection slot freed up: open a fresh connection for the first live waiter."""
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                asyncio.ensure_future(self._connect_for(waiter))
                return

    async def _connect_for(self, waiter: asyncio.Future) -> None:
        self.open += 1
        try:
            reader, writer = await asyncio.open_connection(self.host, self.port)
        except BaseException as exc:
            self.open -= 1
            if not waiter.done():
                waiter.set_exception(ConnectionError(f"connect failed: {exc}"))
            return
        self.connects += 1
        conn = HttpConnection(reader, writer)
        if waiter.done():
            self._release(conn)
        else:
            waiter.set_result(conn)

    async def call(self, payload: bytes) -> int:
        conn = await self._acquire()
        try:
            status = await conn.request(payload)
        except BaseException:
            self._discard(conn)
            raise
        if conn.reusable:
            self._release(conn)
        else:
            self._discard(conn)
        return status

    async def connect(self, timeout: float) -> None:
        pass

    def stats(self, window_start: float, window_end: float) -> dict:
        return {}

    async def close(self) -> None:
        for conn in self.idle:
            conn.close()


def grpc_http_status() -> dict:
    """gRPC status -> the HTTP-like status the load generator counts (anything else: 500)."""
    import grpc

    codes = grpc.StatusCode
    return {
        codes.OK: 200,
        codes.RESOURCE_EXHAUSTED: 429,
        codes.NOT_FOUND: 404,
        codes.INVALID_ARGUMENT: 400,
        codes.UNAVAILABLE: 503,
        codes.DEADLINE_EXCEEDED: 504,
    }


class GrpcTransport:
    """Plain grpc.aio: one unary RPC per call."""

    def __init__(self, target: str, timeout: float) -> None:
        import grpc

        from offload.v1 import compute_pb2_grpc

        self.grpc = grpc
        self.channel = grpc.aio.insecure_channel(target)
        stub = compute_pb2_grpc.ComputeServiceStub(self.channel)
        self.methods = {"GetItem": stub.GetItem, "Search": stub.Search}
        self.timeout = timeout
        self.http_status = grpc_http_status()

    async def connect(self, timeout: float) -> None:
        await asyncio.wait_for(self.channel.channel_ready(), timeout)  # connect before the clock

    async def call(self, payload: tuple[str, Any]) -> int:
        method, message = payload
        try:
            await self.methods[method](message, timeout=self.timeout)
        except self.grpc.aio.AioRpcError as exc:
            return self.http_status.get(exc.code(), 500)
        return 200

    def stats(self, window_start: float, window_end: float) -> dict:
        return {}

    async def close(self) -> None:
        await self.channel.close()


class BatchedGrpcTransport:
    """`offload.client.ComputeChannel`: GetItem calls issued in one loop iteration share a
    `Dispatch` RPC (the closed-loop clients answered in one iteration send their next calls in
    the same one); Search stays plain unary. Same status mapping as GrpcTransport."""

    SERVICE = "/offload.v1.ComputeService/"

    def __init__(self, target: str, timeout: float) -> None:
        from offload.client import CallError, ComputeChannel
        from offload.v1 import compute_pb2, search_pb2

        self.CallError = CallError
        self.batches: list[tuple[float, int]] = []  # (perf_counter, calls) per Dispatch sent
        self.channel = ComputeChannel(target, observer=self)
        self.responses = {"GetItem": compute_pb2.Item, "Search": search_pb2.SearchResponse}
        self.methods: dict[str, Any] = {}
        self.timeout = timeout
        self.http_status = grpc_http_status()

    def batch_sent(self, calls: int, waited_seconds: float) -> None:  # offload.client.BatchObserver
        self.batches.append((time.perf_counter(), calls))

    async def connect(self, timeout: float) -> None:
        await self.channel.start()
        self.methods = {name: self.channel.unary(self.SERVICE + name, cls) for name, cls in self.responses.items()}
        if not await self.channel.wait_policy(timeout):
            raise RuntimeError(f"compute's batching policy not known within {timeout} s: calls would all be plain")
        if self.SERVICE + "GetItem" not in self.channel.batched_methods:
            raise RuntimeError(f"compute does not batch GetItem (policy: {sorted(self.channel.batched_methods)})")

    async def call(self, payload: tuple[str, Any]) -> int:
        method, message = payload
        try:
            await self.methods[method](message, timeout=self.timeout)
        except self.CallError as exc:
            return self.http_status.get(exc.code(), 500)
        return 200

    def stats(self, window_start: float, window_end: float) -> dict:
        inside = [calls for at, calls in self.batches if window_start <= at < window_end]
        return {
            "batched_methods": sorted(self.channel.batched_methods),
            "dispatch_rpcs": len(inside),
            "batched_calls": sum(inside),
            "calls_per_dispatch": sum(inside) / len(inside) if inside else None,
        }

    async def close(self) -> None:
        await self.channel.close()


TRANSPORTS = {"grpc": GrpcTransport, "grpc-batched": BatchedGrpcTransport}


# -- the run ------------------------------------------------------------------------------------


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"count": 0, "mean": None, "p50": None, "p90": None, "p99": None, "p999": None, "max": None}
    array = np.asarray(values) * 1000.0  # ms
    p50, p90, p99, p999 = np.percentile(array, [50, 90, 99, 99.9])
    return {
        "count": len(values),
        "mean": float(array.mean()),
        "p50": float(p50),
        "p90": float(p90),
        "p99": float(p99),
        "p999": float(p999),
        "max": float(array.max()),
    }


class Run:
    def __init__(self, config: dict) -> None:
        self.config = config
        self.rng = random.Random(config.get("seed", 1))
        nprng = np.random.default_rng(config.get("seed", 1))
        self.classes = [RequestClass(c["name"], c["kind"], float(c.get("weight", 1.0))) for c in config["classes"]]
        # Closed loop, optional: a fixed number of clients per class instead of a weighted mix.
        self.class_clients = [int(c.get("connections", 0)) for c in config["classes"]]
        build = build_grpc_payloads if config.get("protocol") in TRANSPORTS else build_http_payloads
        for cls in self.classes:
            build(cls, config, nprng)
        self.weights = [cls.weight for cls in self.classes]
        self.timeout = float(config.get("timeout", 10.0))
        self.window_start = 0.0
        self.window_end = 0.0
        self.inflight: set[asyncio.Task] = set()

    def pick(self) -> RequestClass:
        if len(self.classes) == 1:
            return self.classes[0]
        return self.rng.choices(self.classes, self.weights)[0]

    async def one(self, cls: RequestClass, scheduled: float) -> None:
        counted = self.window_start <= scheduled < self.window_end
        # Late (behind schedule, waiting for a connection): latency counts from the scheduled
        # time. Early (the scheduler wakes up to 1 ms early, timer granularity): from the send.
        origin = min(scheduled, time.perf_counter())
        if counted:
            cls.sent += 1
        try:
            async with asyncio.timeout(self.timeout):
                status = await self.transport.call(cls.payload())
        except TimeoutError:
            if counted:
                cls.timeouts += 1
            return
        except asyncio.CancelledError:
            if counted:
                cls.unfinished += 1
            raise
        except Exception as exc:  # connection refused/reset, incomplete read, ...
            if counted:
                cls.errors[type(exc).__name__] += 1
            return
        if not counted:
            return
        latency = time.perf_counter() - origin
        cls.statuses[status] += 1
        if 200 <= status < 300:
            cls.ok.append(latency)
        elif status == 429:
            cls.rejected.append(latency)
        else:
            cls.other.append(latency)

    async def closed_client(self, cls: RequestClass | None = None) -> None:
        while True:
            now = time.perf_counter()
            if now >= self.window_end:
                return
            await self.one(cls or self.pick(), now)

    async def open_scheduler(self, start: float) -> None:
        interval = 1.0 / float(self.config["rate"])
        n = 0
        while True:
            scheduled = start + n * interval
            if scheduled >= self.window_end:
                return
            delay = scheduled - time.perf_counter() - 0.001  # timers fire late by up to 1 ms
            if delay > 0:
                await asyncio.sleep(delay)
            elif n % 64 == 0:
                await asyncio.sleep(0)  # behind schedule: still let responses be read
            task = asyncio.ensure_future(self.one(self.pick(), scheduled))
            self.inflight.add(task)
            task.add_done_callback(self.inflight.discard)
            n += 1

    async def main(self) -> dict:
        config = self.config
        connections = sum(self.class_clients) or int(config.get("connections", 10))
        protocol = config.get("protocol", "http")
        if protocol in TRANSPORTS:
            self.transport = TRANSPORTS[protocol](config["grpc_target"], self.timeout)
        elif protocol == "http":
            self.transport = HttpTransport(config["host"], int(config["port"]), connections)
        else:
            raise ValueError(f"unknown protocol {protocol!r}")
        warmup, duration, drain = float(config.get("warmup", 0.5)), float(config["duration"]), float(config.get("drain", 2.0))
        await self.transport.connect(10.0)  # gRPC: connected (and batching policy known) before the clock
        start = time.perf_counter()
        self.window_start = start + warmup
        self.window_end = self.window_start + duration
        loop = asyncio.get_running_loop()
        marks: dict[str, float] = {}

        def mark(name: str) -> None:
            times = os.times()
            marks[name] = times.user + times.system
            print(f"EVENT {name}", flush=True)

        loop.call_at(loop.time() + warmup, mark, "start")
        loop.call_at(loop.time() + warmup + duration, mark, "end")
        if config["mode"] == "closed" and any(self.class_clients):
            workers = [
                asyncio.ensure_future(self.closed_client(cls))
                for cls, clients in zip(self.classes, self.class_clients)
                for _ in range(clients)
            ]
        elif config["mode"] == "closed":
            workers = [asyncio.ensure_future(self.closed_client()) for _ in range(connections)]
        else:
            workers = [asyncio.ensure_future(self.open_scheduler(start))]
        done, pending = await asyncio.wait(workers, timeout=warmup + duration + drain)
        for task in pending:
            task.cancel()
        if not pending:  # open loop: requests still in flight get the rest of the drain time
            remaining = self.window_end + drain - time.perf_counter()
            if self.inflight and remaining > 0:
                await asyncio.wait(list(self.inflight), timeout=remaining)
        leftovers = list(self.inflight) + list(pending)
        for task in leftovers:
            task.cancel()
        if leftovers:
            await asyncio.wait(leftovers, timeout=1.0)
        if "end" not in marks:
            mark("end")
        transport_stats = self.transport.stats(self.window_start, self.window_end)
        await self.transport.close()
        times = os.times()
        result = {
            "config": {k: v for k, v in config.items() if k != "classes"} | {"classes": config["classes"]},
            "duration": duration,
            "client_cpu_seconds": marks["end"] - marks["start"],
            "client_cpu_seconds_total": times.user + times.system,
            "client_cpu_percent": 100.0 * (marks["end"] - marks["start"]) / duration,
            "connects": getattr(self.transport, "connects", None),
            "transport": transport_stats,
            "classes": {},
        }
        for cls in self.classes:
            result["classes"][cls.name] = {
                "kind": cls.kind,
                "sent": cls.sent,
                "ok": len(cls.ok),
                "throughput": len(cls.ok) / duration,
                "rejected_429": len(cls.rejected),
                "other_status": len(cls.other),
                "statuses": {str(k): v for k, v in sorted(cls.statuses.items())},
                "errors": sum(cls.errors.values()),
                "error_kinds": dict(cls.errors),
                "timeouts": cls.timeouts,
                "unfinished": cls.unfinished,
                "latency_ms": _percentiles(cls.ok),
                "reject_latency_ms": _percentiles(cls.rejected),
            }
        return result


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m bench.loadgen '<json config>'", file=sys.stderr)
        return 2
    config = json.loads(argv[0])
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run
    result = runner(Run(config).main())
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
