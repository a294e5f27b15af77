"""What compute serves is checked at start-up: an RPC without an operation stops it, unless
the user says it is meant (UNSERVED_METHODS). And an expired deadline is counted as one."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import grpc
import pytest

from compute import served
from compute.settings import ComputeSettings
from offload.config import ConfigError
from offload.testing.v1 import testing_pb2, testing_pb2_grpc
from offload.v1 import compute_pb2, compute_pb2_grpc
from tests.conftest import ROOT, metric_sample, wait_until

TESTING = "offload.testing.v1.TestingService"
ONLY_ECHO = f'''
from compute.registry import light
from offload.testing.v1 import testing_pb2  # noqa: F401  (loads the service's descriptors)

@light("{TESTING}.Echo")
def echo(request, runtime):
    return request
'''


@pytest.fixture
def only_echo(tmp_path, monkeypatch):
    """A module of the user's, outside the project, serving one RPC of TestingService."""
    (tmp_path / "only_echo.py").write_text(textwrap.dedent(ONLY_ECHO))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("only_echo", None)


def settings(**values) -> ComputeSettings:
    return ComputeSettings(_env_file=None, **values)


def test_an_rpc_of_a_served_service_without_operation_stops_start_up(only_echo):
    with pytest.raises(ConfigError) as caught:
        served.operations(settings(extra_operation_modules=["only_echo"]))
    missing = {line.split(" ", 1)[0] for line in caught.value.lines}
    assert missing == {f"{TESTING}.{m}" for m in ("Spin", "SpinTogether", "Block", "Crash", "Ticks", "Fail")}
    line = caught.value.lines[0]
    assert "OFFLOAD_COMPUTE_EXTRA_OPERATION_MODULES (now ['only_echo'])" in line
    assert "OFFLOAD_COMPUTE_UNSERVED_METHODS" in line


def test_serving_part_of_a_service_is_said_explicitly(only_echo):
    rest = [f"{TESTING}.{m}" for m in ("Spin", "SpinTogether", "Block", "Crash", "Ticks", "Fail")]
    found = served.operations(settings(extra_operation_modules=["only_echo"], unserved_methods=rest))
    assert f"{TESTING}.Echo" in found and "offload.v1.ComputeService.GetItem" in found  # built-ins stay

    with pytest.raises(ConfigError) as caught:
        served.operations(
            settings(
                extra_operation_modules=["only_echo"],
                unserved_methods=[*rest, f"{TESTING}.Echo", f"{TESTING}.NoSuch"],
            )
        )
    assert caught.value.lines == [
        f"OFFLOAD_COMPUTE_UNSERVED_METHODS lists '{TESTING}.Echo', which has an operation: remove it from the list",
        f"OFFLOAD_COMPUTE_UNSERVED_METHODS lists '{TESTING}.NoSuch', which is no RPC in the loaded protos "
        "(package.Service.Method)",
    ]


def test_dropping_the_built_ins_means_saying_which_rpcs_go_unserved():
    with pytest.raises(ConfigError) as caught:
        served.operations(settings(operation_modules=["compute.operations"]))  # no jobs module
    assert {line.split(" ", 1)[0] for line in caught.value.lines} == {
        f"offload.v1.ComputeService.{m}" for m in ("SubmitJob", "GetJob", "ListJobs", "CancelJob", "WatchJob")
    }


def test_an_operation_for_no_rpc_is_named(tmp_path, monkeypatch):
    (tmp_path / "typo_ops.py").write_text(
        textwrap.dedent(
            """
            from compute.registry import light

            @light("offload.v1.ComputeService.GetItme")
            def get_itme(request, runtime):
                return None
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        with pytest.raises(ConfigError) as caught:
            served.operations(settings(extra_operation_modules=["typo_ops"]))
    finally:
        sys.modules.pop("typo_ops", None)
    [line] = caught.value.lines
    assert line.startswith("offload.v1.ComputeService.GetItme (operation typo_ops.get_itme) is no RPC in the loaded protos")


def test_compute_refuses_to_start_in_one_line_per_rpc(only_echo, compute_factory):
    process = compute_factory(start=False, extra_operation_modules=["only_echo"])
    process.env["PYTHONPATH"] = str(only_echo)
    result = subprocess.run(
        [sys.executable, "-m", "compute"], cwd=ROOT, env=process.env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 6 and all(line.startswith(f"compute: {TESTING}.") for line in lines), result.stderr
    assert "Traceback" not in result.stderr


def test_a_declared_unserved_rpc_answers_unimplemented(only_echo, compute_factory):
    rest = [f"{TESTING}.{m}" for m in ("Spin", "SpinTogether", "Block", "Crash", "Ticks", "Fail")]
    process = compute_factory(start=False, extra_operation_modules=["only_echo"], unserved_methods=rest)
    process.env["PYTHONPATH"] = str(only_echo)
    compute = process.start()
    stub = testing_pb2_grpc.TestingServiceStub(compute.channel())
    assert stub.Echo(testing_pb2.EchoRequest(name="x"), timeout=5).name == "x"
    with pytest.raises(grpc.RpcError) as caught:
        stub.Fail(testing_pb2.FailRequest(code="NOT_FOUND"), timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert compute_pb2_grpc.ComputeServiceStub(compute.channel()).GetItem(
        compute_pb2.GetItemRequest(id="item-1"), timeout=5
    ).id == "item-1"


def test_an_expired_deadline_counts_as_deadline_exceeded_and_a_cancel_as_cancelled(shared_compute):
    stub = testing_pb2_grpc.TestingServiceStub(shared_compute.channel())
    before = shared_compute.metrics_text()

    def count(text: str, method: str, code: str) -> float:
        return metric_sample(text, "offload_compute_calls_total", method=method, code=code)

    def wait_counted(method: str, code: str) -> None:
        """Compute counts a call when its handler ends, a little after the client has given up."""
        def counted() -> bool:
            return count(shared_compute.metrics_text(), method, code) > count(before, method, code)

        wait_until(counted, 10, 0.05, f"{method} counted as {code}")

    with pytest.raises(grpc.RpcError) as caught:
        stub.Spin(testing_pb2.SpinRequest(seconds=5), timeout=0.3)  # heavy: in the pool
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_counted("Spin", "DEADLINE_EXCEEDED")
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.Ticks(testing_pb2.TicksRequest(count=100, interval_ms=50), timeout=0.3))  # a light stream
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_counted("Ticks", "DEADLINE_EXCEEDED")
    future = stub.Spin.future(testing_pb2.SpinRequest(seconds=5), timeout=30)
    time.sleep(0.3)
    future.cancel()
    wait_counted("Spin", "CANCELLED")

    after = shared_compute.metrics_text()
    assert count(after, "Spin", "DEADLINE_EXCEEDED") - count(before, "Spin", "DEADLINE_EXCEEDED") == 1
    assert count(after, "Ticks", "DEADLINE_EXCEEDED") - count(before, "Ticks", "DEADLINE_EXCEEDED") == 1
    assert count(after, "Spin", "CANCELLED") - count(before, "Spin", "CANCELLED") == 1
    assert count(after, "Ticks", "CANCELLED") == count(before, "Ticks", "CANCELLED")
