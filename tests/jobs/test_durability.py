"""Jobs under failure: cancel stops CPU work, worker crashes are retried, compute SIGKILL and
restart recovers, TTL expiry, and a full or read-only job store keeps compute up."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time

import grpc
import numpy as np
import pytest

from compute.table import EmbeddingTable
from offload.v1 import compute_pb2, jobs_pb2, search_pb2
from tests.conftest import wait_until
from tests.jobs.helpers import (
    TERMINAL,
    all_results,
    assert_matches,
    code_of,
    cpu_seconds,
    db_path,
    get,
    integrity,
    reference,
    row_count,
    stub,
    submit_ids,
    wait_state,
)

# A table big enough that each chunk takes a while (about 0.1-0.3 s), checked often for cancel.
SLOW = {"rows": 200_000, "dim": 32, "search_chunk_rows": 4096, "jobs_chunk_queries": 8, "pool_size": 1}
FEW = [f"item-{i}" for i in range(0, 200_000, 3125)]  # 64 queries: 8 chunks


def wait_progress(compute, job_id, minimum=1, timeout=30.0) -> jobs_pb2.Job:
    """Block on WatchJob until the job has done at least `minimum` entries."""
    for event in stub(compute).WatchJob(jobs_pb2.WatchJobRequest(id=job_id), timeout=timeout):
        if event.job.progress.done >= minimum:
            return event.job
        assert event.job.state not in TERMINAL, event.job
    raise AssertionError("the watch ended before any progress")


def test_cancel_mid_run_stops_cpu_work_and_search_still_answers(compute_factory):
    compute = compute_factory(**SLOW)
    job = submit_ids(compute, [f"item-{i}" for i in range(0, 200_000, 50)], k=10)  # 4000 queries, 500 chunks
    running = wait_progress(compute, job.id)
    assert running.state == jobs_pb2.RUNNING and 0 < running.progress.done < running.progress.total

    # Jobs run in the pool's low-priority lane: an interactive Search still gets the worker.
    item = stub(compute).GetItem(compute_pb2.GetItemRequest(id="item-9"), timeout=5)
    hits = stub(compute).Search(search_pb2.SearchRequest(vector=item.vector, k=3), timeout=10).hits
    assert hits[0].id == "item-9"

    workers = compute.worker_pids()
    busy_from = cpu_seconds(workers)
    wait_until(lambda: cpu_seconds(workers) - busy_from > 0.05, 5, 0.02, "the worker burning CPU on the job")
    cancelled_at = time.monotonic()
    cancelled = stub(compute).CancelJob(jobs_pb2.CancelJobRequest(id=job.id), timeout=10)
    assert cancelled.state == jobs_pb2.CANCELLED and time.monotonic() - cancelled_at < 1.0

    samples = [cpu_seconds(workers)]

    def idle() -> bool:
        samples.append(cpu_seconds(workers))
        return len(samples) >= 3 and samples[-1] - samples[-3] < 0.01  # no CPU over the last two samples

    wait_until(idle, 3.0, 0.1, "pool workers idle after cancel")
    idle_after = time.monotonic() - cancelled_at
    final = get(compute, job.id)
    assert final.state == jobs_pb2.CANCELLED and final.end_time.seconds > 0
    assert final.progress.done <= running.progress.total
    done_at_cancel = final.progress.done
    assert get(compute, job.id).progress.done == done_at_cancel  # no chunk finished after the cancel
    print(f"cancel -> workers idle: {idle_after:.2f} s")


def test_worker_killed_mid_chunk_is_retried_with_backoff(compute_factory, tmp_path):
    compute = compute_factory(**SLOW, jobs_backoff_base_seconds=0.2, jobs_backoff_max_seconds=0.4, jobs_max_attempts=3)
    ids = FEW
    job = submit_ids(compute, ids, k=3)
    wait_progress(compute, job.id)
    os.kill(compute.worker_pids()[0], signal.SIGKILL)

    final = wait_state(compute, job.id, TERMINAL, timeout=60)
    assert final.state == jobs_pb2.SUCCEEDED, final.error
    assert final.attempts == 2 and final.progress.done == 64
    retried = [r for r in compute.log_records() if r.get("msg") == "job attempt failed; retrying"]
    assert len(retried) == 1 and 0.0 <= retried[0]["delay_seconds"] <= 0.2  # full jitter below base * 2**0
    assert retried[0]["job_id"] == job.id
    table = EmbeddingTable.build(tmp_path, rows=200_000, dim=32, seed=42)
    queries = np.stack([table.vectors[table.row_of(i)] for i in ids])
    assert_matches(all_results(compute, job.id, page=1000), reference(table, queries, 3))


def test_poison_job_fails_after_max_attempts(compute_factory):
    compute = compute_factory(**SLOW, jobs_backoff_base_seconds=0.05, jobs_backoff_max_seconds=0.1, jobs_max_attempts=2)
    job = submit_ids(compute, [f"item-{i}" for i in range(0, 200_000, 100)], k=3)
    for attempt in (1, 2):
        wait_until(lambda: get(compute, job.id).attempts == attempt and get(compute, job.id).state == jobs_pb2.RUNNING, 30, 0.02)
        wait_until(lambda: compute.worker_pids(), 30, 0.02)
        os.kill(compute.worker_pids()[0], signal.SIGKILL)
    final = wait_state(compute, job.id, TERMINAL, timeout=30)
    assert final.state == jobs_pb2.FAILED and final.attempts == 2
    assert final.error.code == "UNAVAILABLE" and "gave up after 2 attempts" in final.error.message
    compute.wait_serving(30)  # the pool healed; compute serves


def test_sigkill_mid_job_then_restart_finishes_it(compute_factory, tmp_path):
    path = tmp_path / "shared-jobs.sqlite3"
    first = compute_factory(**SLOW, jobs_db_path=str(path))
    ids = FEW
    job = submit_ids(first, ids, k=5)
    wait_progress(first, job.id)
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(10)
    assert integrity(path) == "ok"

    started = time.monotonic()
    second = compute_factory(**SLOW, jobs_db_path=str(path))
    final = wait_state(second, job.id, TERMINAL, timeout=60)
    recovery = time.monotonic() - started
    assert final.state == jobs_pb2.SUCCEEDED, final.error
    assert final.attempts == 2 and final.progress.done == 64
    started_logs = [r for r in second.log_records() if r.get("msg") == "job started"]
    assert started_logs and started_logs[0]["resumed_chunks"] >= 1, "stored chunks are not recomputed"
    assert any(r.get("msg") == "recovered interrupted jobs" and r["requeued"] == [job.id] for r in second.log_records())
    table = EmbeddingTable.build(tmp_path, rows=200_000, dim=32, seed=42)
    queries = np.stack([table.vectors[table.row_of(i)] for i in ids])
    assert_matches(all_results(second, job.id, page=1000), reference(table, queries, 5))
    second.stop()
    assert integrity(path) == "ok"
    print(f"restart -> job finished: {recovery:.2f} s")


def test_sigkill_past_max_attempts_fails_clearly(compute_factory, tmp_path):
    path = tmp_path / "jobs.sqlite3"
    first = compute_factory(**SLOW, jobs_db_path=str(path), jobs_max_attempts=1)
    job = submit_ids(first, FEW, k=5)
    wait_progress(first, job.id)
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(10)
    second = compute_factory(**SLOW, jobs_db_path=str(path), jobs_max_attempts=1)
    final = get(second, job.id)
    assert final.state == jobs_pb2.FAILED and final.error.code == "UNAVAILABLE"
    assert "compute stopped while this job was running" in final.error.message
    assert integrity(path) == "ok"


def test_graceful_stop_requeues_without_spending_an_attempt(compute_factory, tmp_path):
    path = tmp_path / "jobs.sqlite3"
    first = compute_factory(**SLOW, jobs_db_path=str(path))
    job = submit_ids(first, FEW, k=2)
    wait_progress(first, job.id)
    assert first.stop() == 0
    assert row_count(path, "SELECT count(*) FROM jobs WHERE id = ? AND state = 'QUEUED' AND attempts = 0", job.id) == 1
    second = compute_factory(**SLOW, jobs_db_path=str(path))
    final = wait_state(second, job.id, TERMINAL, timeout=60)
    assert final.state == jobs_pb2.SUCCEEDED and final.attempts == 1


def test_second_compute_on_the_same_store_is_refused(compute_factory, tmp_path):
    path = tmp_path / "jobs.sqlite3"
    compute_factory(jobs_db_path=str(path))
    second = compute_factory(start=False, jobs_db_path=str(path))
    second.start(wait=False)
    assert second.proc.wait(30) != 0
    assert "used by another compute process" in second.log_text()


def test_finished_jobs_expire_after_ttl(compute_factory):
    compute = compute_factory(jobs_ttl_seconds=1.0, jobs_sweep_interval_seconds=0.2)
    job = submit_ids(compute, [f"item-{i}" for i in range(20)], k=2)
    final = wait_state(compute, job.id, {jobs_pb2.SUCCEEDED})
    assert final.expire_time.ToNanoseconds() - final.end_time.ToNanoseconds() == pytest.approx(1e9, abs=1e6)
    path = db_path(compute)
    assert row_count(path, "SELECT count(*) FROM job_chunks WHERE job_id = ?", job.id) >= 1
    wait_until(lambda: code_of(stub(compute).GetJob, jobs_pb2.GetJobRequest(id=job.id)) == grpc.StatusCode.NOT_FOUND, 5)
    wait_until(lambda: row_count(path, "SELECT count(*) FROM jobs WHERE id = ?", job.id) == 0, 5)
    assert row_count(path, "SELECT count(*) FROM job_chunks WHERE job_id = ?", job.id) == 0
    # An expired idempotency key is free again.
    assert stub(compute).ListJobs(jobs_pb2.ListJobsRequest(), timeout=10).jobs == []


def test_full_job_store_refuses_submits_but_serves_reads(compute_factory):
    compute = compute_factory(jobs_db_max_bytes=1 << 20)
    spec = jobs_pb2.BatchSearchSpec(k=1, vectors=[jobs_pb2.Vector(values=[float(i + 1)] * 16) for i in range(2000)])
    first = stub(compute).SubmitJob(jobs_pb2.SubmitJobRequest(batch_search=spec), timeout=10)
    error = None
    for _ in range(40):  # ~130 KB per spec: the 1 MiB cap is reached well before 40
        try:
            stub(compute).SubmitJob(jobs_pb2.SubmitJobRequest(batch_search=spec), timeout=10)
        except grpc.RpcError as exc:
            error = exc
            break
    assert error is not None and error.code() == grpc.StatusCode.UNAVAILABLE
    assert "job store is full" in error.details()
    assert get(compute, first.id).id == first.id
    assert stub(compute).ListJobs(jobs_pb2.ListJobsRequest(page_size=1), timeout=10).jobs
    compute.wait_serving(5)
    assert stub(compute).Search(search_pb2.SearchRequest(vector=[1.0] * 16, k=1), timeout=10).hits


def _make_read_only(path):
    """chmod is enough for a normal user; root needs the immutable attribute (ext4 etc.)."""
    if os.geteuid() != 0:
        path.chmod(0o444)
        return lambda: path.chmod(0o644)
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode:
        pytest.skip("cannot make a file read-only for root here (no chattr +i)")
    return lambda: subprocess.run(["chattr", "-i", str(path)], check=True)


def test_read_only_job_store_keeps_compute_up(compute_factory, tmp_path):
    path = tmp_path / "jobs.sqlite3"
    first = compute_factory(jobs_db_path=str(path))
    job = submit_ids(first, [f"item-{i}" for i in range(20)], k=2)
    wait_state(first, job.id, {jobs_pb2.SUCCEEDED})
    assert first.stop() == 0
    restore = _make_read_only(path)
    try:
        second = compute_factory(jobs_db_path=str(path))
        assert get(second, job.id, result_limit=3).result.batch_search.results[0].hits[0].id == "item-0"
        with pytest.raises(grpc.RpcError) as info:
            submit_ids(second, ["item-1"], k=1)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "read-only" in info.value.details()
        assert code_of(stub(second).CancelJob, jobs_pb2.CancelJobRequest(id=job.id)) == grpc.StatusCode.FAILED_PRECONDITION
        second.wait_serving(5)
        second.stop()
    finally:
        restore()
