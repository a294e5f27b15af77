"""`make dev`'s supervisor (offload/devserver.py), run for real in a scratch checkout: an edit
restarts what it must, a crash is restarted, Ctrl-C stops everything."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import httpx
import psutil
import pytest

from tests import leftovers
from tests.conftest import wait_until
from tests.gateway.conftest import free_port
from tests.test_dev import scratch_checkout, shm_dir  # noqa: F401 (a fixture)


def pid_of(devserver: psutil.Process, module: str) -> int | None:
    for child in devserver.children():
        try:
            if child.cmdline()[-2:] == ["-m", module]:
                return child.pid
        except psutil.NoSuchProcess:
            pass
    return None


def touch(path: Path, line: str) -> None:
    with open(path, "a") as f:
        f.write(line)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_edits_restart_what_they_must_and_crashes_are_restarted(tmp_path, shm_dir):  # noqa: F811
    checkout = scratch_checkout(tmp_path / "offload")
    port = free_port()
    socket = tmp_path / "compute.sock"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OFFLOAD_") and k != "PYTHONPATH"}
    env.update({
        "OFFLOAD_ENV_FILE": "", "OFFLOAD_COMPUTE_ADDRESS": f"unix:{socket}", "OFFLOAD_GATEWAY_COMPUTE_ADDRESS": f"unix:{socket}",
        "OFFLOAD_GATEWAY_PORT": str(port), "OFFLOAD_GATEWAY_WORKERS": "1", "OFFLOAD_COMPUTE_METRICS_PORT": "0",
        "OFFLOAD_COMPUTE_ROWS": "2000", "OFFLOAD_COMPUTE_DIM": "16", "OFFLOAD_COMPUTE_POOL_SIZE": "1",
        "OFFLOAD_COMPUTE_SHM_DIR": str(shm_dir), "OFFLOAD_COMPUTE_JOBS_DB_PATH": str(tmp_path / "jobs.sqlite3"),
        "OFFLOAD_COMPUTE_DRAIN_GRACE_SECONDS": "2", "OFFLOAD_GATEWAY_GRACEFUL_SHUTDOWN_SECONDS": "2",
    })  # fmt: skip
    log_path = tmp_path / "dev.log"
    log = open(log_path, "wb")
    dev = subprocess.Popen([str(checkout / ".venv/bin/python"), "-m", "offload.devserver"], cwd=checkout, env=env,
                           stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    supervisor = psutil.Process(dev.pid)
    seen: set[int] = set()

    def serving() -> bool:
        if dev.poll() is not None:
            raise AssertionError(f"devserver exited {dev.returncode}:\n{log_path.read_text()[-4000:]}")
        seen.update(p.pid for p in supervisor.children(recursive=True))
        leftovers.record_pids(seen)
        try:
            return httpx.get(f"{base}/v1/items/item-3", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def pids() -> tuple[int | None, int | None]:
        return pid_of(supervisor, "compute"), pid_of(supervisor, "gateway")

    try:
        wait_until(serving, 90, 0.1, "make dev serving")
        compute, gateway = pids()

        # compute/: compute restarts, the gateway stays and reconnects.
        touch(checkout / "compute/operations.py", "\n# edited\n")
        wait_until(lambda: pids()[0] not in (None, compute), 30, 0.1, "a new compute")
        wait_until(serving, 60, 0.1, "serving after the compute restart")
        assert pids()[1] == gateway
        compute = pids()[0]

        # gateway/: the gateway restarts, compute stays.
        touch(checkout / "gateway/settings.py", "\n# edited\n")
        wait_until(lambda: pids()[1] not in (None, gateway), 30, 0.1, "a new gateway")
        wait_until(serving, 60, 0.1, "serving after the gateway restart")
        assert pids()[0] == compute
        gateway = pids()[1]

        # protos/: a proto that does not compile changes nothing; a good one regenerates, restarts both.
        proto = checkout / "protos/offload/v1/search.proto"
        good = proto.read_text()
        proto.write_text(good + "\nmessage Broken {\n")
        wait_until(lambda: "code generation failed" in log_path.read_text(), 30, 0.1, "the protoc error shown")
        assert pids() == (compute, gateway) and serving()
        generated = (checkout / "offload/v1/search_pb2.py").stat().st_mtime
        proto.write_text(good + "\n// A comment.\n")
        wait_until(lambda: (checkout / "offload/v1/search_pb2.py").stat().st_mtime > generated, 30, 0.1, "regenerated")
        wait_until(lambda: None not in pids() and pids()[0] != compute and pids()[1] != gateway, 30, 0.1, "both restarted")
        wait_until(serving, 60, 0.1, "serving after the proto change")
        compute, gateway = pids()

        # A crash: restarted with backoff, not the end of make dev.
        os.kill(compute, signal.SIGKILL)
        wait_until(lambda: pids()[0] not in (None, compute), 30, 0.1, "compute restarted after SIGKILL")
        wait_until(serving, 60, 0.1, "serving after the crash")
        assert "compute exited with -9; restarting in 0.5 s" in log_path.read_text()

        # Ctrl-C: the whole foreground process group gets SIGINT.
        children = supervisor.children(recursive=True)
        os.killpg(dev.pid, signal.SIGINT)
        assert dev.wait(60) == 0
        _, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, f"left running after Ctrl-C: {alive}"
        text = log_path.read_text()
        assert "compute/operations.py changed: restarting compute" in text
        assert "gateway/settings.py changed: restarting gateway" in text
    finally:
        if dev.poll() is None:
            os.killpg(dev.pid, signal.SIGKILL)
            dev.wait(10)
        log.close()
