"""Starting, watching and stopping the processes of one design.

Every service runs in its own session (process group = its pid), so `stop()` can signal the
whole tree by group and then, by pid, anything that escaped it. Readiness is polled (log lines
counted per worker plus an HTTP or gRPC health check), never a fixed sleep.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable

# One BLAS thread per process everywhere (compute does the same for its pool workers), so
# every design scans with the same single-threaded kernel and nobody oversubscribes 2 cores.
BLAS_ENV = {name: "1" for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS")}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OFFLOAD_", "BENCH_"))}
    env.update(BLAS_ENV)
    env["PYTHONUNBUFFERED"] = "1"
    env["OFFLOAD_ENV_FILE"] = ""  # a developer's .env must not change what is measured
    env.update(extra)
    return env


class ServiceFailed(RuntimeError):
    pass


@dataclass
class Service:
    """One launched command (and every process it spawns)."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    ready_marker: str | None = None  # log line substring, expected `ready_count` times
    ready_count: int = 1
    http_ready: str | None = None  # URL that must answer 200
    grpc_ready: str | None = None  # target whose health Check must say SERVING
    proc: subprocess.Popen | None = None
    known_pids: set[int] = field(default_factory=set)

    @property
    def command(self) -> str:
        shown = " ".join(f"{k}={v}" for k, v in sorted(self.env.items()) if k.startswith(("OFFLOAD_", "BENCH_")))
        return f"{shown} {' '.join(self.argv)}".strip()

    def start(self) -> "Service":
        if self.proc is not None:
            raise RuntimeError(f"{self.name} already started")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.known_pids.add(self.proc.pid)
        return self

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return ""

    def _check_alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise ServiceFailed(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")

    def _marker_seen(self) -> bool:
        if self.ready_marker is None:
            return True
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return False
        return text.count(self.ready_marker) >= self.ready_count

    def _http_ok(self) -> bool:
        if self.http_ready is None:
            return True
        try:
            with urllib.request.urlopen(self.http_ready, timeout=1.0) as response:
                return response.status == 200
        except OSError:
            return False

    def _grpc_serving(self) -> bool:
        if self.grpc_ready is None:
            return True
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        with grpc.insecure_channel(self.grpc_ready) as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1.0)
            except grpc.RpcError:
                return False
            return reply.status == health_pb2.HealthCheckResponse.SERVING

    def wait_ready(self, timeout: float) -> float:
        """Poll until ready; returns the seconds it took. Raises ServiceFailed."""
        started = time.monotonic()
        deadline = started + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            if self._marker_seen() and self._http_ok() and self._grpc_serving():
                self.pids()  # remember the tree while it is whole
                return time.monotonic() - started
            time.sleep(0.05)
        raise ServiceFailed(f"{self.name} not ready after {timeout}s:\n{self.log_tail()}")

    def processes(self) -> list[psutil.Process]:
        """The launched process and all its live descendants."""
        if self.proc is None or self.proc.poll() is not None:
            return []
        try:
            root = psutil.Process(self.proc.pid)
            found = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []
        self.known_pids.update(p.pid for p in found)
        return found

    def pids(self) -> list[int]:
        return [p.pid for p in self.processes()]

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the group, wait, then SIGKILL the group and any known pid left. Idempotent."""
        if self.proc is None:
            return
        self.pids()
        pgid = self.proc.pid
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline and self._leftovers():
            time.sleep(0.05)
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for proc in self._leftovers():
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(5)

    def _leftovers(self) -> list[psutil.Process]:
        left = []
        for pid in self.known_pids:
            try:
                proc = psutil.Process(pid)
                if proc.status() != psutil.STATUS_ZOMBIE:
                    left.append(proc)
            except psutil.NoSuchProcess:
                pass
        return left


def cpu_seconds(groups: dict[str, Service | list[Service]]) -> dict[str, dict[int, float]]:
    """Per group, per pid: user+system CPU seconds so far."""
    snapshot: dict[str, dict[int, float]] = {}
    for group, services in groups.items():
        per_pid: dict[int, float] = {}
        for service in services if isinstance(services, list) else [services]:
            for proc in service.processes():
                try:
                    times = proc.cpu_times()
                    per_pid[proc.pid] = times.user + times.system
                except psutil.NoSuchProcess:
                    pass
        snapshot[group] = per_pid
    return snapshot


def cpu_delta(before: dict[str, dict[int, float]], after: dict[str, dict[int, float]]) -> dict[str, float]:
    """CPU seconds spent per group between two snapshots (a process born in between counts from 0)."""
    return {
        group: sum(value - before.get(group, {}).get(pid, 0.0) for pid, value in per_pid.items())
        for group, per_pid in after.items()
    }
