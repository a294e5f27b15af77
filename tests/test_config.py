"""Settings survive every way of setting them, and a mistake is one clear line, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from compute.settings import ComputeSettings
from gateway.settings import GatewaySettings
from offload import config
from tests.conftest import ROOT, clean_env


@pytest.fixture
def env_file(tmp_path, monkeypatch):
    """A dotenv file the settings read (OFFLOAD_ENV_FILE), and an environment without OFFLOAD_*."""
    for name in [n for n in os.environ if n.startswith("OFFLOAD_")]:
        monkeypatch.delenv(name)
    path = tmp_path / "settings.env"
    path.write_text("")
    monkeypatch.setenv("OFFLOAD_ENV_FILE", str(path))
    return path


def test_lists_and_maps_take_json_or_plain_text_from_file_and_environment(env_file, monkeypatch):
    env_file.write_text(
        'OFFLOAD_COMPUTE_OPERATION_MODULES=["compute.operations", "compute.jobs.operations"]\n'
        "OFFLOAD_COMPUTE_EXTRA_OPERATION_MODULES=tests.operations_testing, other.module\n"
        'OFFLOAD_GATEWAY_ROUTE_TIMEOUTS={"Search": 10}\n'
        "OFFLOAD_GATEWAY_EXTRA_PROTO_MODULES='[\"offload.testing.v1.testing_pb2\"]'\n"
    )
    compute = config.load(ComputeSettings)
    assert compute.served_operation_modules == [
        "compute.operations", "compute.jobs.operations", "tests.operations_testing", "other.module"
    ]
    gateway = config.load(GatewaySettings)
    assert gateway.route_timeouts == {"Search": 10.0}
    assert gateway.routed_proto_modules == ["offload.v1.compute_pb2", "offload.testing.v1.testing_pb2"]
    # The environment wins over the file; name=value pairs work as well as JSON.
    monkeypatch.setenv("OFFLOAD_GATEWAY_ROUTE_TIMEOUTS", "Search=2.5, GetItem=1")
    assert config.load(GatewaySettings).route_timeouts == {"Search": 2.5, "GetItem": 1.0}


def test_extra_modules_add_to_the_built_ins_and_the_list_itself_replaces_them(env_file, monkeypatch):
    monkeypatch.setenv("OFFLOAD_COMPUTE_EXTRA_JOB_TYPE_MODULES", "mine.jobs")
    settings = config.load(ComputeSettings)
    assert settings.served_job_type_modules == ["compute.jobs.batch_search", "mine.jobs"]
    monkeypatch.setenv("OFFLOAD_COMPUTE_OPERATION_MODULES", "compute.operations")
    assert config.load(ComputeSettings).served_operation_modules == ["compute.operations"]


def test_each_mistake_is_one_line_naming_the_variable_the_value_and_its_source(env_file, monkeypatch):
    # What honcho used to export for a JSON list: its quotes stripped shell-style.
    env_file.write_text(
        "OFFLOAD_COMPUTE_OPERATION_MODULES=[compute.operations,compute.jobs.operations]\nOFFLOAD_COMPUTE_POOL_SIZ=4\n"
    )
    monkeypatch.setenv("OFFLOAD_COMPUTE_POOL_SIZE", "two")
    with pytest.raises(config.ConfigError) as caught:
        config.load(ComputeSettings)
    lines = caught.value.lines
    assert len(lines) == 3, lines
    by_variable = {line.split("=", 1)[0]: line for line in lines}
    modules = by_variable["OFFLOAD_COMPUTE_OPERATION_MODULES"]
    assert "'[compute.operations,compute.jobs.operations]'" in modules and f"(from {env_file})" in modules
    assert "expected a JSON list of strings" in modules
    size = by_variable["OFFLOAD_COMPUTE_POOL_SIZE"]
    assert "'two' (from the environment)" in size and "valid integer" in size
    typo = by_variable["OFFLOAD_COMPUTE_POOL_SIZ"]
    assert "not a setting" in typo and "did you mean OFFLOAD_COMPUTE_POOL_SIZE?" in typo


def test_a_value_the_make_targets_exported_from_the_file_is_reported_as_the_files(env_file, monkeypatch):
    env_file.write_text("OFFLOAD_COMPUTE_MAX_K=lots\n")
    monkeypatch.setenv("OFFLOAD_COMPUTE_MAX_K", "lots")  # what `dotenv run` does under make dev
    with pytest.raises(config.ConfigError) as caught:
        config.load(ComputeSettings)
    assert caught.value.lines[0].startswith(f"OFFLOAD_COMPUTE_MAX_K='lots' (from {env_file}): ")


def test_an_unknown_name_only_in_the_environment_is_a_warning(env_file, monkeypatch):
    """Kubernetes injects <SERVICE>_PORT=tcp://... for a Service named offload-compute."""
    monkeypatch.setenv("OFFLOAD_COMPUTE_PORT", "tcp://10.0.0.1:50051")
    warnings: list[str] = []
    settings = config.load(ComputeSettings, warn=warnings.append)
    assert settings.address == "127.0.0.1:50051"
    assert len(warnings) == 1
    assert warnings[0].startswith("OFFLOAD_COMPUTE_PORT='tcp://10.0.0.1:50051' (from the environment): not a setting")


