"""schemathesis, an OpenAPI-driven client, against a real gateway and compute: its CLI, as a
user runs it, with every phase (examples, coverage, fuzzing, stateful) and every check, bounded
to a few dozen examples per operation and a fixed seed. It must find nothing.

Three built-in checks run with one deliberate exclusion each (tests/gateway/schemathesis_hooks.py):
- "schema-valid request rejected" spares a 400 for a limit known only at run time or for data
  rather than shape: the vector's length must be the table's dimension (the gateway does not
  know it), a zero vector has no cosine similarity (JSON Schema cannot say "not all zeros"), a
  batch job's item_ids must name existing items, a page_token must be one the server issued; and
  FAILED_PRECONDITION (cancelling a finished job) is about the resource's state, not the request.
- "server error" spares a 504 DEADLINE_EXCEEDED for an X-Request-Timeout under a second: the
  caller's own deadline passing is the contract.
- "schema-violating request accepted" spares a request whose only violation is an unknown
  header: HTTP servers ignore headers they do not know. (It showed only when a 5e-324 s
  deadline happened not to expire first, so this check was flaky, not wrong about the API.)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from tests.conftest import ROOT, ComputeLauncher
from tests.gateway.conftest import GatewayLauncher

ST = str(Path(sys.executable).with_name("st"))


@pytest.fixture(scope="module")
def gateway_url(tmp_path_factory) -> Iterator[str]:
    """compute (a small table) and a gateway routing only offload.v1's services."""
    workdir = tmp_path_factory.mktemp("schemathesis")
    computes, gateways = ComputeLauncher(workdir), GatewayLauncher(workdir)
    try:
        compute = computes(rows=500, dim=8)
        yield gateways(compute.address, extra_proto_modules=[], workers=1).url
    finally:
        gateways.close()
        computes.close()


@pytest.mark.timeout(600)
def test_schemathesis_finds_nothing(gateway_url, tmp_path):
    env = {
        **os.environ,
        "SCHEMATHESIS_HOOKS": "tests.gateway.schemathesis_hooks",
        "PYTHONPATH": str(ROOT),
    }
    command = [
        ST, "run", f"{gateway_url}/openapi.json",
        "--checks", "all",
        # Replaced by the hooks' narrowed versions:
        "--exclude-checks", "positive_data_acceptance,not_a_server_error,negative_data_rejection",
        # LoadTable would build tables of any size it draws and swap the one the others read
        # (it has its own tests: tests/compute/test_table_swap.py).
        "--exclude-path", "/v1/table:load",
        "--max-examples", "30",
        "--request-timeout", "20",
        "--seed", "1",
        "--no-color",
    ]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=540)
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-2000:]
    summary = [line for line in result.stdout.splitlines() if " generated, " in line]
    assert summary and summary[-1].strip().endswith("passed"), result.stdout[-3000:]
    assert "Selected: 11/12" in result.stdout
