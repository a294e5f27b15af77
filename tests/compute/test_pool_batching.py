"""Dynamic batching in the pool, with a real compute process: calls that wait for a worker
run together, each keeps its own k, deadline and cancellation, and results stay exact."""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest

from compute.table import normalised_query
from offload.testing.v1 import testing_pb2
from offload.v1 import search_pb2
from tests.compute.test_pool_faults import cpu_seconds, idle_after, rid, service, start_spin, stats, stub_testing, wait_log
from tests.compute.test_search import reference
from tests.conftest import metric_sample, wait_until


def table_with_ties(tmp_path, rows: int = 6000, dim: int = 16):
    """Unit vectors where a third of the rows are copies of others (ties with different ids)."""
    rng = np.random.default_rng(21)
    vectors = rng.standard_normal((rows, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    vectors[rng.choice(rows, rows // 3, replace=False)] = vectors[rng.integers(0, rows, rows // 3)]
    vectors[100:700] = vectors[50]  # 601 rows tied with row 50
    ids = [f"doc-{n:05d}" for n in rng.permutation(rows)]
    np.save(tmp_path / "vectors.npy", vectors)
    (tmp_path / "ids.txt").write_text("\n".join(ids) + "\n")
    return vectors, np.array([i.encode() for i in ids])


def operation(compute, method: str):
    return next((op for op in stats(compute).pool.operations if op.method == method), None)


def test_waiting_searches_run_as_one_batch_with_their_own_k_and_exact_results(compute_factory, tmp_path):
    vectors, ids = table_with_ties(tmp_path)
    compute = compute_factory(
        pool_size=1, vectors_path=tmp_path / "vectors.npy", ids_path=tmp_path / "ids.txt", search_chunk_rows=512,
        pool_scan_segments=8,
    )
    occupier, _ = start_spin(compute, 1.0, "occupier")
    rng = np.random.default_rng(5)
    queries = [rng.standard_normal(16).astype(np.float32) for _ in range(4)] + [vectors[50], vectors[3]]
    ks = [1, 10, 1000, 7, 650, 3]
    calls = [
        service(compute).Search.future(search_pb2.SearchRequest(vector=q.tolist(), k=k), metadata=rid(f"search-{n}"), timeout=30)
        for n, (q, k) in enumerate(zip(queries, ks))
    ]
    wait_until(lambda: stats(compute).pool.queued == len(calls), 10, message="the Searches to queue behind the Spin")
    assert occupier.result(timeout=10).finished
    for query, k, call in zip(queries, ks, calls):
        response = call.result(timeout=30)
        expected = reference(vectors, ids, normalised_query(query.tolist(), 16), k)
        assert [hit.id for hit in response.hits] == [ids[row].decode() for row, _ in expected]
        np.testing.assert_allclose([hit.score for hit in response.hits], [s for _, s in expected], rtol=0, atol=1e-6)

    # 6,000 rows in 512-row chunks: 6 segments of 1,024 rows, each scanned once for all six calls.
    search = operation(compute, "Search")
    assert (search.calls, search.batched_calls, search.batches, search.largest_batch) == (6, 6, 6, 6)
    metrics = compute.metrics_text()
    assert metric_sample(metrics, "offload_compute_pool_batch_size_count", method="Search") == 6
    assert metric_sample(metrics, "offload_compute_pool_batch_size_sum", method="Search") == 36
    assert metric_sample(metrics, "offload_compute_pool_calls_total", method="Search") == 6
    assert metric_sample(metrics, "offload_compute_pool_batched_calls_total", method="Search") == 6
    assert metric_sample(metrics, "offload_compute_pool_queue_wait_seconds_count", method="Search") == 6

    # A Search that finds the worker free runs alone: one task per segment, exact all the same.
    response = service(compute).Search(search_pb2.SearchRequest(vector=queries[4].tolist(), k=650), timeout=10)
    expected = reference(vectors, ids, normalised_query(queries[4].tolist(), 16), 650)
    assert [hit.id for hit in response.hits] == [ids[row].decode() for row, _ in expected]
    search = operation(compute, "Search")
    assert (search.calls, search.batched_calls, search.batches) == (7, 6, 6)


def spin_together(compute, seconds: float, request_id: str, timeout: float | None = 60):
    return stub_testing(compute).SpinTogether.future(
        testing_pb2.SpinTogetherRequest(seconds=seconds), metadata=rid(request_id), timeout=timeout
    )


def test_each_member_of_a_batch_leaves_on_its_own_cancel_or_deadline(compute_factory):
    compute = compute_factory(pool_size=1)
    occupier, worker_pid = start_spin(compute, 0.5, "occupier")
    to_cancel = spin_together(compute, 30, "to-cancel")
    to_expire = spin_together(compute, 30, "to-expire", timeout=4.0)
    finishing = spin_together(compute, 1.5, "finishing")
    wait_until(lambda: stats(compute).pool.queued == 3, 5, message="three SpinTogether calls queued")
    assert occupier.result(timeout=10).finished
    started = wait_log(compute, "spin together started")
    assert started["members"] == 3

    time.sleep(0.3)
    assert to_cancel.cancel()
    # The others go on; the cancelled member had left when `finishing` finished.
    reply = finishing.result(timeout=10)
    assert (reply.batch_size, reply.members_at_finish) == (3, 2), "only the cancelled member may have left"
    assert reply.pid == worker_pid

    # The last member's deadline passes: it gets DEADLINE_EXCEEDED, and with no member left
    # the batch stops spending CPU.
    with pytest.raises(grpc.RpcError) as info:
        to_expire.result(timeout=10)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    expired_at, cpu = time.monotonic(), cpu_seconds(worker_pid)
    latency = idle_after(worker_pid, expired_at, cpu)
    print(f"\n[figure] last member's deadline -> batch worker idle: {latency * 1000:.0f} ms")
    assert latency < 2.0
    wait_until(lambda: stats(compute).pool.busy == 0, 5, message="the worker to hand the batch back")
    assert stats(compute).pool.rebuilds == 0
    together = operation(compute, "SpinTogether")
    assert (together.batches, together.largest_batch) == (1, 3)


def test_a_member_whose_deadline_passes_in_the_batch_gets_deadline_exceeded_from_compute(compute_factory):
    """Compute's own answer (not only the client's timer): the member's error comes back from the
    worker while the rest of the batch goes on."""
    compute = compute_factory(pool_size=1)
    occupier, _ = start_spin(compute, 0.5, "occupier")
    # A 1.2 s deadline sent to compute, but the client waits longer for compute's answer.
    short = stub_testing(compute).SpinTogether.future(
        testing_pb2.SpinTogetherRequest(seconds=30), metadata=rid("short"), timeout=1.2
    )
    long = spin_together(compute, 2.0, "long")
    wait_until(lambda: stats(compute).pool.queued == 2, 5, message="two calls queued")
    assert occupier.result(timeout=10).finished
    with pytest.raises(grpc.RpcError) as info:
        short.result(timeout=10)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    reply = long.result(timeout=10)
    assert (reply.batch_size, reply.members_at_finish) == (2, 1)
