"""The shared job store: PostgreSQL, for several compute replicas (compute/jobs/store.py says
what every store does). Chosen by `OFFLOAD_COMPUTE_JOBS_DATABASE_URL`.

- Claims take `FOR UPDATE SKIP LOCKED`: replicas claim different jobs without waiting on
  each other. A claim leases the job to the claiming replica; it renews its leases while it
  runs them, and any replica requeues a job whose lease expired (its replica died).
- Every change to a job sends `NOTIFY offload_jobs, '<job id> <replica>'` in its own
  transaction, so each replica learns at commit what the others did (and skips its own): WatchJob streams on any replica see
  progress made on another, and a cancel made on any replica reaches the one running the job.
- Idempotency keys are a UNIQUE column: two replicas given the same key make one job.
- The schema is versioned (`offload_schema`); migrations run under an advisory lock, so
  replicas starting together migrate once.

psycopg 3, async, with its connection pool; one more connection per replica listens.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable, Iterable

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from compute.jobs.states import STATES
from compute.jobs.store import (
    COLUMNS, PENDING_DELIVERY_MAX_AGE, ChunkPayload, Delivery, JobRecord, TransitionStore,
    StoreUnavailable, WebhookBody, delivery_from, delivery_id, list_query, record_from,
)

log = logging.getLogger("compute.jobs.store")

CHANNEL = "offload_jobs"
_MIGRATION_LOCK = 0x0FF1_0AD  # pg_advisory_xact_lock key: one migrating replica at a time
_STATES = ", ".join(f"'{name}'" for name in STATES)

MIGRATIONS = (
    f"""
    CREATE TABLE jobs (
        id TEXT PRIMARY KEY,
        type TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ({_STATES})),
        spec BYTEA NOT NULL,
        idempotency_key TEXT UNIQUE,
        request_id TEXT NOT NULL,
        traceparent TEXT NOT NULL,
        attempts INTEGER NOT NULL,
        done BIGINT NOT NULL,
        total BIGINT NOT NULL,
        result_count BIGINT NOT NULL,
        error_code TEXT,
        error_message TEXT,
        create_time DOUBLE PRECISION NOT NULL,
        update_time DOUBLE PRECISION NOT NULL,
        start_time DOUBLE PRECISION,
        end_time DOUBLE PRECISION,
        expire_time DOUBLE PRECISION,
        not_before DOUBLE PRECISION NOT NULL,
        sequence BIGINT NOT NULL,
        webhook_url TEXT,
        webhook_events TEXT NOT NULL DEFAULT '',
        lease_owner TEXT,
        lease_expires DOUBLE PRECISION
    );
    CREATE INDEX jobs_by_state ON jobs (state, create_time);
    CREATE INDEX jobs_by_create ON jobs (create_time, id);
    CREATE INDEX jobs_by_expiry ON jobs (expire_time) WHERE expire_time IS NOT NULL;
    CREATE TABLE job_chunks (
        job_id TEXT NOT NULL,
        chunk INTEGER NOT NULL,
        first_entry BIGINT NOT NULL,
        entries BIGINT NOT NULL,
        payload BYTEA NOT NULL,
        PRIMARY KEY (job_id, chunk)
    );
    CREATE TABLE webhook_deliveries (
        id TEXT PRIMARY KEY,
        job_id TEXT NOT NULL,
        url TEXT NOT NULL,
        type TEXT NOT NULL,
        body BYTEA NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('PENDING', 'DELIVERED', 'GAVE_UP')),
        attempts INTEGER NOT NULL,
        last_status INTEGER NOT NULL,
        last_error TEXT,
        last_attempt_time DOUBLE PRECISION,
        next_attempt_time DOUBLE PRECISION NOT NULL,
        create_time DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_time) WHERE state = 'PENDING';
    CREATE INDEX webhook_deliveries_by_job ON webhook_deliveries (job_id, create_time);
    """,
    "ALTER TABLE job_chunks ADD COLUMN generation BIGINT NOT NULL DEFAULT 0;",
)


class PostgresJobStore(TransitionStore):
    """`open()` once, `close()` once (idempotent). Many replicas may share one database."""

    def __init__(self, url: str, *, webhook_body: WebhookBody | None = None, lease: float = 30.0, pool_size: int = 8) -> None:
        self._url = url
        self._webhook_body = webhook_body
        self.lease = lease
        self.owner = uuid.uuid4().hex  # this replica's claims
        self._pool = AsyncConnectionPool(url, min_size=1, max_size=pool_size, open=False,
                                         kwargs={"row_factory": dict_row, "autocommit": True})
        self._listener: asyncio.Task[None] | None = None
        self._callbacks: list[Callable[[str], None]] = []
        self._opened = False

    # -- lifecycle ----------------------------------------------------------------------------

    async def open(self) -> None:
        if self._opened:
            raise RuntimeError("job store already opened")
        self._opened = True
        await self._pool.open(wait=True, timeout=30)
        async with self._transaction() as cur:
            await cur.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            await cur.execute("CREATE TABLE IF NOT EXISTS offload_schema (version INTEGER NOT NULL)")
            await cur.execute("SELECT max(version) AS version FROM offload_schema")
            version = (await cur.fetchone())["version"] or 0
            if version > len(MIGRATIONS):
                raise RuntimeError(f"the job database's schema (version {version}) is newer than this compute knows")
            for number in range(version + 1, len(MIGRATIONS) + 1):
                await cur.execute(MIGRATIONS[number - 1])
                await cur.execute("INSERT INTO offload_schema (version) VALUES (%s)", (number,))
                log.info("job store schema migrated", extra={"version": number})
        self._listener = asyncio.get_running_loop().create_task(self._listen(), name="jobs-listen")

    async def close(self) -> None:
        if not self._opened:
            return
        self._opened = False
        if self._listener is not None:
            self._listener.cancel()
            await asyncio.gather(self._listener, return_exceptions=True)
        await self._pool.close()

    def subscribe(self, callback: Callable[[str], None]) -> None:
        self._callbacks.append(callback)

    async def _listen(self) -> None:
        """LISTEN on a connection of its own; reconnect after a failure (changes made meanwhile
        are still seen: watchers and runners re-read their jobs every second)."""
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(self._url, autocommit=True) as conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    async for note in conn.notifies():
                        job_id, _, writer = note.payload.partition(" ")
                        if writer == self.owner:
                            continue  # this replica's own change: it told its watchers already
                        for callback in self._callbacks:
                            callback(job_id)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("job notifications interrupted; reconnecting", extra={"error": str(exc)})
                await asyncio.sleep(1.0)

    def count_by_state(self) -> dict[str, int]:
        # A short connection of its own: the metrics thread must not use the event loop's pool.
        with psycopg.connect(self._url, connect_timeout=2) as conn:
            return dict(conn.execute("SELECT state, count(*) FROM jobs GROUP BY state").fetchall())

    # -- plumbing -------------------------------------------------------------------------------

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[psycopg.AsyncCursor]:
        """A cursor in one transaction; a failure to reach or write the database is StoreUnavailable."""
        try:
            async with self._pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
                yield cur
        except (psycopg.OperationalError, psycopg.errors.DiskFull, psycopg.errors.ReadOnlySqlTransaction) as exc:
            raise StoreUnavailable(f"the job database is unavailable ({type(exc).__name__}); retry shortly") from exc

    async def _changed(self, cur: psycopg.AsyncCursor, row: dict | None, now: float, progress: bool = False) -> JobRecord | None:
        """Tell the other replicas, and queue the webhook delivery this change fires: both in
        the change's own transaction (NOTIFY is sent at commit)."""
        if row is None:
            return None
        record = record_from(row)
        await cur.execute("SELECT pg_notify(%s, %s)", (CHANNEL, f"{record.id} {self.owner}"))
        event = None if self._webhook_body is None else record.webhook_event(progress)
        if event is not None:
            await cur.execute(
                "INSERT INTO webhook_deliveries (id, job_id, url, type, body, state, attempts, last_status,"
                " next_attempt_time, create_time) VALUES (%s, %s, %s, %s, %s, 'PENDING', 0, 0, %s, %s)"
                " ON CONFLICT (id) DO NOTHING",
                (delivery_id(record), record.id, record.webhook_url, event, self._webhook_body(record, event, now), now, now),
            )
        return record

    async def _one(self, sql: str, params: Iterable[Any]) -> dict | None:
        async with self._transaction() as cur:
            await cur.execute(sql, tuple(params))
            return await cur.fetchone()

    # -- operations -----------------------------------------------------------------------------

    async def submit(self, record: JobRecord, max_queued: int) -> tuple[JobRecord | None, bool]:
        async with self._transaction() as cur:
            await cur.execute("SELECT count(*) AS queued FROM jobs WHERE state = 'QUEUED'")
            if (await cur.fetchone())["queued"] >= max_queued:
                if record.idempotency_key:
                    existing = await self._by_key(cur, record.idempotency_key)
                    if existing is not None:
                        return existing, False
                return None, False
            columns = ", ".join(COLUMNS)
            placeholders = ", ".join(f"%({name})s" for name in COLUMNS)
            await cur.execute(
                f"INSERT INTO jobs ({columns}) VALUES ({placeholders}) ON CONFLICT (idempotency_key) DO NOTHING RETURNING *",
                {name: getattr(record, name) for name in COLUMNS},
            )
            inserted = await cur.fetchone()
            if inserted is not None:
                return record_from(inserted), True
        # The key was taken (by this submit's twin on any replica): that job is the answer.
        async with self._transaction() as cur:
            return await self._by_key(cur, record.idempotency_key or ""), False

    @staticmethod
    async def _by_key(cur: psycopg.AsyncCursor, key: str) -> JobRecord | None:
        await cur.execute("SELECT * FROM jobs WHERE idempotency_key = %s", (key,))
        row = await cur.fetchone()
        return None if row is None else record_from(row)

    async def claim(self, now: float) -> JobRecord | None:
        async with self._transaction() as cur:
            await cur.execute(
                "UPDATE jobs SET state = 'RUNNING', attempts = attempts + 1, start_time = COALESCE(start_time, %s),"
                " update_time = %s, sequence = sequence + 1, lease_owner = %s, lease_expires = %s"
                " WHERE id = (SELECT id FROM jobs WHERE state = 'QUEUED' AND not_before <= %s"
                " ORDER BY create_time LIMIT 1 FOR UPDATE SKIP LOCKED) RETURNING *",
                (now, now, self.owner, now + self.lease, now),
            )
            return await self._changed(cur, await cur.fetchone(), now)

    async def renew(self, now: float) -> int:
        async with self._transaction() as cur:
            await cur.execute(
                "UPDATE jobs SET lease_expires = %s WHERE state = 'RUNNING' AND lease_owner = %s",
                (now + self.lease, self.owner),
            )
            return cur.rowcount

    async def next_due(self) -> float | None:
        row = await self._one("SELECT min(not_before) AS due FROM jobs WHERE state = 'QUEUED'", ())
        return None if row is None else row["due"]

    async def progress(self, job_id: str, index: int, chunk: ChunkPayload, done: int, now: float) -> JobRecord | None:
        async with self._transaction() as cur:
            await cur.execute(
                "UPDATE jobs SET done = %s, result_count = result_count + %s, update_time = %s, sequence = sequence + 1"
                " WHERE id = %s AND state = 'RUNNING' RETURNING *",
                (done, chunk.count, now, job_id),
            )
            row = await cur.fetchone()
            if row is not None:
                await cur.execute(
                    "INSERT INTO job_chunks (job_id, chunk, first_entry, entries, payload, generation)"
                    " VALUES (%s, %s, %s, %s, %s, %s)",
                    (job_id, index, chunk.first, chunk.count, chunk.payload, chunk.generation),
                )
            return await self._changed(cur, row, now, progress=True)

    async def _transition(self, job_id: str, expect: tuple[str, ...], state: str, now: float, values: dict[str, Any],
                          refund_attempt: bool) -> JobRecord | None:
        assignments = "".join(f", {name} = %({name})s" for name in values)
        if refund_attempt:
            assignments += ", attempts = GREATEST(attempts - 1, 0)"
        async with self._transaction() as cur:
            await cur.execute(
                f"UPDATE jobs SET state = %(state)s, update_time = %(now)s, sequence = sequence + 1{assignments}"
                " WHERE id = %(id)s AND state = ANY(%(expect)s) RETURNING *",
                {**values, "state": state, "now": now, "id": job_id, "expect": list(expect)},
            )
            return await self._changed(cur, await cur.fetchone(), now)

    async def chunk_generations(self, job_id: str) -> dict[int, int]:
        async with self._transaction() as cur:
            await cur.execute("SELECT chunk, generation FROM job_chunks WHERE job_id = %s", (job_id,))
            return {row["chunk"]: row["generation"] for row in await cur.fetchall()}

    async def result_chunks(self, job_id: str, offset: int, limit: int) -> list[ChunkPayload]:
        async with self._transaction() as cur:
            await cur.execute(
                "SELECT first_entry, entries, payload, generation FROM job_chunks WHERE job_id = %s"
                " AND first_entry < %s AND first_entry + entries > %s ORDER BY first_entry",
                (job_id, offset + limit, offset),
            )
            return [
                ChunkPayload(r["first_entry"], r["entries"], bytes(r["payload"]), r["generation"]) for r in await cur.fetchall()
            ]

    async def get(self, job_id: str, now: float) -> JobRecord | None:
        row = await self._one("SELECT * FROM jobs WHERE id = %s AND (expire_time IS NULL OR expire_time > %s)", (job_id, now))
        return None if row is None else record_from(row)

    async def list(self, state: str | None, limit: int, after: tuple[float, str] | None, now: float) -> list[JobRecord]:
        sql, params = list_query(state, limit, after, now, "%s")
        async with self._transaction() as cur:
            await cur.execute(sql, params)
            return [record_from(row) for row in await cur.fetchall()]

    async def expire(self, now: float) -> int:
        async with self._transaction() as cur:
            await cur.execute("DELETE FROM job_chunks WHERE job_id IN (SELECT id FROM jobs WHERE expire_time <= %s)", (now,))
            await cur.execute("DELETE FROM jobs WHERE expire_time <= %s", (now,))
            removed = cur.rowcount
            await cur.execute(
                "DELETE FROM webhook_deliveries WHERE job_id NOT IN (SELECT id FROM jobs)"
                " AND (state != 'PENDING' OR create_time <= %s)",
                (now - PENDING_DELIVERY_MAX_AGE,),
            )
            return removed

    async def recover(self, max_attempts: int, ttl: float, now: float) -> tuple[list[str], list[str]]:
        """RUNNING jobs whose lease expired: their replica is gone (a live one renews well before)."""
        reason = f"compute stopped while this job was running, {max_attempts} times: gave up (max attempts)"
        async with self._transaction() as cur:
            await cur.execute(
                "UPDATE jobs SET state = 'FAILED', error_code = 'UNAVAILABLE', error_message = %s, end_time = %s,"
                " expire_time = %s, update_time = %s, sequence = sequence + 1"
                " WHERE id IN (SELECT id FROM jobs WHERE state = 'RUNNING' AND attempts >= %s AND lease_expires < %s"
                " FOR UPDATE SKIP LOCKED) RETURNING *",
                (reason, now, now + ttl, now, max_attempts, now),
            )
            failed = [await self._changed(cur, row, now) for row in await cur.fetchall()]
            await cur.execute(
                "UPDATE jobs SET state = 'QUEUED', not_before = %s, update_time = %s, sequence = sequence + 1,"
                " error_code = 'UNAVAILABLE', error_message = 'compute stopped while this job was running; requeued'"
                " WHERE id IN (SELECT id FROM jobs WHERE state = 'RUNNING' AND lease_expires < %s FOR UPDATE SKIP LOCKED)"
                " RETURNING *",
                (now, now, now),
            )
            requeued = [await self._changed(cur, row, now) for row in await cur.fetchall()]
        return [r.id for r in requeued if r], [r.id for r in failed if r]

    # -- webhook deliveries ------------------------------------------------------------------------

    async def claim_deliveries(self, limit: int, lease: float, exclude: frozenset[str] = frozenset()) -> list[Delivery]:
        now = time.time()
        async with self._transaction() as cur:
            await cur.execute(
                "UPDATE webhook_deliveries SET next_attempt_time = %s WHERE id IN ("
                " SELECT id FROM webhook_deliveries WHERE state = 'PENDING' AND next_attempt_time <= %s"
                " AND NOT (id = ANY(%s)) ORDER BY next_attempt_time LIMIT %s FOR UPDATE SKIP LOCKED) RETURNING *",
                (now + lease, now, list(exclude), limit),
            )
            rows = await cur.fetchall()
        return sorted((_delivery(row) for row in rows), key=lambda d: d.create_time)

    async def next_delivery_due(self) -> float | None:
        row = await self._one("SELECT min(next_attempt_time) AS due FROM webhook_deliveries WHERE state = 'PENDING'", ())
        return None if row is None else row["due"]

    async def record_attempt(
        self, leased: Delivery, state: str, status: int, error: str | None, next_attempt: float, now: float
    ) -> bool:
        async with self._transaction() as cur:
            await cur.execute(
                "UPDATE webhook_deliveries SET state = %s, attempts = attempts + 1, last_status = %s, last_error = %s,"
                " last_attempt_time = %s, next_attempt_time = %s WHERE id = %s AND state = 'PENDING'"
                " AND next_attempt_time = %s",
                (state, status, error, now, next_attempt, leased.id, leased.next_attempt_time),
            )
            return cur.rowcount == 1

    async def deliveries(self, job_id: str, limit: int) -> list[Delivery]:
        async with self._transaction() as cur:
            await cur.execute(
                "SELECT * FROM webhook_deliveries WHERE job_id = %s ORDER BY create_time DESC, id DESC LIMIT %s",
                (job_id, limit),
            )
            return [_delivery(row) for row in await cur.fetchall()]


def _delivery(row: dict) -> Delivery:
    return delivery_from({**row, "body": bytes(row["body"])})
