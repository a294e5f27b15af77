"""`python -m compute.client` learns compute's services by reflection: yours need no code of its own."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT


def run(address: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "compute.client", "--address", address, *args],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )


def test_list_shows_every_served_operation_and_no_plumbing(shared_compute):
    listed = run(shared_compute.address, "--list")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert "offload.v1.ComputeService.Search(SearchRequest) -> SearchResponse" in lines
    assert "offload.testing.v1.TestingService.Ticks(TicksRequest) -> stream Tick" in lines
    assert not [line for line in lines if line.startswith(("grpc.", "offload.v1.CallBatching"))]


def test_calls_any_served_rpc_by_short_or_full_name(shared_compute):
    echo = run(shared_compute.address, "Echo", '{"name": "hi", "big": "9007199254740993"}')
    assert echo.returncode == 0, echo.stderr
    assert json.loads(echo.stdout) == {"name": "hi", "big": "9007199254740993"}
    ticks = run(shared_compute.address, "offload.testing.v1.TestingService.Ticks", '{"count": 2}')
    assert ticks.returncode == 0 and ticks.stdout.splitlines() == ['{"index": 1}', '{"index": 2}']
    unknown = run(shared_compute.address, "NoSuchMethod")
    assert unknown.returncode == 1 and "compute serves no method 'NoSuchMethod'" in unknown.stderr
