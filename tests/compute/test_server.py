"""compute end to end: a real `python -m compute` process over a unix socket."""

from __future__ import annotations

import signal
import subprocess
import sys

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2

from compute.search import top_k
from compute.table import EmbeddingTable, normalised_query
from offload.v1 import compute_pb2, compute_pb2_grpc, search_pb2
from tests.conftest import ROOT, wait_until


def stub(compute):
    return compute_pb2_grpc.ComputeServiceStub(compute.channel())


def reference_table(tmp_path, rows, dim, seed=42) -> EmbeddingTable:
    """The same deterministic synthetic table compute builds, in-process."""
    return EmbeddingTable.build(tmp_path, rows=rows, dim=dim, seed=seed)


def test_get_item_and_not_found(shared_compute, tmp_path):
    table = reference_table(tmp_path, 2000, 16)
    item = stub(shared_compute).GetItem(compute_pb2.GetItemRequest(id="item-1234"))
    assert item.id == "item-1234"
    np.testing.assert_array_equal(np.array(item.vector, dtype=np.float32), table.vectors[table.row_of("item-1234")])
    with pytest.raises(grpc.RpcError) as info:
        stub(shared_compute).GetItem(compute_pb2.GetItemRequest(id="no-such-item"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no-such-item" not in info.value.details()  # input is never echoed


def test_search_matches_numpy_reference(shared_compute, tmp_path):
    table = reference_table(tmp_path, 2000, 16)
    rng = np.random.default_rng(7)
    for k in (1, 10, 1000):
        query = rng.standard_normal(16).astype(np.float32)
        response = stub(shared_compute).Search(search_pb2.SearchRequest(vector=query.tolist(), k=k))
        unit = normalised_query(query.tolist(), 16)
        scores = table.vectors @ unit
        expected = np.lexsort((table.ids, -scores))[:k]
        assert [hit.id for hit in response.hits] == [table.id_at(row) for row in expected]
        np.testing.assert_allclose([hit.score for hit in response.hits], scores[expected], rtol=0, atol=1e-6)
        assert [h.id for h in response.hits] == [table.id_at(r) for r, _ in top_k(table.vectors, table.ids, unit, k)]


@pytest.mark.parametrize(
    "vector, k, fragment",
    [
        ([1.0] * 15, 5, "must have 16 values"),  # compute's own checks: the table's dimension,
        ([0.0] * 16, 5, "zero length"),
        ([float("nan")] + [1.0] * 15, 5, "NaN or Infinity"),  # finiteness (numpy, vectorised)...
        ([1.0] * 3 + [float("inf")] + [1.0] * 12, 5, "NaN or Infinity"),
        ([], 5, "vector: must contain at least 1 item(s)"),  # ...and the proto's rules
        ([1.0] * 16, 0, "k: value is required"),
        ([1.0] * 16, 1001, "k: must be greater than or equal to 1 and less than or equal to 1000"),
    ],
)
def test_search_validation(shared_compute, vector, k, fragment):
    with pytest.raises(grpc.RpcError) as info:
        stub(shared_compute).Search(search_pb2.SearchRequest(vector=vector, k=k))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in info.value.details()


def test_oversized_message_is_refused(shared_compute):
    huge = search_pb2.SearchRequest(vector=[1.0] * 2_000_000, k=1)  # 8 MB > 4 MiB limit
    with pytest.raises(grpc.RpcError) as info:
        stub(shared_compute).Search(huge)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_stats(shared_compute):
    stats = stub(shared_compute).GetStats(compute_pb2.GetStatsRequest())
    assert (stats.cache.rows, stats.cache.dim) == (2000, 16)
    assert stats.cache.bytes >= 2000 * 16 * 4
    assert stats.pool.size == 2 and stats.pool.healthy
    assert not stats.loop.stalled


def test_sigterm_drains_and_removes_shared_memory(compute):
    assert any(compute.shm_dir.iterdir()), "compute should have created its segments"
    assert compute.health("offload.v1.ComputeService") == health_pb2.HealthCheckResponse.SERVING
    compute.signal(signal.SIGTERM)
    assert compute.proc.wait(30) == 0
    assert list(compute.shm_dir.iterdir()) == []
    records = compute.log_records()
    assert any(r["msg"] == "compute stopped" for r in records)


def test_refuses_non_loopback_without_tls():
    env = {"OFFLOAD_COMPUTE_ADDRESS": "0.0.0.0:50999", "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-m", "compute"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "without TLS" in result.stderr


def test_pool_workers_never_import_grpc(compute):
    """Workers fork from the forkserver, which preloads compute.worker only."""
    wait_until(lambda: len(compute.worker_pids()) == 2, 10, message="two workers")
    for pid in compute.worker_pids():
        maps = open(f"/proc/{pid}/maps").read()
        assert "cygrpc" not in maps, f"worker {pid} has grpc loaded"


@pytest.mark.parametrize("module", ["compute.operations", "compute.jobs.batch_search", "tests.operations_testing"])
def test_modules_of_heavy_operations_stay_light(module):
    """Pool workers import the modules of heavy operations (to unpickle the function): those
    must not bring grpc, settings or metrics into a worker."""
    code = (
        f"import sys, {module}; "
        "print(sorted(m for m in ('grpc', 'pydantic_settings', 'prometheus_client') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]", f"{module} imports {result.stdout.strip()}"


def test_a_plaintext_health_only_port_for_kubernetes_probes(compute_factory):
    """OFFLOAD_COMPUTE_HEALTH_ADDRESS: grpc.health.v1 alone, without TLS (what the kubelet's
    gRPC probe dials), following the main server's status; nothing else is served there."""
    import socket

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from offload.v1 import compute_pb2, compute_pb2_grpc

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    compute = compute_factory(health_address=f"127.0.0.1:{port}")
    [ready] = [r for r in compute.log_records() if r.get("msg") == "compute ready"]
    assert ready["health_port"] == port
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        check = health_pb2_grpc.HealthStub(channel).Check
        assert check(health_pb2.HealthCheckRequest(service=""), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as caught:
            compute_pb2_grpc.ComputeServiceStub(channel).GetItem(compute_pb2.GetItemRequest(id="item-1"), timeout=5)
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
        compute.signal(15)  # SIGTERM: draining is NOT_SERVING on this port too, before it closes
        def not_serving() -> bool:
            try:
                return check(health_pb2.HealthCheckRequest(service=""), timeout=1).status != health_pb2.HealthCheckResponse.SERVING
            except grpc.RpcError:
                return True
        wait_until(not_serving, 10, 0.02, "NOT_SERVING (or gone) after SIGTERM")
