"""Gateway fixtures: a real `python -m gateway` (multi-worker uvicorn) on a free loopback port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from tests.conftest import ROOT, ComputeLauncher, clean_env, wait_until, terminate

TEST_PROTO_MODULES = ["offload.testing.v1.testing_pb2"]  # routed on top of the built-in protos


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class GatewayProcess:
    env: dict[str, str]
    port: int
    log_path: Path
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kwargs.pop("timeout", 10), **kwargs)

    def start(self, wait_ready: bool = True, timeout: float = 30) -> "GatewayProcess":
        log_file = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway"], cwd=ROOT, env=self.env, stdout=log_file, stderr=subprocess.STDOUT
        )
        log_file.close()
        self.wait_status("/healthz", 200, timeout)
        if wait_ready:
            self.wait_status("/readyz", 200, timeout)
        return self

    def status(self, path: str) -> int | None:
        try:
            return httpx.get(self.url + path, timeout=2).status_code
        except httpx.HTTPError:
            return None

    def wait_status(self, path: str, expected: int, timeout: float = 30) -> None:
        def check() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"gateway exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}")
            return self.status(path) == expected

        wait_until(check, timeout, 0.05, f"gateway {path} == {expected}")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 20) -> int:
        """SIGTERM and wait; idempotent."""
        return terminate(self.proc, timeout)


class GatewayLauncher:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.made: list[GatewayProcess] = []

    def __call__(self, compute_address: str, start: bool = True, wait_ready: bool = True, **settings) -> GatewayProcess:
        port = free_port()
        values = {
            "compute_address": compute_address,
            "host": "127.0.0.1",
            "port": port,
            "workers": 2,
            "extra_proto_modules": TEST_PROTO_MODULES,
            "graceful_shutdown_seconds": 3,
        }
        values.update(settings)
        env = clean_env(**{f"OFFLOAD_GATEWAY_{key.upper()}": value for key, value in values.items()})
        process = GatewayProcess(env, port, self.workdir / f"gateway-{len(self.made)}.log")
        self.made.append(process)
        return process.start(wait_ready=wait_ready) if start else process

    def close(self) -> None:
        for process in self.made:
            process.stop()


@pytest.fixture
def gateway_factory(tmp_path: Path) -> Iterator[GatewayLauncher]:
    """Make gateway processes: `gateway_factory(compute.address, workers=2, ...)`."""
    launcher = GatewayLauncher(tmp_path)
    yield launcher
    launcher.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[tuple[object, GatewayProcess]]:
    """(compute, gateway) shared by a module's tests that leave both as they found them."""
    workdir = tmp_path_factory.mktemp("stack")
    computes = ComputeLauncher(workdir)
    gateways = GatewayLauncher(workdir)
    try:
        compute = computes()
        gateway = gateways(compute.address)
        yield compute, gateway
    finally:
        gateways.close()
        computes.close()


@pytest.fixture(scope="module")
def http(stack) -> Iterator[httpx.Client]:
    with stack[1].client() as client:
        yield client
