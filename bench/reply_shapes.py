"""`python -m bench.reply_shapes`: what a grpc.aio RPC costs by shape, unary vs streamed reply.

The measurement behind batching only the calls compute answers on its loop (README, "The hop
is batched"): streaming each batch's results back in completion order would let heavy calls
share a batch too, but a streamed reply costs more per RPC than a unary one. This probe sends
the same 600-byte echo, one call at a time, as unary-unary, unary-stream (one reply message)
and stream-stream (one write, one reply), and reports client and server CPU per call.
Loopback unix socket only; bounded: `calls` per shape and repetition.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

SERVICE = "offload.bench.EchoShapes"
PAYLOAD = b"x" * 600


def _identity(data: bytes) -> bytes:
    return data


async def serve(address: str) -> None:
    import grpc

    async def unary(request, context):
        return request

    async def unary_stream(request, context):
        await context.write(request)

    async def stream_stream(requests, context):
        await context.write(await context.read())

    handler = grpc.method_handlers_generic_handler(SERVICE, {
        "Unary": grpc.unary_unary_rpc_method_handler(unary, _identity, _identity),
        "UnaryStream": grpc.unary_stream_rpc_method_handler(unary_stream, _identity, _identity),
        "StreamStream": grpc.stream_stream_rpc_method_handler(stream_stream, _identity, _identity),
    })
    server = grpc.aio.server()
    server.add_generic_rpc_handlers([handler])
    server.add_insecure_port(address)
    await server.start()
    await server.wait_for_termination(timeout=600)  # bounded even if the parent dies


async def measure(address: str, calls: int, reps: int, server: psutil.Process) -> list[tuple[str, float, float, float]]:
    import grpc

    channel = grpc.aio.insecure_channel(address)
    await asyncio.wait_for(channel.channel_ready(), 10)
    unary = channel.unary_unary(f"/{SERVICE}/Unary", _identity, _identity)
    unary_stream = channel.unary_stream(f"/{SERVICE}/UnaryStream", _identity, _identity)
    stream_stream = channel.stream_stream(f"/{SERVICE}/StreamStream", _identity, _identity)

    async def drain(call) -> None:
        while await call.read() is not grpc.aio.EOF:
            pass

    async def one_unary() -> None:
        await unary(PAYLOAD, timeout=5)

    async def one_unary_stream() -> None:
        await drain(unary_stream(PAYLOAD, timeout=5))

    async def one_stream_stream() -> None:
        call = stream_stream(timeout=5)
        await call.write(PAYLOAD)
        await drain(call)

    shapes = [("unary reply", one_unary), ("server-streamed reply", one_unary_stream), ("bidi stream", one_stream_stream)]
    rows = []
    for _ in range(reps):  # interleaved repetitions: the machine's noise hits every shape alike
        for name, one in shapes:
            for _ in range(100):
                await one()
            server_before = sum(server.cpu_times()[:2])
            client_before = time.process_time()
            started = time.perf_counter()
            for _ in range(calls):
                await one()
            elapsed = time.perf_counter() - started
            client = (time.process_time() - client_before) / calls
            server_cpu = (sum(server.cpu_times()[:2]) - server_before) / calls
            rows.append((name, calls / elapsed, 1e6 * client, 1e6 * server_cpu))
    await channel.close()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.reply_shapes", description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=3000, help="calls per shape and repetition")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--serve", help=argparse.SUPPRESS)  # the server side (a child process)
    args = parser.parse_args(argv)
    import uvloop

    if args.serve:
        uvloop.run(serve(args.serve))
        return 0
    with tempfile.TemporaryDirectory(prefix="offload-shapes-") as tmp:
        address = f"unix:{Path(tmp) / 'echo.sock'}"
        child = subprocess.Popen([sys.executable, "-m", "bench.reply_shapes", "--serve", address])
        try:
            rows = uvloop.run(measure(address, args.calls, args.reps, psutil.Process(child.pid)))
        finally:
            child.terminate()
            child.wait(10)
    print("| shape (one call at a time) | calls/s | client CPU µs/call | server CPU µs/call |")
    print("|---|---|---|---|")
    for name, rate, client, server in rows:
        print(f"| {name} | {rate:,.0f} | {client:.0f} | {server:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
