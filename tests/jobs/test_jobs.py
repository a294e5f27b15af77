"""Jobs over gRPC against a real compute: results, events, validation, ids, idempotency, listing."""

from __future__ import annotations

import concurrent.futures
import secrets

import grpc
import numpy as np
import pytest

from offload.v1 import jobs_pb2
from tests.jobs.helpers import (
    TERMINAL,
    all_results,
    assert_matches,
    code_of,
    get,
    reference,
    stub,
    submit_ids,
    wait_state,
)


def test_vectors_job_events_and_result_match_numpy(jobs_compute, table):
    rng = np.random.default_rng(3)
    queries = rng.standard_normal((37, 16)).astype(np.float32)
    spec = jobs_pb2.BatchSearchSpec(k=6, vectors=[jobs_pb2.Vector(values=q.tolist()) for q in queries])
    job = stub(jobs_compute).SubmitJob(jobs_pb2.SubmitJobRequest(batch_search=spec), timeout=10)
    assert job.state in (jobs_pb2.QUEUED, jobs_pb2.RUNNING) and job.type == "batch_search"
    assert job.progress.total == 37 and len(job.id) == 24

    events = list(stub(jobs_compute).WatchJob(jobs_pb2.WatchJobRequest(id=job.id), timeout=30))
    sequences = [event.sequence for event in events]
    assert sequences == sorted(set(sequences)), "event sequences strictly increase"
    done = [event.job.progress.done for event in events]
    assert done == sorted(done), "progress never goes back"
    assert events[-1].job.state == jobs_pb2.SUCCEEDED
    assert [e for e in events if e.job.state in TERMINAL] == [events[-1]], "one terminal event, the last"
    assert events[-1].job.progress.done == 37 and events[-1].job.result_count == 37
    assert not events[-1].job.HasField("result"), "events carry no result: GetJob pages it"

    final = get(jobs_compute, job.id)
    assert final.attempts == 1 and final.end_time.ToNanoseconds() >= final.start_time.ToNanoseconds()
    assert final.expire_time.ToNanoseconds() > final.end_time.ToNanoseconds()
    assert_matches(all_results(jobs_compute, job.id, page=5), reference(table, queries, 6))

    # Resuming after a sequence number replays only what came later.
    resumed = list(stub(jobs_compute).WatchJob(jobs_pb2.WatchJobRequest(id=job.id, after_sequence=sequences[-2]), timeout=10))
    assert [e.sequence for e in resumed] == [sequences[-1]]
    assert list(stub(jobs_compute).WatchJob(jobs_pb2.WatchJobRequest(id=job.id, after_sequence=sequences[-1]), timeout=10)) == []


def test_item_ids_job_matches_numpy(jobs_compute, table):
    ids = [f"item-{i}" for i in range(0, 2000, 97)]
    job = submit_ids(jobs_compute, ids, k=4)
    final = wait_state(jobs_compute, job.id, TERMINAL)
    assert final.state == jobs_pb2.SUCCEEDED, final.error
    queries = np.stack([table.vectors[table.row_of(item_id)] for item_id in ids])
    results = all_results(jobs_compute, job.id, page=1000)
    assert_matches(results, reference(table, queries, 4))
    assert [entry[0][0] for entry in results] == ids  # an item is its own best match


def test_result_pages_are_bounded_and_checked(jobs_compute):
    job = submit_ids(jobs_compute, [f"item-{i}" for i in range(30)], k=1)
    wait_state(jobs_compute, job.id, {jobs_pb2.SUCCEEDED})
    assert len(get(jobs_compute, job.id, result_offset=25, result_limit=100).result.batch_search.results) == 5
    assert len(get(jobs_compute, job.id, result_offset=30).result.batch_search.results) == 0
    assert len(get(jobs_compute, job.id).result.batch_search.results) == 30  # default page (100)
    assert code_of(stub(jobs_compute).GetJob, jobs_pb2.GetJobRequest(id=job.id, result_offset=-1)) == grpc.StatusCode.INVALID_ARGUMENT


