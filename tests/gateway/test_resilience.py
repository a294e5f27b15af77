"""Real processes misbehaving: client disconnects, compute down, killed, restarted, late."""

from __future__ import annotations

import socket
import time

import orjson
import psutil

from tests.conftest import kill_orphans, wait_until


def _busy(client) -> int:
    return client.get("/v1/stats").json()["pool"]["busy"]


def test_client_disconnect_cancels_the_compute_work(compute, gateway_factory):
    gateway = gateway_factory(compute.address)
    body = orjson.dumps({"seconds": 30})
    request = (
        f"POST /v1/testing/spin HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"X-Request-ID: spin-disconnect\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    with gateway.client() as client:
        sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=5)
        try:
            sock.sendall(request)
            wait_until(lambda: _busy(client) == 1, 10, message="spin running in a pool worker")
        finally:
            sock.close()
        started = time.monotonic()
        # The spin had 30 s to go: the pool frees up only because the call was cancelled.
        wait_until(lambda: _busy(client) == 0, 10, message="spin cancelled after the client left")
        assert time.monotonic() - started < 10
    assert "client disconnected; compute call cancelled" in gateway.log_text()




def test_compute_killed_then_restarted(compute, compute_factory, gateway_factory):
    gateway = gateway_factory(compute.address)
    descendants = psutil.Process(compute.pid).children(recursive=True)
    with gateway.client() as client:
        assert client.get("/v1/items/item-1").status_code == 200
        compute.kill()
        kill_orphans(descendants)
        for path in ("/v1/items/item-1", "/v1/stats"):
            started = time.monotonic()
            response = client.get(path, headers={"X-Request-Timeout": "30"})
            assert response.status_code == 503, response.text
            assert time.monotonic() - started < 3, "fails fast, not at the deadline"
            assert response.json()["error"]["status"] == "UNAVAILABLE"
        started = time.monotonic()
        assert client.post("/v1/search", json={"vector": [1.0] * 16, "k": 1}).status_code == 503
        assert time.monotonic() - started < 3
        gateway.wait_status("/readyz", 503, timeout=10)

        # Same address, new process: the gateway notices by itself, no restart.
        compute_factory(address=compute.address)
        gateway.wait_status("/readyz", 200, timeout=20)
        wait_until(lambda: client.get("/v1/items/item-1").status_code == 200, 10, message="calls recover")
    assert gateway.proc.poll() is None


def test_gateway_started_before_compute(compute_factory, gateway_factory):
    compute = compute_factory(start=False)
    gateway = gateway_factory(compute.address, wait_ready=False)
    with gateway.client() as client:
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 503
        started = time.monotonic()
        assert client.get("/v1/items/item-1").status_code == 503
        assert time.monotonic() - started < 3
        compute.start()
        gateway.wait_status("/readyz", 200, timeout=20)
        wait_until(lambda: client.get("/v1/items/item-1").status_code == 200, 10, message="calls succeed")


def test_a_killed_gateway_worker_is_replaced_and_the_others_serve_on(compute, gateway_factory):
    """Workers are forked by gunicorn's master (gateway/prefork.py): SIGKILL one, and the
    gateway keeps answering while the master forks a replacement that serves too."""
    import signal

    gateway = gateway_factory(compute.address, workers=2)
    master = psutil.Process(gateway.proc.pid)
    wait_until(lambda: len(master.children()) == 2, 10, 0.02, "both workers forked")  # a random 0-100 ms apart
    before = {p.pid for p in master.children()}
    victim = sorted(before)[0]
    killed = psutil.Process(victim)
    killed.send_signal(signal.SIGKILL)
    psutil.wait_procs([killed], timeout=10)  # gone (reaped by the master): it accepts nothing more
    with gateway.client() as client:
        for i in range(20):  # never a failed request: the other worker takes the connections
            assert client.get(f"/v1/items/item-{i}", headers={"connection": "close"}).status_code == 200
        wait_until(lambda: len({p.pid for p in master.children()} - before) == 1 and len(master.children()) == 2,
                   20, 0.05, "a replacement worker")
        replacement = ({p.pid for p in master.children()} - before).pop()

        def ready_pids() -> set[int]:
            return {r["pid"] for r in map(orjson.loads, gateway.log_text().splitlines()) if r["msg"] == "gateway worker ready"}

        wait_until(lambda: replacement in ready_pids(), 20, 0.05, "the replacement ready")
        for _ in range(20):
            assert client.get("/v1/stats", headers={"connection": "close"}).status_code == 200
        assert master.is_running()
    assert "Worker (pid:%d) was sent SIGKILL" % victim in gateway.log_text()
