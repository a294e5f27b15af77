"""`make dev` as a newcomer runs it: the README's "Your operations, in a directory of your own",
followed as written, in a scratch copy of the checkout, with a `.env` holding every JSON-valued
setting. honcho used to re-export `.env` with the JSON quotes stripped, which killed compute.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import typing
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest

from compute.settings import ComputeSettings
from compute.table import synthetic_arrays
from gateway.settings import GatewaySettings
from tests import leftovers
from tests.conftest import ROOT, wait_until
from tests.gateway.conftest import free_port

SECTION = "### Your operations, in a directory of your own"
ROWS, DIM, SEED = 3000, 16, 7


def readme_section() -> str:
    text = (ROOT / "README.md").read_text()
    return text.split(SECTION, 1)[1].split("\n### ", 1)[0]


def code_blocks(text: str) -> list[str]:
    return [block for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S)]


def json_valued_settings() -> list[str]:
    names = []
    for prefix, cls in (("OFFLOAD_COMPUTE_", ComputeSettings), ("OFFLOAD_GATEWAY_", GatewaySettings)):
        for name, field in cls.model_fields.items():
            if typing.get_origin(field.annotation) in (list, dict):
                names.append(f"{prefix}{name.upper()}")
    return names


def scratch_checkout(target: Path) -> Path:
    """A copy of this checkout's working tree (mtimes kept, so make rebuilds nothing), sharing its venv."""
    target.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("compute", "gateway", "offload", "protos", "buf"):
        shutil.copytree(ROOT / name, target / name, ignore=ignore)
    for name in ("Makefile", "Procfile", "requirements.lock", "pyproject.toml"):
        shutil.copy2(ROOT / name, target / name)
    (target / ".venv").symlink_to(ROOT / ".venv")
    return target


@pytest.fixture
def newcomer(tmp_path):
    """(checkout, home, env): a scratch checkout and a HOME where the user's project goes."""
    checkout = scratch_checkout(tmp_path / "offload")
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OFFLOAD_") and k != "PYTHONPATH"}
    env["HOME"] = str(home)
    yield checkout, home, env


