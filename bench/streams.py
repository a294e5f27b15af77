"""`python -m bench.streams`: server-streaming messages/s through one gateway worker, as
WebSocket and as Server-Sent Events, against the same stream read over direct gRPC.

The stream is the testing service's `Ticks` (tests/operations_testing.py: compute yields as
fast as it can), each message padded to about the size of a JobEvent's JSON. One reader at a
time; the gateway runs one worker, so its figure is what one worker forwards. `make bench`
runs it too (the "Streams" section of the report).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import grpc
import httpx
import websockets

from bench.designs import Table, offload
from bench.procs import cpu_delta, cpu_seconds

PAD_BYTES = 256  # a JobEvent's JSON is ~300-500 bytes
TESTING = {
    "OFFLOAD_COMPUTE_EXTRA_OPERATION_MODULES": "tests.operations_testing",
}
TESTING_GATEWAY = {"OFFLOAD_GATEWAY_EXTRA_PROTO_MODULES": "offload.testing.v1.testing_pb2"}


async def _websocket(url: str) -> int:
    count = 0
    async with websockets.connect(url, max_size=None) as ws:
        async for _ in ws:
            count += 1
    return count


async def _sse(url: str) -> int:
    count = 0
    async with httpx.AsyncClient(timeout=60) as client:
        async with client.stream("GET", url) as response:
            async for line in response.aiter_lines():
                if line.startswith("data:"):
                    count += 1
    return count


async def _grpc(target: str, messages: int) -> int:
    from offload.testing.v1 import testing_pb2, testing_pb2_grpc

    async with grpc.aio.insecure_channel(target) as channel:
        stub = testing_pb2_grpc.TestingServiceStub(channel)
        count = 0
        async for _ in stub.Ticks(testing_pb2.TicksRequest(count=messages, pad_bytes=PAD_BYTES)):
            count += 1
    return count


def measure(logdir: Path, messages: int = 20_000, reps: int = 3, log=print) -> dict:
    """Messages/s and gateway CPU µs per message, median of `reps`, per transport."""
    deployment = offload(Table(2000, 16), 1, 1, logdir, compute_env=TESTING, variant="streams")
    deployment.groups["gateway"].env.update(TESTING_GATEWAY)
    deployment.start(60)
    try:
        path = f"/v1/testing/ticks/{messages}?pad_bytes={PAD_BYTES}"
        readers = {
            "websocket": lambda: _websocket(f"ws://127.0.0.1:{deployment.port}{path}"),
            "sse": lambda: _sse(f"{deployment.url}{path}"),
            "grpc-direct": lambda: _grpc(deployment.grpc_target, messages),
        }
        out: dict = {"messages": messages, "pad_bytes": PAD_BYTES, "gateway_workers": 1}
        for name, read in readers.items():
            rates, cpu = [], []
            for _ in range(reps):
                before = cpu_seconds(deployment.groups)
                started = time.perf_counter()
                count = asyncio.run(read())
                elapsed = time.perf_counter() - started
                spent = cpu_delta(before, cpu_seconds(deployment.groups))
                if count != messages:
                    raise RuntimeError(f"{name}: read {count} of {messages} messages")
                rates.append(messages / elapsed)
                cpu.append(spent.get("gateway", 0.0) * 1e6 / messages)
            out[name] = {"messages_per_s": sorted(rates)[len(rates) // 2], "all": [round(r) for r in rates],
                         "gateway_cpu_us_per_message": sorted(cpu)[len(cpu) // 2]}
            log(f"  streams: {name}: {out[name]['messages_per_s']:.0f} messages/s "
                f"(gateway {out[name]['gateway_cpu_us_per_message']:.0f} µs CPU per message)")
        return out
    finally:
        deployment.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.streams", description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="offload-streams-") as logdir:
        print(json.dumps(measure(Path(logdir), args.messages, args.reps), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
