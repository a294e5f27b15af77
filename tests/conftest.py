"""Shared fixtures: real compute processes on temp unix sockets, ready when health says so."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from offload.memory import is_resource_tracker
from tests import leftovers

ROOT = Path(__file__).resolve().parents[1]
TESTING_MODULES = ["tests.operations_testing"]  # served on top of the built-in operations


def clean_env(**settings: object) -> dict[str, str]:
    """This environment without any OFFLOAD_* variable and without the developer's `.env`,
    plus `settings` (full variable names; lists and dicts as JSON)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OFFLOAD_") and k != "PROMETHEUS_MULTIPROC_DIR"}
    env["OFFLOAD_ENV_FILE"] = ""
    for key, value in settings.items():
        env[key] = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return env


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.02, message: str = "") -> None:
    """Poll a readiness condition (never a fixed sleep); fail with `message` on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {message or predicate}")


def terminate(proc: subprocess.Popen | None, timeout: float) -> int:
    """SIGTERM a process we started and wait (SIGKILL after `timeout`); its exit code. Idempotent."""
    if proc is None or proc.poll() is not None:
        return proc.returncode if proc else 0
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(5)


class Captured(logging.Handler):
    """Log records kept in memory, for tests of what a component logs in this process."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def named(self, msg: str) -> list[logging.LogRecord]:
        return [r for r in self.records if r.getMessage() == msg]


def metric_sample(text: str, name: str, **labels: str) -> float:
    """Sum of the Prometheus samples `name` in `text` whose labels include `labels` (0 if none)."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def kill_orphans(processes: list[psutil.Process]) -> None:
    """A SIGKILLed compute leaves its forkserver and pool workers behind: a test must not leak them.

    Its multiprocessing resource tracker is spared: it unlinks the pool's semaphores once the
    other processes are gone, and exits. Killed with them, it would leave those in /dev/shm.
    """
    for proc in processes:
        try:
            if not is_resource_tracker(proc.pid):
                proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(processes, timeout=5)


def pytest_sessionstart(session: pytest.Session) -> None:
    leftovers.snapshot()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run if this session's processes left anything in /dev/shm (after every fixture,
    module-scoped ones included, has stopped its processes)."""
    left = leftovers.wait_gone()
    if left:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        message = f"left in {leftovers.SHM} by this test session: {', '.join(left)}"
        if reporter is not None:
            reporter.ensure_newline()
            reporter.write_line(message, red=True, bold=True)
        else:
            print(message, file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@dataclass
class ComputeProcess:
    """A real `python -m compute`, started by a test. Stop it with stop()/kill()."""

    env: dict[str, str]
    address: str
    shm_dir: Path
    log_path: Path
    proc: subprocess.Popen | None = None
    _channel: grpc.Channel | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, wait: bool = True, timeout: float = 60) -> "ComputeProcess":
        log_file = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "compute"], cwd=ROOT, env=self.env, stdout=log_file, stderr=subprocess.STDOUT
        )
        log_file.close()
        leftovers.record_pids([self.proc.pid])
        if wait:
            self.wait_serving(timeout)
        return self

    def channel(self) -> grpc.Channel:
        if self._channel is None:
            self._channel = grpc.insecure_channel(self.address)
        return self._channel

    def health(self, service: str = "") -> int | None:
        """SERVING/NOT_SERVING, or None when compute does not answer."""
        try:
            stub = health_pb2_grpc.HealthStub(self.channel())
            return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=0.5).status
        except grpc.RpcError:
            return None

    def wait_serving(self, timeout: float = 60) -> None:
        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"compute exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}")
            return self.health() == health_pb2.HealthCheckResponse.SERVING

        wait_until(ready, timeout, 0.05, "compute SERVING")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def metrics_text(self) -> str:
        """compute's own /metrics (its port is in the "compute ready" log line)."""
        import httpx

        ready = [r for r in self.log_records() if r.get("msg") == "compute ready"][-1]
        return httpx.get(f"http://127.0.0.1:{ready['metrics_port']}/metrics", timeout=5).text

    def log_records(self) -> list[dict]:
        records = []
        for line in self.log_text().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                pass
        return records

    def worker_pids(self) -> list[int]:
        """Pool workers: the children of compute's forkserver."""
        workers = []
        for child in psutil.Process(self.pid).children():
            try:
                if "forkserver" in " ".join(child.cmdline()):
                    workers.extend(p.pid for p in child.children())
            except psutil.NoSuchProcess:
                pass
        return sorted(workers)

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM and wait; returns the exit code. Idempotent."""
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        return terminate(self.proc, timeout)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)


class ComputeLauncher:
    """Makes compute processes; `close()` stops them and removes their shm directories."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.made: list[ComputeProcess] = []
        self.shm_dirs: list[Path] = []

    def __call__(self, start: bool = True, **settings) -> ComputeProcess:
        shm_dir = Path(tempfile.mkdtemp(prefix="offload-test-", dir="/dev/shm"))
        leftovers.record_dir(shm_dir)
        self.shm_dirs.append(shm_dir)
        socket = self.workdir / f"compute-{uuid.uuid4().hex[:8]}.sock"
        defaults = {
            "address": f"unix:{socket}",
            "metrics_port": 0,
            "rows": 2000,
            "dim": 16,
            "pool_size": 2,
            "shm_dir": str(shm_dir),
            "extra_operation_modules": TESTING_MODULES,
            "drain_grace_seconds": 5,
            "jobs_db_path": str(self.workdir / f"jobs-{socket.stem}.sqlite3"),
        }
        defaults.update(settings)
        env = clean_env(**{f"OFFLOAD_COMPUTE_{key.upper()}": value for key, value in defaults.items()})
        process = ComputeProcess(env, defaults["address"], shm_dir, self.workdir / f"compute-{len(self.made)}.log")
        self.made.append(process)
        return process.start() if start else process

    def close(self) -> None:
        for process in self.made:
            process.stop()
        for shm_dir in self.shm_dirs:
            shutil.rmtree(shm_dir, ignore_errors=True)


@pytest.fixture
def compute_factory(tmp_path: Path) -> Iterator[ComputeLauncher]:
    """Make compute processes: `compute_factory(rows=2000, dim=16, pool_size=1, ...)`.

    Keyword arguments become OFFLOAD_COMPUTE_* settings. Each process gets its own unix
    socket and its own shared-memory directory under /dev/shm (removed afterwards).
    Use it for tests that kill, stall or reconfigure compute.
    """
    launcher = ComputeLauncher(tmp_path)
    yield launcher
    launcher.close()


@pytest.fixture
def compute(compute_factory) -> ComputeProcess:
    """A fresh small compute (2000 x 16, 2 workers) serving ComputeService and TestingService."""
    return compute_factory()


@pytest.fixture(scope="module")
def shared_compute(tmp_path_factory) -> Iterator[ComputeProcess]:
    """Like `compute`, shared by a module's tests: only for tests that leave it as they found it."""
    launcher = ComputeLauncher(tmp_path_factory.mktemp("compute"))
    yield launcher()
    launcher.close()
