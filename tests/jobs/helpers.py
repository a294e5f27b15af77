"""Job test helpers: stubs, waiting on job states, the numpy reference for batch search, SQLite peeks."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import grpc
import numpy as np
import psutil

from compute.table import EmbeddingTable, normalised_query
from offload.v1 import compute_pb2_grpc, jobs_pb2
from tests.conftest import wait_until

TERMINAL = {jobs_pb2.SUCCEEDED, jobs_pb2.FAILED, jobs_pb2.CANCELLED}


def stub(compute) -> compute_pb2_grpc.ComputeServiceStub:
    return compute_pb2_grpc.ComputeServiceStub(compute.channel())


def db_path(compute) -> Path:
    return Path(compute.env["OFFLOAD_COMPUTE_JOBS_DB_PATH"])


def submit_ids(compute, ids, k=5, key="") -> jobs_pb2.Job:
    spec = jobs_pb2.BatchSearchSpec(k=k, item_ids=list(ids))
    return stub(compute).SubmitJob(jobs_pb2.SubmitJobRequest(idempotency_key=key, batch_search=spec), timeout=10)


def get(compute, job_id, **kwargs) -> jobs_pb2.Job:
    return stub(compute).GetJob(jobs_pb2.GetJobRequest(id=job_id, **kwargs), timeout=10)


def wait_state(compute, job_id, states, timeout=30.0) -> jobs_pb2.Job:
    seen = {}

    def reached() -> bool:
        seen["job"] = get(compute, job_id)
        return seen["job"].state in states

    wait_until(reached, timeout, 0.05, f"job in {states}")
    return seen["job"]


def code_of(call, *args, **kwargs) -> grpc.StatusCode:
    try:
        call(*args, timeout=10, **kwargs)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def all_results(compute, job_id, page=7) -> list[list[tuple[str, float]]]:
    """Every result entry, read page by page through GetJob."""
    job = get(compute, job_id)
    out = []
    for offset in range(0, job.result_count, page):
        chunk = get(compute, job_id, result_offset=offset, result_limit=page).result.batch_search.results
        assert len(chunk) == min(page, job.result_count - offset)
        out.extend([(hit.id, hit.score) for hit in entry.hits] for entry in chunk)
    return out


def reference(table: EmbeddingTable, queries: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
    """Exact top-k over the whole table in one product: score descending, then id ascending.

    Only rows scoring at least the k-th best score can be in the top k (ties included), so
    sorting those rows gives the same order as sorting all of them, much faster.
    """
    out = []
    units = np.stack([normalised_query(query.tolist(), table.dim) for query in queries])
    for start in range(0, len(units), 64):
        all_scores = units[start : start + 64] @ table.vectors.T
        for scores in all_scores:
            kth = np.partition(scores, scores.shape[0] - k)[scores.shape[0] - k] if k < scores.shape[0] else -np.inf
            candidates = np.nonzero(scores >= kth)[0]
            rows = candidates[np.lexsort((table.ids[candidates], -scores[candidates]))][:k]
            out.append([(table.id_at(row), float(scores[row])) for row in rows])
    return out


def assert_matches(actual, expected) -> None:
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected):
        assert [hit_id for hit_id, _ in got] == [hit_id for hit_id, _ in want]
        np.testing.assert_allclose([s for _, s in got], [s for _, s in want], rtol=0, atol=1e-5)


def cpu_seconds(pids) -> float:
    total = 0.0
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def integrity(path: Path) -> str:
    with sqlite3.connect(path) as conn:
        return conn.execute("PRAGMA integrity_check").fetchone()[0]


def row_count(path: Path, sql: str, *params) -> int:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql, params).fetchone()[0]
    finally:
        conn.close()
