"""The job store's contract, backend by backend: every change is conditional on the job's
state, so racing operations leave exactly one outcome; deliveries ride along in the outbox.

Every test runs against both backends: SQLite, and a real PostgreSQL server the session starts
(tests/postgres.py)."""

from __future__ import annotations

import asyncio
import time
from typing import Awaitable, Callable

import pytest

from compute.jobs import store as st
from compute.jobs.messages import webhook_body
from compute.jobs.postgres_store import PostgresJobStore
from compute.jobs.sqlite_store import SqliteJobStore

Scenario = Callable[[st.JobStore, Callable[[], st.JobStore]], Awaitable[None]]


@pytest.fixture(params=["sqlite", "postgres"])
def run(request, tmp_path) -> Callable[[Scenario], None]:
    """run(scenario): scenario(store, make) against an opened store of this backend (PostgreSQL:
    a fresh database on the session's server), closed afterwards; `make()` makes another
    instance on the same database (another process, as far as the store can tell)."""
    if request.param == "postgres":
        url = request.getfixturevalue("postgres_database")

        def make() -> st.JobStore:
            return PostgresJobStore(url, webhook_body=webhook_body, lease=5.0)
    else:
        def make() -> st.JobStore:
            return SqliteJobStore(tmp_path / "jobs.sqlite3", max_bytes=1 << 24, webhook_body=webhook_body, lease=5.0)

    def go(scenario: Scenario) -> None:
        async def main() -> None:
            store = make()
            await store.open()
            try:
                await asyncio.wait_for(scenario(store, make), 30)
            finally:
                await store.close()

        asyncio.run(main())

    return go


def record(job_id: str = "job-1", key: str | None = None, webhook: str | None = None, events: str = "",
           now: float | None = None) -> st.JobRecord:
    """A new job, created and due at `now` (default: a second ago, so a claim at time.time() takes it)."""
    now = time.time() - 1 if now is None else now
    return st.JobRecord(
        id=job_id, type="batch_search", state=st.QUEUED, spec=b"spec", idempotency_key=key, request_id="r",
        traceparent="", attempts=0, done=0, total=10, result_count=0, error_code=None, error_message=None,
        create_time=now, update_time=now, start_time=None, end_time=None, expire_time=None, not_before=now,
        sequence=1, webhook_url=webhook, webhook_events=events,
    )  # fmt: skip


def test_submit_is_idempotent_by_key_and_bounded(run):
    async def scenario(store: st.JobStore, make) -> None:
        first, created = await store.submit(record("a", key="k"), max_queued=2)
        again, created_again = await store.submit(record("b", key="k"), max_queued=2)
        assert created and not created_again and again.id == first.id == "a"
        assert (await store.submit(record("c"), max_queued=2))[1]
        full, created_full = await store.submit(record("d"), max_queued=2)
        assert full is None and not created_full  # two already queued

    run(scenario)


def test_claim_progress_succeed_and_the_losers_of_races(run):
    async def scenario(store: st.JobStore, make) -> None:
        await store.submit(record(), 10)
        now = time.time()
        claimed = await store.claim(now)
        assert claimed.state == st.RUNNING and claimed.attempts == 1 and claimed.sequence == 2
        assert await store.claim(now) is None  # nothing else queued
        saved = await store.progress("job-1", 0, st.ChunkPayload(0, 4, b"p0", generation=7), 4, now)
        assert saved.done == 4 and saved.result_count == 4 and saved.sequence == 3
        assert await store.chunk_generations("job-1") == {0: 7}
        assert await store.result_chunks("job-1", 0, 10) == [st.ChunkPayload(0, 4, b"p0", 7)]
        done = await store.succeed("job-1", now, expire_time=now + 60)
        assert done.state == st.SUCCEEDED and done.end_time == now
        # Once finished, nothing else applies: each answers None and changes nothing.
        assert await store.cancel("job-1", now, expire_time=now + 60) is None
        assert await store.fail("job-1", now, "INTERNAL", "x", expire_time=now + 60) is None
        assert await store.requeue("job-1", now, not_before=now) is None
        assert await store.progress("job-1", 1, st.ChunkPayload(4, 4, b"p1"), 8, now) is None
        assert (await store.get("job-1", now)).sequence == 4

    run(scenario)


