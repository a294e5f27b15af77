"""The three designs (plus a hello-world floor), each as a set of services started the usual way.

- offload: `python -m compute` (unix socket, private shm dir) then `python -m gateway`, both
  configured only through their env settings, as `make dev` runs them.
- naive-inline / naive-executor / hello: `python -m uvicorn ... --workers N --loop uvloop
  --http httptools --no-access-log`, the same serving options as the gateway.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from bench.procs import PYTHON, Service, base_env, free_port

# Counted in the logs: one line per worker once its lifespan start-up is done.
GATEWAY_READY = "gateway worker ready"
BASELINE_READY = "bench worker ready"


@dataclass
class Table:
    rows: int
    dim: int
    seed: int = 42

    @property
    def vector_bytes(self) -> int:
        return self.rows * self.dim * 4


@dataclass
class Deployment:
    design: str
    table: Table
    workers: int
    pool_size: int
    services: list[Service]
    port: int
    groups: dict[str, Service]
    grpc_target: str | None = None
    shm_dir: Path | None = None
    workdir: Path | None = None
    startup_seconds: dict[str, float] = field(default_factory=dict)
    variant: str = ""  # a non-default configuration of the design, e.g. "batching off"

    @property
    def label(self) -> str:
        if self.design == "offload":
            return f"offload (gateway {self.workers}w, pool {self.pool_size}{', ' + self.variant if self.variant else ''})"
        if self.design == "naive-executor":
            return f"naive-executor ({self.workers}w x pool {self.pool_size})"
        return f"{self.design} ({self.workers}w)"

    def start(self, timeout: float) -> "Deployment":
        try:
            for service in self.services:
                started = time.monotonic()
                service.start()
                service.wait_ready(max(5.0, timeout - (time.monotonic() - started)))
                self.startup_seconds[service.name] = round(time.monotonic() - started, 3)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Reverse order (gateway before compute). Idempotent."""
        for service in reversed(self.services):
            service.stop()
        for directory in (self.shm_dir, self.workdir):
            if directory is not None:
                shutil.rmtree(directory, ignore_errors=True)

    def processes(self) -> dict[str, list[psutil.Process]]:
        return {group: service.processes() for group, service in self.groups.items()}

    def commands(self) -> list[str]:
        return [service.command for service in self.services]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def _shm_root() -> str | None:
    return "/dev/shm" if Path("/dev/shm").is_dir() else None


def offload(
    table: Table,
    workers: int,
    pool_size: int,
    logdir: Path,
    *,
    compute: Service | None = None,
    compute_env: dict[str, str] | None = None,
    gateway_env: dict[str, str] | None = None,
    variant: str = "",
) -> Deployment:
    """compute + gateway. Pass `compute` (already running) to reuse it with another gateway;
    `compute_env` / `gateway_env` add settings or variables (a `variant` of the standard configuration)."""
    workdir = shm_dir = None
    services = []
    if compute is None:
        workdir = Path(tempfile.mkdtemp(prefix="offload-bench-"))
        shm_dir = Path(tempfile.mkdtemp(prefix="offload-bench-shm-", dir=_shm_root()))
        socket_path = workdir / "compute.sock"
        compute = Service(
            name="compute",
            argv=[PYTHON, "-m", "compute"],
            env=base_env(
                {
                    "OFFLOAD_COMPUTE_ADDRESS": f"unix:{socket_path}",
                    "OFFLOAD_COMPUTE_ROWS": str(table.rows),
                    "OFFLOAD_COMPUTE_DIM": str(table.dim),
                    "OFFLOAD_COMPUTE_SEED": str(table.seed),
                    "OFFLOAD_COMPUTE_POOL_SIZE": str(pool_size),
                    "OFFLOAD_COMPUTE_METRICS_PORT": "0",
                    "OFFLOAD_COMPUTE_SHM_DIR": str(shm_dir),
                    "OFFLOAD_COMPUTE_LOG_LEVEL": "WARNING",
                    "OFFLOAD_COMPUTE_JOBS_DB_PATH": str(workdir / "jobs.sqlite3"),  # never the repo's var/
                    **(compute_env or {}),
                }
            ),
            log_path=logdir / f"compute-p{pool_size}-{table.rows}{'-' + variant.replace(' ', '-') if variant else ''}.log",
            grpc_ready=f"unix:{socket_path}",
        )
        services.append(compute)
    target = compute.env["OFFLOAD_COMPUTE_ADDRESS"]
    port = free_port()
    gateway = Service(
        name="gateway",
        argv=[PYTHON, "-m", "gateway"],
        env=base_env(
            {
                "OFFLOAD_GATEWAY_COMPUTE_ADDRESS": target,
                "OFFLOAD_GATEWAY_PORT": str(port),
                "OFFLOAD_GATEWAY_WORKERS": str(workers),
                "OFFLOAD_GATEWAY_LOG_LEVEL": "INFO",  # the per-worker ready line is INFO
                **(gateway_env or {}),
            }
        ),
        log_path=logdir / f"gateway-w{workers}-p{pool_size}-{table.rows}-{port}.log",
        ready_marker=GATEWAY_READY,
        ready_count=workers,
        http_ready=f"http://127.0.0.1:{port}/readyz",
    )
    services.append(gateway)
    return Deployment(
        design="offload",
        table=table,
        workers=workers,
        pool_size=pool_size,
        services=services,
        port=port,
        groups={"gateway": gateway, "compute": compute},
        grpc_target=target,
        shm_dir=shm_dir,
        workdir=workdir,
        variant=variant,
    )


def _uvicorn(app: str, name: str, workers: int, port: int, env: dict[str, str], log_path: Path) -> Service:
    return Service(
        name=name,
        argv=[
            PYTHON, "-m", "uvicorn", app, "--factory", "--host", "127.0.0.1", "--port", str(port),
            "--workers", str(workers), "--loop", "uvloop", "--http", "httptools", "--no-access-log",
            "--log-level", "warning", "--timeout-graceful-shutdown", "3",
        ],
        env=base_env(env),
        log_path=log_path,
        ready_marker=BASELINE_READY,
        ready_count=workers,
        http_ready=f"http://127.0.0.1:{port}/readyz",
    )


def naive(mode: str, table: Table, workers: int, pool_size: int, logdir: Path) -> Deployment:
    """mode: 'inline' or 'executor'."""
    port = free_port()
    env = {"BENCH_ROWS": str(table.rows), "BENCH_DIM": str(table.dim), "BENCH_SEED": str(table.seed)}
    if mode == "executor":
        env["BENCH_POOL_SIZE"] = str(pool_size)
    design = f"naive-{mode}"
    service = _uvicorn(
        f"bench.baselines.naive_{mode}:create_app", design, workers, port, env,
        logdir / f"{design}-w{workers}-p{pool_size}-{table.rows}-{port}.log",
    )
    return Deployment(
        design=design, table=table, workers=workers, pool_size=pool_size if mode == "executor" else 0,
        services=[service], port=port, groups={"app": service},
    )


def hello(workers: int, logdir: Path) -> Deployment:
    port = free_port()
    service = _uvicorn("bench.baselines.hello:create_app", "hello", workers, port, {}, logdir / f"hello-{port}.log")
    return Deployment(
        design="fastapi-hello", table=Table(0, 0), workers=workers, pool_size=0, services=[service], port=port,
        groups={"app": service},
    )
