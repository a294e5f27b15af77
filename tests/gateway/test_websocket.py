"""Server streams over WebSocket, against a real compute and a real multi-worker gateway, with
a real client (the `websockets` library) and, for keepalive and slow readers, a raw socket.

Covers: the same JSON as SSE, resume after a sequence, close codes from the gRPC status, a
closed socket cancelling the stream in compute but not the job, ping/pong keepalive, a slow
reader dropped with bounded memory, and the allowed-origins check.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import struct
import time
from typing import Callable, Iterator

import httpx
import psutil
import pytest
import websockets

from offload.v1 import jobs_pb2
from tests.conftest import ROOT, ComputeLauncher, ComputeProcess, metric_sample, wait_until
from tests.gateway.conftest import GatewayLauncher, GatewayProcess
from tests.jobs.helpers import TERMINAL, submit_ids, wait_state


def ws_url(gateway, path: str) -> str:
    return gateway.url.replace("http://", "ws://") + path


async def read_all(url: str, **kwargs) -> tuple[list[dict], int, str]:
    """Every message until the server closes: (messages, close code, close reason)."""
    messages = []
    async with websockets.connect(url, **kwargs) as ws:
        try:
            while True:
                messages.append(json.loads(await ws.recv()))
        except websockets.ConnectionClosed:
            pass
        return messages, ws.close_code, ws.close_reason


def handshake_error(url: str, **kwargs) -> tuple[int, dict]:
    async def run():
        try:
            async with websockets.connect(url, **kwargs):
                pass
        except websockets.InvalidStatus as exc:
            return exc.response.status_code, json.loads(bytes(exc.response.body))
        raise AssertionError("the handshake was accepted")

    return asyncio.run(run())


@pytest.fixture(scope="module")
def ws_stack(tmp_path_factory) -> Iterator[tuple[ComputeProcess, GatewayProcess]]:
    workdir = tmp_path_factory.mktemp("ws")
    computes, gateways = ComputeLauncher(workdir), GatewayLauncher(workdir)
    try:
        compute = computes(rows=2000, dim=16, jobs_chunk_queries=8, jobs_max_queries=500)
        yield compute, gateways(compute.address, ws_allowed_origins=["https://app.example"])
    finally:
        gateways.close()
        computes.close()


@pytest.fixture
def gateway_with(ws_stack, gateway_factory) -> Callable[..., GatewayProcess]:
    """A gateway of its own, with these settings, on the module's compute."""
    return lambda **settings: gateway_factory(ws_stack[0].address, **settings)


def test_stream_messages_are_the_sse_data_and_end_with_1000(ws_stack):
    _, gateway = ws_stack
    messages, code, _ = asyncio.run(read_all(ws_url(gateway, "/v1/testing/ticks/4?interval_ms=5")))
    assert [m["index"] for m in messages] == [1, 2, 3, 4]
    assert code == 1000
    sse = httpx.get(gateway.url + "/v1/testing/ticks/4", timeout=10).text
    data = [json.loads(line[len("data: "):]) for line in sse.splitlines() if line.startswith("data: ")]
    assert data == messages


def test_job_watch_resumes_after_a_sequence(ws_stack):
    compute, gateway = ws_stack
    job = submit_ids(compute, [f"item-{i}" for i in range(0, 2000, 5)], k=3)  # 400 queries, 50 chunks
    events, code, _ = asyncio.run(read_all(ws_url(gateway, f"/v1/jobs/{job.id}/events")))
    assert code == 1000
    sequences = [int(e["sequence"]) for e in events]
    assert sequences == sorted(sequences) and len(set(sequences)) == len(sequences)
    assert events[-1]["job"]["state"] == "SUCCEEDED"

    # Resuming after any event gives only what followed it (here: the terminal state).
    resumed, code, _ = asyncio.run(read_all(ws_url(gateway, f"/v1/jobs/{job.id}/events?after_sequence={sequences[0]}")))
    assert code == 1000 and resumed and all(int(e["sequence"]) > sequences[0] for e in resumed)
    assert resumed[-1]["job"]["state"] == "SUCCEEDED"
    # The SSE header works on a WebSocket too (for clients that can set headers).
    last = sequences[-1]
    resumed, code, _ = asyncio.run(read_all(ws_url(gateway, f"/v1/jobs/{job.id}/events"),
                                            additional_headers={"Last-Event-ID": str(last - 1)}))
    assert [int(e["sequence"]) for e in resumed] == [last] and code == 1000


def test_failures_close_with_4000_plus_the_grpc_code(ws_stack):
    _, gateway = ws_stack
    messages, code, reason = asyncio.run(read_all(ws_url(gateway, "/v1/jobs/no-such-job/events")))
    assert (code, reason) == (4005, "NOT_FOUND")
    assert messages[-1]["error"]["status"] == "NOT_FOUND" and messages[-1]["error"]["request_id"]

    # The deadline passes mid-stream: the ticks sent stay, then 4004.
    messages, code, reason = asyncio.run(read_all(ws_url(gateway, "/v1/testing/ticks/100?interval_ms=200"),
                                                  additional_headers={"X-Request-Timeout": "0.5"}))
    assert (code, reason) == (4004, "DEADLINE_EXCEEDED")
    assert messages[0]["index"] == 1 and messages[-1]["error"]["status"] == "DEADLINE_EXCEEDED"


def test_bad_requests_are_refused_at_the_handshake(ws_stack):
    _, gateway = ws_stack
    status, body = handshake_error(ws_url(gateway, "/v1/testing/ticks/not-a-number"))
    assert status == 400 and body["error"]["status"] == "INVALID_ARGUMENT"
    status, body = handshake_error(ws_url(gateway, "/v1/items/item-1"))  # unary: no stream there
    assert status == 404
    status, body = handshake_error(ws_url(gateway, "/v1/testing/ticks/2"), additional_headers={"X-Request-Timeout": "9999999"})
    assert status == 400