def test_cancel_wins_over_a_later_success_and_requeue_refunds_or_records(run):
    async def scenario(store: st.JobStore, make) -> None:
        now = time.time()
        for job_id in ("x", "y", "z"):
            await store.submit(record(job_id), 10)
        await store.claim(now)  # x (oldest first)
        cancelled = await store.cancel("x", now, expire_time=now + 60)
        assert cancelled.state == st.CANCELLED
        assert await store.succeed("x", now, expire_time=now + 60) is None
        y = await store.claim(now)
        retried = await store.requeue(y.id, now, not_before=now + 5, error=("UNAVAILABLE", "worker died"))
        assert (retried.state, retried.attempts, retried.error_code, retried.not_before) == (st.QUEUED, 1, "UNAVAILABLE", now + 5)
        assert await store.next_due() <= now  # z is due already, y only later
        z = await store.claim(now)
        refunded = await store.requeue(z.id, now, not_before=now, refund_attempt=True)
        assert refunded.attempts == 0 and refunded.error_code is None

    run(scenario)


def test_recover_requeues_or_fails_what_a_dead_process_left_running(run):
    async def scenario(store: st.JobStore, make) -> None:
        now = time.time()
        await store.submit(record("once", webhook="https://hooks.example/x", events="job.failed"), 10)
        await store.submit(record("often", webhook="https://hooks.example/x", events="job.failed"), 10)
        await store.claim(now)
        often = await store.claim(now)
        for _ in range(2):  # two more attempts of "often": three in all
            await store.requeue(often.id, now, not_before=now)
            often = await store.claim(now)
        assert await store.recover(max_attempts=3, ttl=60, now=now) == ([], [])  # its own, alive: untouched
        assert await store.renew(now) == 2
        await store.close()  # the process that claimed them is gone

        other = make()
        await other.open()
        try:
            later = now + other.lease + 1  # past the lease, which nobody renewed
            requeued, failed = await other.recover(max_attempts=3, ttl=60, now=later)
            assert requeued == ["once"] and failed == ["often"]
            assert (await other.get("often", later)).error_code == "UNAVAILABLE"
            [delivery] = await other.deliveries("often", 5)  # the failure's webhook, in the same transaction
            assert delivery.type == "job.failed" and delivery.state == st.PENDING
            reclaimed = await other.claim(later)
            assert reclaimed.id == "once" and reclaimed.attempts == 2 and reclaimed.lease_owner == other.owner
        finally:
            await other.close()

    run(scenario)


def test_deliveries_are_leased_fenced_and_kept_until_done(run):
    async def scenario(store: st.JobStore, make) -> None:
        now = time.time()
        await store.submit(record("w", webhook="https://hooks.example/x", events="job.progress,job.succeeded"), 10)
        await store.claim(now)
        await store.progress("w", 0, st.ChunkPayload(0, 10, b"p"), 10, now)
        await store.succeed("w", now, expire_time=now)  # expires at once
        claimed = {d.type: d for d in await store.claim_deliveries(10, lease=30)}
        assert set(claimed) == {"job.progress", "job.succeeded"}
        assert await store.claim_deliveries(10, lease=30) == []  # leased
        progress, succeeded = claimed["job.progress"], claimed["job.succeeded"]
        assert await store.record_attempt(progress, st.DELIVERED, 200, None, now, now)
        assert not await store.record_attempt(progress, st.DELIVERED, 200, None, now, now)  # that lease is spent
        assert await store.expire(time.time() + 1) == 1
        left = {d.type: d for d in await store.deliveries("w", 5)}
        assert set(left) == {"job.succeeded"}  # the pending one outlives its job; the delivered one went with it
        assert left["job.succeeded"].state == st.PENDING and succeeded.id == left["job.succeeded"].id

    run(scenario)