def test_a_check_across_settings_is_one_line_too(env_file, monkeypatch):
    monkeypatch.setenv("OFFLOAD_GATEWAY_TLS_CERT_FILE", "/x/cert.pem")
    with pytest.raises(config.ConfigError) as caught:
        config.load(GatewaySettings)
    assert caught.value.lines == ["mTLS needs both tls_cert_file and tls_key_file"]


@pytest.mark.parametrize(
    "process, settings, expected",
    [
        ("compute", {"OFFLOAD_COMPUTE_MAX_K": "lots"}, "compute: OFFLOAD_COMPUTE_MAX_K='lots' (from the environment): Input should be a valid integer"),
        (
            "compute",
            {"OFFLOAD_COMPUTE_EXTRA_OPERATION_MODULES": "nowhere.ops"},
            "compute: OFFLOAD_COMPUTE_EXTRA_OPERATION_MODULES: cannot import 'nowhere.ops': No module named 'nowhere' "
            "(is its directory on PYTHONPATH? is its code generated?)",
        ),
        (
            "gateway",
            {"OFFLOAD_GATEWAY_EXTRA_PROTO_MODULES": '["nowhere.v1.nowhere_pb2"]'},
            "gateway: OFFLOAD_GATEWAY_EXTRA_PROTO_MODULES: cannot import 'nowhere.v1.nowhere_pb2'",
        ),
        (
            "gateway",
            {"file": "OFFLOAD_GATEWAY_WORKRES=2\n"},
            "gateway: OFFLOAD_GATEWAY_WORKRES='2' (from {file}): not a setting of this process; "
            "did you mean OFFLOAD_GATEWAY_WORKERS?",
        ),
    ],
    ids=["bad-int", "missing-operation-module", "missing-proto-module", "typo-in-file"],
)
def test_the_processes_exit_2_with_the_line_and_no_traceback(tmp_path, process, settings, expected):
    settings = dict(settings)
    env_path = tmp_path / "settings.env"
    env_path.write_text(settings.pop("file", ""))
    expected = expected.replace("{file}", str(env_path))
    env = clean_env(OFFLOAD_COMPUTE_ADDRESS=f"unix:{tmp_path}/c.sock", OFFLOAD_COMPUTE_SHM_DIR=str(tmp_path), **settings)
    env["OFFLOAD_ENV_FILE"] = str(env_path)
    result = subprocess.run(
        [sys.executable, "-m", process], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected), result.stderr
    assert "Traceback" not in result.stderr


def test_env_example_uncommented_whole_is_valid(env_file):
    """Every line of .env.example, uncommented as it stands, loads in both processes."""
    lines = [line[1:] for line in (ROOT / ".env.example").read_text().splitlines() if line.startswith("#OFFLOAD_")]
    env_file.write_text("\n".join(lines) + "\n")
    compute = config.load(ComputeSettings)
    assert compute.served_operation_modules[-1] == "countops.operations" and compute.tls_cert_file is None
    gateway = config.load(GatewaySettings)
    assert gateway.routed_proto_modules[-1] == "countops.v1.countops_pb2" and gateway.route_timeouts == {}