@pytest.fixture
def shm_dir():
    path = Path(tempfile.mkdtemp(prefix="offload-dev-test-", dir="/dev/shm"))
    leftovers.record_dir(path)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_make_dev_with_the_readme_extension_and_json_settings_in_dotenv(newcomer, tmp_path, shm_dir):
    checkout, home, env = newcomer
    section = readme_section()
    blocks = code_blocks(section)

    # The files, as the README shows them: each block says where it goes in its first line.
    project = home / "countops"
    for block in blocks:
        first, _, body = block.partition("\n")
        where = re.match(r"^(?://|#) ~/(\S+)$", first)
        if where:
            path = home / where.group(1)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(body)
    assert (project / "protos/countops/v1/countops.proto").exists() and (project / "countops/operations.py").exists()
    (project / "countops" / "__init__.py").write_text("")  # "empty", says the layout

    # Step 2, the command as written.
    [generate] = [line for block in blocks for line in block.splitlines() if "offload.protogen" in line]
    subprocess.run(["bash", "-c", generate], cwd=checkout, env=env, check=True, timeout=120)
    assert (project / "countops/v1/countops_pb2.py").exists()

    # Step 4: the README's .env lines, then every JSON-valued setting as JSON, then this test's
    # own addresses and sizes.
    [dotenv] = [block for block in blocks if block.startswith("# .env")]
    port = free_port()
    socket = tmp_path / "compute.sock"
    json_lines = {
        "OFFLOAD_COMPUTE_OPERATION_MODULES": '["compute.operations", "compute.jobs.operations"]',
        "OFFLOAD_COMPUTE_UNSERVED_METHODS": "[]",
        "OFFLOAD_COMPUTE_JOB_TYPE_MODULES": '["compute.jobs.batch_search"]',
        "OFFLOAD_COMPUTE_EXTRA_JOB_TYPE_MODULES": "[]",
        "OFFLOAD_GATEWAY_PROTO_MODULES": '["offload.v1.compute_pb2"]',
        "OFFLOAD_GATEWAY_ROUTE_TIMEOUTS": '{"CountAbove": 20, "Search": 10}',
        "OFFLOAD_GATEWAY_CORS_ALLOW_ORIGINS": '["https://app.example"]',
        "OFFLOAD_GATEWAY_WS_ALLOWED_ORIGINS": '["https://app.example"]',
        "OFFLOAD_GATEWAY_API_KEYS": "[]",
        "OFFLOAD_COMPUTE_API_KEYS": "[]",
        "OFFLOAD_COMPUTE_TABLE_LOAD_DIRS": '["var/tables"]',
        "OFFLOAD_COMPUTE_WEBHOOK_SECRETS": '["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"]',
        "OFFLOAD_COMPUTE_WEBHOOK_ALLOWLIST": '["127.0.0.1", "*.hooks.example"]',

        "OFFLOAD_GATEWAY_AUTH_OPEN_PATHS": '["/readyz", "/metrics", "/docs", "/openapi.json"]',
    }
    text = dotenv + "".join(f"{k}={v}\n" for k, v in json_lines.items())
    missing = [name for name in json_valued_settings() if f"{name}=" not in text]
    assert not missing, f"the test's .env lacks {missing}"
    text += (
        f"OFFLOAD_COMPUTE_ADDRESS=unix:{socket}\nOFFLOAD_GATEWAY_COMPUTE_ADDRESS=unix:{socket}\n"
        f"OFFLOAD_GATEWAY_PORT={port}\nOFFLOAD_GATEWAY_WORKERS=2\nOFFLOAD_COMPUTE_METRICS_PORT=0\n"
        f"OFFLOAD_COMPUTE_ROWS={ROWS}\nOFFLOAD_COMPUTE_DIM={DIM}\nOFFLOAD_COMPUTE_SEED={SEED}\n"
        f"OFFLOAD_COMPUTE_POOL_SIZE=2\nOFFLOAD_COMPUTE_SHM_DIR={shm_dir}\n"
        f"OFFLOAD_COMPUTE_JOBS_DB_PATH={tmp_path}/jobs.sqlite3\n"
    )
    (checkout / ".env").write_text(text)

    log = open(tmp_path / "make-dev.log", "wb")
    make = subprocess.Popen(["make", "dev"], cwd=checkout, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        def ready() -> bool:
            if make.poll() is not None:
                raise AssertionError(f"make dev exited {make.returncode}:\n{(tmp_path / 'make-dev.log').read_text()[-4000:]}")
            try:
                return httpx.get(f"{base}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, 120, 0.1, "make dev ready")
        processes = psutil.Process(make.pid).children(recursive=True)
        leftovers.record_pids(p.pid for p in processes)  # compute's semaphores are checked at session end

        # Step 5, the README's calls: the user's operations, and the built-ins still there.
        vectors, _ = synthetic_arrays(ROWS, DIM, SEED)
        expected = int(np.count_nonzero(vectors @ vectors[42] > np.float32(0.2)))
        with httpx.Client(base_url=base, timeout=30) as http:
            count = http.get("/v1/items/item-42/count-above", params={"threshold": 0.2})
            assert count.status_code == 200 and count.json() == {"count": str(expected)}  # int64: a JSON string
            assert http.get("/v1/items/item-42/row").json() == {"row": "42"}
            bad = http.get("/v1/items/item-42/count-above", params={"threshold": 3})
            assert bad.status_code == 400 and bad.json()["error"]["message"] == "threshold must be between -1 and 1"
            assert http.get("/v1/items/item-42").status_code == 200
            doc = http.get("/openapi.json").json()
            operation = doc["paths"]["/v1/items/{id}/count-above"]["get"]
            assert operation["description"].startswith("Heavy: how many rows are more similar to an item than a threshold.")
            threshold = next(p for p in operation["parameters"] if p["name"] == "threshold")
            assert threshold["description"].startswith("Cosine similarity threshold")
        client = subprocess.run(
            [".venv/bin/python", "-m", "compute.client", "--address", f"unix:{socket}", "CountAbove",
             '{"id": "item-42", "threshold": 0.2}'],
            cwd=checkout, env=env, capture_output=True, text=True, timeout=60,
        )
        assert client.returncode == 0, client.stderr
        assert f'"count": "{expected}"' in client.stdout

        # Ctrl-C: the terminal sends SIGINT to the whole foreground process group.
        os.killpg(make.pid, signal.SIGINT)
        make.wait(60)
        gone, alive = psutil.wait_procs(processes, timeout=30)
        assert not alive, f"left running after Ctrl-C: {alive}"

        # Logs for people: the console form (the devserver pipes them, so `auto` alone would be JSON),
        # without colours here since make's own output is a file.
        dev_log = (tmp_path / "make-dev.log").read_text()
        lines = [line.split("| ", 1)[1] for line in dev_log.splitlines() if re.match(r"^\S+ (compute|gateway) +\| ", line)]
        assert any("compute ready" in line for line in lines) and any("gateway worker ready" in line for line in lines)
        assert not [line for line in lines if line.startswith("{")], "make dev printed JSON log lines"
        assert "\x1b" not in dev_log
    finally:
        if make.poll() is None:
            os.killpg(make.pid, signal.SIGKILL)
            make.wait(10)
        log.close()
