"""The extension model: an RPC in a proto + one decorated function, and compute serves it."""

from __future__ import annotations

import sys
import textwrap

import pytest
from google.protobuf import timestamp_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import CollectorRegistry

from compute import registry
from compute.metrics import CallMetrics
from compute.registry import Kind, Operation
from compute.calls import CallPath
from compute.servicer import OperationServicer
from offload.testing.v1 import testing_pb2, testing_pb2_grpc


def test_echo_is_served_with_no_servicer_code(shared_compute):
    """tests/operations_testing.py has one function per RPC and no gRPC code at all."""
    request = testing_pb2.EchoRequest(
        name="hello",
        big=2**62,
        color=testing_pb2.GREEN,
        numbers=[1, -2, 3],
        payload=testing_pb2.Payload(
            text="t", tags=["a", "b"], counts={"x": 1}, when=timestamp_pb2.Timestamp(seconds=5), blob=b"\x00\xff"
        ),
        flag=True,
        ratio=0.25,
    )
    assert testing_pb2_grpc.TestingServiceStub(shared_compute.channel()).Echo(request, timeout=5) == request

    # The new service is announced by reflection too (derived from the registry).
    stub = reflection_pb2_grpc.ServerReflectionStub(shared_compute.channel())
    [reply] = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
    names = {service.name for service in reply.list_services_response.service}
    assert {"offload.testing.v1.TestingService", "offload.v1.ComputeService"} <= names


def test_collect_tags_light_and_heavy():
    operations = registry.collect(["compute.operations", "tests.operations_testing"])
    kinds = {name.rsplit(".", 1)[1]: op.kind for name, op in operations.items()}
    assert kinds["GetItem"] is Kind.LIGHT and kinds["GetStats"] is Kind.LIGHT
    assert kinds["Search"] is Kind.HEAVY and kinds["Spin"] is Kind.HEAVY and kinds["Crash"] is Kind.HEAVY
    assert kinds["Block"] is Kind.LIGHT and kinds["Echo"] is Kind.LIGHT and kinds["Ticks"] is Kind.LIGHT
    search = operations["offload.v1.ComputeService.Search"]
    assert search.validate is not None and search.fn.__name__ == "search"
    # Listing a module twice is harmless (same functions).
    assert registry.collect(["compute.operations", "compute.operations"]).keys() == registry.collect(
        ["compute.operations"]
    ).keys()


@pytest.fixture
def op_modules(tmp_path, monkeypatch):
    """Write throwaway operation modules importable by name."""
    monkeypatch.syspath_prepend(str(tmp_path))
    written = []

    def write(name: str, source: str) -> str:
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        written.append(name)
        return name

    yield write
    for name in written:
        sys.modules.pop(name, None)


def test_collect_refuses_two_functions_for_one_rpc(op_modules):
    first = op_modules(
        "ext_first",
        """
        from compute.registry import light

        @light("offload.testing.v1.TestingService.Echo")
        def echo(request, runtime):
            return request
        """,
    )
    second = op_modules(
        "ext_second",
        """
        from compute.registry import light

        @light("offload.testing.v1.TestingService.Echo")
        def another_echo(request, runtime):
            return request
        """,
    )
    with pytest.raises(ValueError, match="two operations for offload.testing.v1.TestingService.Echo"):
        registry.collect([first, second])
    # An extra operation on its own is picked up, tagged as declared.
    [(name, op)] = registry.collect([second]).items()
    assert name == "offload.testing.v1.TestingService.Echo" and op.kind is Kind.LIGHT
    assert op.fn.__name__ == "another_echo"


def test_a_method_in_no_loaded_proto_is_a_clear_error():
    def nothing(request, runtime):
        return None

    operations = {"offload.v1.ComputeService.NoSuchMethod": Operation("offload.v1.ComputeService.NoSuchMethod", nothing, Kind.LIGHT)}
    with pytest.raises(ValueError, match=r"offload\.v1\.ComputeService\.NoSuchMethod: no such RPC in the loaded protos"):
        CallPath(operations, CallMetrics(CollectorRegistry()))


def test_handlers_cover_every_registered_operation():
    operations = registry.collect(["compute.operations", "tests.operations_testing"])
    handlers = OperationServicer(CallPath(operations, CallMetrics(CollectorRegistry()))).handlers()
    served = {name for handler in handlers for name in handler._method_handlers}  # "/pkg.Service/Method"
    expected = {"/" + ".".join(name.split(".")[:-1]) + "/" + name.split(".")[-1] for name in operations}
    assert served == expected