def test_allowed_origins(ws_stack):
    _, gateway = ws_stack
    status, body = handshake_error(ws_url(gateway, "/v1/testing/ticks/1"), origin="https://evil.example")
    assert status == 403 and body["error"]["status"] == "PERMISSION_DENIED"
    for origin in ("https://app.example", gateway.url):  # listed, and same-origin
        messages, code, _ = asyncio.run(read_all(ws_url(gateway, "/v1/testing/ticks/1"), origin=origin))
        assert ([m["index"] for m in messages], code) == ([1], 1000)


def test_closing_the_socket_cancels_the_stream_not_the_job(compute_factory, gateway_factory):
    # Chunks slow enough (~0.1 s each) that the job outlives the socket.
    compute = compute_factory(rows=200_000, dim=32, search_chunk_rows=4096, jobs_chunk_queries=8, pool_size=1)
    gateway = gateway_factory(compute.address, workers=1)
    job = submit_ids(compute, [f"item-{i}" for i in range(0, 200_000, 2000)], k=3)  # 100 queries, 13 chunks

    async def watch_then_close() -> dict:
        async with websockets.connect(ws_url(gateway, f"/v1/jobs/{job.id}/events")) as ws:
            first = json.loads(await ws.recv())
        return first

    def cancelled_watches() -> float:
        return metric_sample(compute.metrics_text(), "offload_compute_calls_total", method="WatchJob", code="CANCELLED")

    before = cancelled_watches()
    first = asyncio.run(watch_then_close())
    assert first["job"]["state"] in ("QUEUED", "RUNNING")
    wait_until(lambda: cancelled_watches() == before + 1, 10, 0.05, "compute saw the watch cancelled")
    final = wait_state(compute, job.id, TERMINAL, timeout=60)
    assert final.state == jobs_pb2.SUCCEEDED  # the job never noticed


# -- raw-socket peers: a client that never answers pings, one that never reads --------------------


def raw_handshake(port: int, path: str, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    response = b""
    while b"\r\n\r\n" not in response:
        response += sock.recv(1)
    assert response.startswith(b"HTTP/1.1 101"), response
    return sock


def read_frame(sock: socket.socket) -> tuple[int, bytes]:
    """(opcode, payload) of one unmasked server frame."""
    def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            part = sock.recv(n - len(data))
            if not part:
                raise ConnectionError("closed")
            data += part
        return data

    first, second = exactly(2)
    length = second & 0x7F
    if length == 126:
        length = struct.unpack("!H", exactly(2))[0]
    elif length == 127:
        length = struct.unpack("!Q", exactly(8))[0]
    return first & 0x0F, exactly(length)


def test_keepalive_pings_and_a_silent_peer_is_closed_1011(gateway_with):
    gateway = gateway_with(ws_ping_interval_seconds=0.3, ws_ping_timeout_seconds=0.5)

    # A real client answers the pings by itself: an idle stream stays open well past the timeout.
    async def idle_client() -> list[dict]:
        async with websockets.connect(ws_url(gateway, "/v1/testing/ticks/2?interval_ms=1500"), ping_interval=None) as ws:
            return [json.loads(await ws.recv())["index"], json.loads(await ws.recv())["index"]]

    assert asyncio.run(idle_client()) == [1, 2]

    # A peer that never answers is closed with 1011 after interval + timeout.
    sock = raw_handshake(gateway.port, "/v1/testing/ticks/1?interval_ms=10000")
    sock.settimeout(5)
    started = time.monotonic()
    opcode, _ = read_frame(sock)
    assert opcode == 0x9  # ping
    opcode, payload = read_frame(sock)
    assert opcode == 0x8 and struct.unpack("!H", payload[:2])[0] == 1011
    assert time.monotonic() - started < 3
    sock.close()


def test_a_reader_that_never_reads_is_dropped_with_bounded_memory(gateway_with):
    gateway = gateway_with(workers=1, ws_send_timeout_seconds=1.0)
    [worker] = psutil.Process(gateway.proc.pid).children()  # the one worker the master forked
    rss_before = worker.memory_info().rss
    # 100k ticks of 64 KiB: 6.4 GB if anything buffered them; the client reads nothing.
    sock = raw_handshake(gateway.port, "/v1/testing/ticks/100000?pad_bytes=65536", rcvbuf=4096)
    started = time.monotonic()

    def dropped() -> bool:
        return "dropping a WebSocket reader" in gateway.log_text()

    wait_until(dropped, 20, 0.1, "the gateway dropping the stalled reader")
    elapsed = time.monotonic() - started
    growth = worker.memory_info().rss - rss_before
    sock.close()
    print(f"stalled reader dropped after {elapsed:.1f} s, worker RSS grew {growth / 2**20:.1f} MiB")
    assert growth < 64 * 2**20
    # The gateway serves on.
    assert httpx.get(gateway.url + "/v1/testing/ticks/1", timeout=10).status_code == 200


def test_the_readme_websocket_snippet_runs(ws_stack, capsys):
    """The README's "Learning that a job finished" snippet, run as written against this stack."""
    compute, gateway = ws_stack
    text = (ROOT / "README.md").read_text()
    snippet = text.split("# pip install websockets\n", 1)[1].split("```", 1)[0]
    job = submit_ids(compute, ["item-1", "item-2"], k=3)
    code = snippet.replace("PASTE-A-JOB-ID", job.id).replace("localhost:8000", f"127.0.0.1:{gateway.port}")
    exec(code, {})  # noqa: S102 - our own README
    assert "'state': 'SUCCEEDED'" in capsys.readouterr().out
