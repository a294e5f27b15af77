"""Two compute replicas sharing one PostgreSQL job store (a real server, tests/postgres.py):
a job survives the SIGKILL of the replica running it, and any replica answers for any job:
same idempotency key, same job; progress watched on one replica while another runs it; a
cancel on one stops the work on the other."""

from __future__ import annotations

import time

import numpy as np
import psutil
import pytest

from compute.table import EmbeddingTable
from offload.v1 import jobs_pb2
from tests.conftest import kill_orphans, wait_until
from tests.jobs.helpers import TERMINAL, all_results, assert_matches, cpu_seconds, get, reference, stub, submit_ids, wait_state

# Chunks of 0.1-0.3 s each (as in test_durability.py), so a job runs for seconds.
SLOW = {"rows": 200_000, "dim": 32, "search_chunk_rows": 4096, "jobs_chunk_queries": 8, "pool_size": 1}
IDS = [f"item-{i}" for i in range(0, 200_000, 3125)]  # 64 queries: 8 chunks
LEASE = 2.0


@pytest.fixture
def replicas(compute_factory, postgres_database):
    settings = {**SLOW, "jobs_database_url": postgres_database, "jobs_lease_seconds": LEASE}
    return compute_factory(**settings), compute_factory(**settings)


def runner_of(replicas, job_id: str):
    """The replica whose log says it started the job (None yet)."""
    for replica in replicas:
        if any(r.get("msg") == "job started" and r.get("job_id") == job_id for r in replica.log_records()):
            return replica
    return None


@pytest.mark.slow
def test_the_other_replica_finishes_a_job_whose_replica_was_killed(replicas, tmp_path):
    a, b = replicas
    job = submit_ids(a, IDS, k=5)
    wait_until(lambda: runner_of(replicas, job.id) is not None, 30, 0.05, "a replica running the job")
    running = runner_of(replicas, job.id)
    survivor = b if running is a else a
    wait_until(lambda: get(survivor, job.id).progress.done >= 8, 30, 0.05, "a stored chunk (read on the other replica)")

    children = psutil.Process(running.pid).children(recursive=True)
    killed_at = time.monotonic()
    running.kill()  # SIGKILL: no requeue, no lease release
    kill_orphans(children)

    wait_until(lambda: runner_of([survivor], job.id) is not None, 3 * LEASE + 10, 0.05, "the survivor reclaiming it")
    reclaimed = time.monotonic() - killed_at
    final = wait_state(survivor, job.id, TERMINAL, timeout=60)
    assert final.state == jobs_pb2.SUCCEEDED, final.error
    assert final.attempts == 2 and final.progress.done == 64
    assert any(r.get("msg") == "reclaimed the jobs of a compute that is gone" and job.id in r["requeued"]
               for r in survivor.log_records())
    started = [r for r in survivor.log_records() if r.get("msg") == "job started" and r.get("job_id") == job.id]
    assert started[-1]["resumed_chunks"] >= 1, "chunks stored by the dead replica are not recomputed"
    table = EmbeddingTable.build(tmp_path, rows=200_000, dim=32, seed=42)
    queries = np.stack([table.vectors[table.row_of(i)] for i in IDS])
    assert_matches(all_results(survivor, job.id, page=1000), reference(table, queries, 5))
    print(f"dead replica's job reclaimed after {reclaimed:.2f} s (lease {LEASE:g} s)")


@pytest.mark.slow
def test_any_replica_answers_watches_and_cancels_any_job(replicas):
    a, b = replicas
    job = submit_ids(a, [f"item-{i}" for i in range(0, 200_000, 50)], k=3, key="nightly-1")  # 4000 queries: long
    assert submit_ids(b, [f"item-{i}" for i in range(0, 200_000, 50)], k=3, key="nightly-1").id == job.id  # one job
    wait_until(lambda: runner_of(replicas, job.id) is not None, 30, 0.05, "a replica running the job")
    running = runner_of(replicas, job.id)
    other = b if running is a else a

    # Progress made on one replica, streamed by the other (LISTEN/NOTIFY carries the changes).
    seen = []
    for event in stub(other).WatchJob(jobs_pb2.WatchJobRequest(id=job.id), timeout=30):
        seen.append(event)
        if sum(1 for e in seen if e.job.progress.done > 0) >= 3:
            break
    assert [e.sequence for e in seen] == sorted({e.sequence for e in seen})
    assert seen[-1].job.state == jobs_pb2.RUNNING and seen[-1].job.progress.done > 0

    # A cancel on the other replica stops the work where it runs.
    workers = running.worker_pids()
    cancelled = stub(other).CancelJob(jobs_pb2.CancelJobRequest(id=job.id), timeout=10)
    assert cancelled.state == jobs_pb2.CANCELLED
    samples = [cpu_seconds(workers)]

    def idle() -> bool:
        samples.append(cpu_seconds(workers))
        return len(samples) >= 3 and samples[-1] - samples[-3] < 0.01

    wait_until(idle, 5, 0.1, "the running replica's worker idle after a cancel made elsewhere")
    done = get(running, job.id).progress.done
    wait_until(lambda: get(running, job.id).state == jobs_pb2.CANCELLED, 5, 0.05, "CANCELLED everywhere")
    assert get(a, job.id).progress.done == get(b, job.id).progress.done == done  # nothing stored after the cancel
