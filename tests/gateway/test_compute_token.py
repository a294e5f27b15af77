"""Direct gRPC callers of compute can be required to present an API key (besides mTLS)."""

from __future__ import annotations

import subprocess
import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from offload.keys import digest_of
from tests.conftest import ROOT
from offload.v1 import compute_pb2, compute_pb2_grpc, jobs_pb2, search_pb2


def entry(key_id: str, key: str, *scopes: str) -> str:
    return f"{key_id}:{digest_of(key).hex()}:{','.join(scopes)}"


def test_keys_scopes_and_open_health(compute_factory, gateway_factory, tmp_path):
    compute = compute_factory(
        api_keys=[entry("reader", "k-read", "read"), entry("gateway", "k-gw", "dispatch", "read", "search")]
    )
    stub = compute_pb2_grpc.ComputeServiceStub(compute.channel())
    request = compute_pb2.GetItemRequest(id="item-1")
    with pytest.raises(grpc.RpcError) as caught:
        stub.GetItem(request, timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as caught:
        stub.GetItem(request, timeout=5, metadata=[("authorization", "Bearer wrong")])
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert stub.GetItem(request, timeout=5, metadata=[("authorization", "Bearer k-read")]).id == "item-1"
    with pytest.raises(grpc.RpcError) as caught:  # the RPC's declared scope
        stub.Search(search_pb2.SearchRequest(vector=[1.0] * 16, k=1), timeout=5, metadata=[("authorization", "Bearer k-read")])
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as caught:  # a server stream is refused the same way
        list(stub.WatchJob(jobs_pb2.WatchJobRequest(id="x"), timeout=5))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    client = [sys.executable, "-m", "compute.client", "--address", compute.address, "GetItem", '{"id": "item-1"}']
    refused = subprocess.run(client, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and refused.stderr.startswith("UNAUTHENTICATED")
    served = subprocess.run([*client, "--api-key", "k-read"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert served.returncode == 0 and '"id": "item-1"' in served.stdout
    health = health_pb2_grpc.HealthStub(compute.channel()).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert health.status == health_pb2.HealthCheckResponse.SERVING  # probes need no key

    # The gateway presents its key: batched GetItem (Dispatch) and plain Search both pass.
    (tmp_path / "gateway.key").write_text("k-gw\n")
    gateway = gateway_factory(compute.address, compute_api_key_file=str(tmp_path / "gateway.key"))
    with gateway.client() as http:
        assert http.get("/v1/items/item-1").status_code == 200
        assert http.post("/v1/search", json={"vector": [1.0] * 16, "k": 2}).status_code == 200
        assert http.get("/v1/jobs").status_code == 403  # the gateway's key lacks jobs:read at compute


def test_a_gateway_without_the_dispatch_scope_cannot_batch(compute_factory, gateway_factory, tmp_path):
    compute = compute_factory(api_keys=[entry("weak", "k-weak", "read")])
    (tmp_path / "gateway.key").write_text("k-weak")
    gateway = gateway_factory(compute.address, compute_api_key_file=str(tmp_path / "gateway.key"))
    with gateway.client() as http:
        response = http.get("/v1/items/item-1")
        assert response.status_code == 403 and response.json()["error"]["status"] == "PERMISSION_DENIED"
