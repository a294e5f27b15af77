"""Request id and traceparent cross from gRPC metadata into compute's and its workers' logs."""

from __future__ import annotations

import grpc
import pytest

from offload import context
from offload.testing.v1 import testing_pb2, testing_pb2_grpc
from offload.v1 import compute_pb2_grpc, search_pb2
from tests.conftest import ComputeLauncher, wait_until

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.fixture(scope="module")
def debug_compute(tmp_path_factory):
    """A compute at DEBUG level, so that it logs one line per call ("call done")."""
    launcher = ComputeLauncher(tmp_path_factory.mktemp("context"))
    yield launcher(log_level="DEBUG", pool_size=1)
    launcher.close()


def lines(compute, **fields) -> list[dict]:
    return [r for r in compute.log_records() if all(r.get(k) == v for k, v in fields.items())]


def test_request_id_and_traceparent_reach_compute_and_worker_logs(debug_compute):
    metadata = [("x-request-id", "ctx-req-1"), ("traceparent", TRACEPARENT)]
    reply = testing_pb2_grpc.TestingServiceStub(debug_compute.channel()).Spin(
        testing_pb2.SpinRequest(seconds=0), metadata=metadata, timeout=5
    )
    assert reply.finished
    wait_until(lambda: lines(debug_compute, msg="call done", request_id="ctx-req-1"), 5, message="compute's call line")

    [worker_line] = lines(debug_compute, msg="spin started", request_id="ctx-req-1")
    assert worker_line["process"] == "compute-worker" and worker_line["pid"] == reply.pid
    assert worker_line["traceparent"] == TRACEPARENT
    [call_line] = lines(debug_compute, msg="call done", request_id="ctx-req-1")
    assert call_line["process"] == "compute" and call_line["pid"] == debug_compute.pid
    assert call_line["traceparent"] == TRACEPARENT
    assert call_line["method"] == "offload.testing.v1.TestingService.Spin" and call_line["code"] == "OK"

    # The built-in heavy operation, and its error path.
    stub = compute_pb2_grpc.ComputeServiceStub(debug_compute.channel())
    stub.Search(search_pb2.SearchRequest(vector=[1.0] * 16, k=3), metadata=[("x-request-id", "ctx-search")], timeout=5)
    with pytest.raises(grpc.RpcError):
        stub.Search(search_pb2.SearchRequest(vector=[1.0] * 3, k=3), metadata=[("x-request-id", "ctx-bad")], timeout=5)
    wait_until(lambda: lines(debug_compute, msg="call done", request_id="ctx-bad"), 5, message="the failed call's line")
    [ok] = lines(debug_compute, msg="call done", request_id="ctx-search")
    assert ok["code"] == "OK" and ok["method"].endswith("ComputeService.Search")
    [bad] = lines(debug_compute, msg="call done", request_id="ctx-bad")
    assert bad["code"] == "INVALID_ARGUMENT"


def test_a_call_without_context_gets_a_generated_one(debug_compute):
    known = {r.get("request_id") for r in lines(debug_compute, msg="spin started")}
    reply = testing_pb2_grpc.TestingServiceStub(debug_compute.channel()).Spin(
        testing_pb2.SpinRequest(seconds=0), timeout=5
    )
    assert reply.finished

    def new_spins():
        return [r for r in lines(debug_compute, msg="spin started") if r.get("request_id") not in known]

    wait_until(new_spins, 5, message="the worker's line")
    [worker_line] = new_spins()
    generated = worker_line["request_id"]
    assert context.valid_request_id(generated) and len(generated) == 16
    assert context.valid_traceparent(worker_line["traceparent"])
    # compute logged the same generated id for the same call
    wait_until(lambda: lines(debug_compute, msg="call done", request_id=generated), 5, message="compute's line")
    [call_line] = lines(debug_compute, msg="call done", request_id=generated)
    assert call_line["traceparent"] == worker_line["traceparent"]


def test_malformed_request_id_is_replaced_not_logged(debug_compute):
    reply = testing_pb2_grpc.TestingServiceStub(debug_compute.channel()).Echo(
        testing_pb2.EchoRequest(name="x"), metadata=[("x-request-id", "bad id with spaces")], timeout=5
    )
    assert reply.name == "x"
    wait_until(
        lambda: lines(debug_compute, msg="call done", method="offload.testing.v1.TestingService.Echo"), 5, message="Echo"
    )
    [line] = lines(debug_compute, msg="call done", method="offload.testing.v1.TestingService.Echo")
    assert "spaces" not in line["request_id"] and context.valid_request_id(line["request_id"])
