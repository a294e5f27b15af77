"""Real processes' log lines: JSON when piped (the default), console key=value when asked, and
never an ANSI code or uvicorn's color_message in either (stderr is not a terminal here)."""

from __future__ import annotations

import json

from offload.testing.v1 import testing_pb2, testing_pb2_grpc
from tests.conftest import wait_until


def test_piped_gateway_logs_json_without_color_message(shared_compute, gateway_factory):
    gateway = gateway_factory(shared_compute.address, workers=1)
    wait_until(lambda: "Started server process" in gateway.log_text(), 10, message="uvicorn's start-up line")
    text = gateway.log_text()
    assert "\x1b" not in text and "\\u001b" not in text and "color_message" not in text
    lines = [json.loads(line) for line in text.splitlines()]  # every line JSON: gunicorn's and uvicorn's too
    assert any(r["logger"] == "uvicorn.error" and "Started server process" in r["msg"] for r in lines)
    assert any(r["logger"] == "gunicorn.error" and r["msg"].startswith("Listening at: http://127.0.0.1:") for r in lines)


def test_console_form_in_both_processes_and_pool_workers(compute_factory, gateway_factory):
    compute = compute_factory(pool_size=1, log_format="console")
    testing_pb2_grpc.TestingServiceStub(compute.channel()).Spin(
        testing_pb2.SpinRequest(seconds=0), metadata=[("x-request-id", "console-1")], timeout=10
    )
    gateway = gateway_factory(compute.address, workers=1, log_format="console")
    wait_until(lambda: "Started server process" in gateway.log_text(), 10, message="uvicorn's start-up line")
    compute.stop()
    gateway.stop()

    for text in (compute.log_text(), gateway.log_text()):
        assert "\x1b" not in text and "color_message" not in text
        assert not [line for line in text.splitlines() if line.startswith("{")], "no JSON line"
    [spin] = [line for line in compute.log_text().splitlines() if "spin started" in line]
    assert "compute-worker[" in spin and "request_id=console-1" in spin.split() and "seconds=0.0" in spin.split()
    ready = next(line for line in compute.log_text().splitlines() if "compute ready" in line)
    assert " info " in ready and "compute.server" in ready and "address=unix:" in ready