def _vectors(*rows):
    return [jobs_pb2.Vector(values=row) for row in rows]


@pytest.mark.parametrize(
    "spec, fragment",
    [
        (jobs_pb2.BatchSearchSpec(k=0, item_ids=["item-1"]), "batch_search.k: value is required"),  # the proto's rules
        (jobs_pb2.BatchSearchSpec(k=1001, item_ids=["item-1"]), "batch_search.k: must be greater than or equal to 1 and less"),
        (jobs_pb2.BatchSearchSpec(k=600, item_ids=["item-1"]), "batch_search.k must be at most 500 (max_k)"),  # compute's
        (jobs_pb2.BatchSearchSpec(k=3), "batch_search: one of vectors, item_ids must be set"),
        (jobs_pb2.BatchSearchSpec(k=3, item_ids=["item-1"], vectors=_vectors([1.0] * 16)), "only one of vectors, item_ids can be set"),
        (jobs_pb2.BatchSearchSpec(k=3, vectors=_vectors([1.0] * 16, [1.0] * 15)), "vectors[1] must have 16 values"),
        (jobs_pb2.BatchSearchSpec(k=3, vectors=_vectors([1.0] * 16, [float("nan")] + [1.0] * 15)), "vectors[1] contains NaN"),
        (jobs_pb2.BatchSearchSpec(k=3, vectors=_vectors([float("inf")] * 16)), "vectors[0] contains NaN or Infinity"),
        (jobs_pb2.BatchSearchSpec(k=3, vectors=_vectors([1.0] * 16, [0.0] * 16)), "vectors[1] has zero length"),
        (jobs_pb2.BatchSearchSpec(k=3, item_ids=["item-1", "no-such-item"]), "item_ids[1] is not a known item"),
        (jobs_pb2.BatchSearchSpec(k=3, item_ids=["item-1", "x" * 10_000]), "batch_search.item_ids[1]: must be at most 256 characters"),
        (jobs_pb2.BatchSearchSpec(k=3, item_ids=["item-1", "item-\0"]), "item_ids[1] is not a known item"),
        (jobs_pb2.BatchSearchSpec(k=3, item_ids=[f"item-{i}" for i in range(501)]), "at most 500 queries"),
    ],
)
def test_submit_validation(jobs_compute, spec, fragment):
    with pytest.raises(grpc.RpcError) as info:
        stub(jobs_compute).SubmitJob(jobs_pb2.SubmitJobRequest(batch_search=spec), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in info.value.details()
    assert "no-such-item" not in info.value.details() and "xxxx" not in info.value.details()


def test_submit_needs_a_spec_and_a_sane_key(jobs_compute):
    for request in (
        jobs_pb2.SubmitJobRequest(),
        jobs_pb2.SubmitJobRequest(idempotency_key="k" * 129, batch_search=jobs_pb2.BatchSearchSpec(k=1, item_ids=["item-1"])),
        jobs_pb2.SubmitJobRequest(idempotency_key="a\nb", batch_search=jobs_pb2.BatchSearchSpec(k=1, item_ids=["item-1"])),
    ):
        assert code_of(stub(jobs_compute).SubmitJob, request) == grpc.StatusCode.INVALID_ARGUMENT


HOSTILE_IDS = [
    "../../../etc/passwd",
    "..%2F..%2Fetc%2Fpasswd",
    "x" * 10_000,
    "' OR '1'='1",
    "job\0id",
    "ÿÿÿÿÿÿÿÿÿÿÿÿÿÿÿÿÿÿÿÿÿÿÿÿ",
    "*",
    "%",
    "A" * 24 + "/",
]


@pytest.mark.parametrize("job_id", HOSTILE_IDS + ["", secrets.token_urlsafe(18)])
def test_bad_and_unknown_ids_are_not_found_or_invalid(jobs_compute, job_id):
    s = stub(jobs_compute)
    codes = {
        code_of(s.GetJob, jobs_pb2.GetJobRequest(id=job_id)),
        code_of(s.CancelJob, jobs_pb2.CancelJobRequest(id=job_id)),
        code_of(lambda request, timeout: list(s.WatchJob(request, timeout=timeout)), jobs_pb2.WatchJobRequest(id=job_id)),
    }
    expected = grpc.StatusCode.INVALID_ARGUMENT if not job_id or len(job_id) > 64 else grpc.StatusCode.NOT_FOUND
    assert codes == {expected}


def test_cancel_finished_job_is_failed_precondition(jobs_compute):
    job = submit_ids(jobs_compute, ["item-1"], k=1)
    wait_state(jobs_compute, job.id, {jobs_pb2.SUCCEEDED})
    with pytest.raises(grpc.RpcError) as info:
        stub(jobs_compute).CancelJob(jobs_pb2.CancelJobRequest(id=job.id), timeout=10)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert get(jobs_compute, job.id).state == jobs_pb2.SUCCEEDED


def test_concurrent_idempotent_submits_make_one_job(jobs_compute):
    key = "import-" + secrets.token_hex(8)
    ids = [f"item-{i}" for i in range(40)]
    with concurrent.futures.ThreadPoolExecutor(16) as executor:
        jobs = list(executor.map(lambda _: submit_ids(jobs_compute, ids, k=2, key=key), range(32)))
    assert len({job.id for job in jobs}) == 1
    assert all(job.idempotency_key == key for job in jobs)
    listed = stub(jobs_compute).ListJobs(jobs_pb2.ListJobsRequest(page_size=500), timeout=10).jobs
    assert [job.id for job in listed if job.idempotency_key == key] == [jobs[0].id]
    # The same key with a different spec is refused, not silently answered with the first job.
    with pytest.raises(grpc.RpcError) as info:
        submit_ids(jobs_compute, ids[:5], k=2, key=key)
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS


def test_list_filter_and_pages(compute_factory):
    compute = compute_factory(jobs_chunk_queries=8)
    made = [submit_ids(compute, [f"item-{i}"], k=1).id for i in range(11)]
    for job_id in made:
        wait_state(compute, job_id, {jobs_pb2.SUCCEEDED})
    cancelled = submit_ids(compute, [f"item-{i}" for i in range(50)], k=1)
    stub(compute).CancelJob(jobs_pb2.CancelJobRequest(id=cancelled.id), timeout=10)  # QUEUED or RUNNING: both cancel

    seen, token, pages = [], "", 0
    while True:
        page = stub(compute).ListJobs(jobs_pb2.ListJobsRequest(page_size=4, page_token=token), timeout=10)
        assert len(page.jobs) <= 4
        seen.extend(page.jobs)
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert pages == 3 and [job.id for job in seen] == [cancelled.id, *reversed(made)]  # newest first, no gaps
    by_state = stub(compute).ListJobs(jobs_pb2.ListJobsRequest(state=jobs_pb2.CANCELLED), timeout=10).jobs
    assert [job.id for job in by_state] == [cancelled.id] and by_state[0].state == jobs_pb2.CANCELLED
    assert len(stub(compute).ListJobs(jobs_pb2.ListJobsRequest(state=jobs_pb2.SUCCEEDED), timeout=10).jobs) == 11
    for bad in (
        jobs_pb2.ListJobsRequest(page_token="not-a-token"),
        jobs_pb2.ListJobsRequest(page_token="W1sxLDJdXQ=="),
        jobs_pb2.ListJobsRequest(page_token="x" * 10_000),
        jobs_pb2.ListJobsRequest(state=99),
        jobs_pb2.ListJobsRequest(page_size=-1),
    ):
        assert code_of(stub(compute).ListJobs, bad) == grpc.StatusCode.INVALID_ARGUMENT
    # Cancelling twice is fine; the job keeps its one terminal state.
    again = stub(compute).CancelJob(jobs_pb2.CancelJobRequest(id=cancelled.id), timeout=10)
    assert again.state == jobs_pb2.CANCELLED
