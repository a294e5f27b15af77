"""The embedded job store: SQLite in WAL mode, one file, one owner process (compute/jobs/store.py
says what every store does).

One connection, used only by one dedicated thread, so writes never block the event loop and
never contend with each other. A lock file next to the database refuses a second compute.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import fcntl
import logging
import os
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any, Callable, TypeVar

from compute.jobs.states import STATES
from compute.jobs.store import (
    COLUMNS, PENDING_DELIVERY_MAX_AGE, ChunkPayload, Delivery, JobRecord, TransitionStore,
    StoreUnavailable, WebhookBody, delivery_from, delivery_id, list_query, record_from,
)

log = logging.getLogger("compute.jobs.store")

T = TypeVar("T")


# Versioned migrations, applied in order from the database's `PRAGMA user_version`. Version 1
# is the first schema, written with IF NOT EXISTS so that databases made before versioning
# (user_version 0, tables present) pass through it unchanged.
_SCHEMA_V1 = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    type TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ({states})),
    spec BLOB NOT NULL,
    idempotency_key TEXT UNIQUE,
    request_id TEXT NOT NULL,
    traceparent TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    done INTEGER NOT NULL,
    total INTEGER NOT NULL,
    result_count INTEGER NOT NULL,
    error_code TEXT,
    error_message TEXT,
    create_time REAL NOT NULL,
    update_time REAL NOT NULL,
    start_time REAL,
    end_time REAL,
    expire_time REAL,
    not_before REAL NOT NULL,
    sequence INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, create_time);
CREATE INDEX IF NOT EXISTS jobs_by_create ON jobs (create_time, id);
CREATE INDEX IF NOT EXISTS jobs_by_expiry ON jobs (expire_time) WHERE expire_time IS NOT NULL;
CREATE TABLE IF NOT EXISTS job_chunks (
    job_id TEXT NOT NULL,
    chunk INTEGER NOT NULL,
    first_entry INTEGER NOT NULL,
    entries INTEGER NOT NULL,
    payload BLOB NOT NULL,
    PRIMARY KEY (job_id, chunk)
);
"""

_SCHEMA_V1 = _SCHEMA_V1.replace("{states}", ", ".join(f"'{name}'" for name in STATES))

_SCHEMA_V2 = """
ALTER TABLE jobs ADD COLUMN webhook_url TEXT;
ALTER TABLE jobs ADD COLUMN webhook_events TEXT NOT NULL DEFAULT '';
CREATE TABLE webhook_deliveries (
    id TEXT PRIMARY KEY,
    job_id TEXT NOT NULL,
    url TEXT NOT NULL,
    type TEXT NOT NULL,
    body BLOB NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('PENDING', 'DELIVERED', 'GAVE_UP')),
    attempts INTEGER NOT NULL,
    last_status INTEGER NOT NULL,
    last_error TEXT,
    last_attempt_time REAL,
    next_attempt_time REAL NOT NULL,
    create_time REAL NOT NULL
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_time) WHERE state = 'PENDING';
CREATE INDEX webhook_deliveries_by_job ON webhook_deliveries (job_id, create_time);
"""

_SCHEMA_V3 = """
ALTER TABLE jobs ADD COLUMN lease_owner TEXT;
ALTER TABLE jobs ADD COLUMN lease_expires REAL;
"""

_SCHEMA_V4 = """
ALTER TABLE job_chunks ADD COLUMN generation INTEGER NOT NULL DEFAULT 0;
"""

MIGRATIONS = (_SCHEMA_V1, _SCHEMA_V2, _SCHEMA_V3, _SCHEMA_V4)

# A RUNNING job whose owner is gone: one store per database file (the lock file), so any owner
# but this instance is a process that died (or a row from before leases existed).
_ORPHANED = "(lease_owner IS NULL OR lease_owner != ?)"

# SQLite result codes meaning "cannot write now", whatever the statement.
_WRITE_FAILURES = {
    sqlite3.SQLITE_FULL: "the job store is full (disk full or its size cap reached)",
    sqlite3.SQLITE_READONLY: "the job store is read-only",
    sqlite3.SQLITE_IOERR: "the job store had an I/O error",
    sqlite3.SQLITE_CANTOPEN: "the job store cannot be opened for writing",
    sqlite3.SQLITE_BUSY: "the job store is busy",
    sqlite3.SQLITE_LOCKED: "the job store is locked",
    sqlite3.SQLITE_PERM: "the job store refused the write",
}


def _as_unavailable(exc: sqlite3.Error) -> StoreUnavailable | None:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is None:
        return None
    reason = _WRITE_FAILURES.get(code & 0xFF)
    return None if reason is None else StoreUnavailable(f"{reason}; no job changes are accepted for now, reads still work")


class SqliteJobStore(TransitionStore):
    """SQLite in WAL mode. `open()` once, `close()` once (idempotent). Single process owner."""

    def __init__(
        self, path: Path, *, max_bytes: int, synchronous: str = "FULL", webhook_body: WebhookBody | None = None,
        lease: float = 30.0,
    ) -> None:
        """`webhook_body`: builds deliveries' bodies; None (webhooks off) queues none."""
        self.path = path
        self.lease = lease
        self.owner = uuid.uuid4().hex  # this process's claims; any other owner is a dead process
        self._webhook_body = webhook_body
        self._max_bytes = max_bytes
        self._synchronous = synchronous
        self._thread: concurrent.futures.ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None
        self._lock_fd: int | None = None
        self.writable = True

    # -- lifecycle ----------------------------------------------------------------------------

    async def open(self) -> None:
        if self._thread is not None:
            raise RuntimeError("job store already opened")
        self._thread = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="jobs-sqlite")
        await self._call(self._open)

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_fd = _lock_owner(self.path.with_name(self.path.name + ".lock"))
        conn = sqlite3.connect(self.path, isolation_level=None)  # explicit BEGIN/COMMIT below
        conn.row_factory = sqlite3.Row
        self._conn = conn
        conn.execute("PRAGMA busy_timeout = 5000")
        conn.execute(f"PRAGMA synchronous = {self._synchronous}")
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count = {max(16, self._max_bytes // page_size)}")
        try:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode.lower() != "wal":
                log.warning("job store is not in WAL mode", extra={"journal_mode": mode})
            _migrate(conn)
        except sqlite3.Error as exc:
            if _as_unavailable(exc) is None or not self._has_schema():
                raise
            # A read-only or full database still serves reads: compute stays up.
            self.writable = False
            log.error("job store is not writable: jobs can be read, not submitted", extra={"error": str(exc)})

    def _has_schema(self) -> bool:
        assert self._conn is not None
        names = {row[0] for row in self._conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        return {"jobs", "job_chunks"} <= names

    async def close(self) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        await asyncio.get_running_loop().run_in_executor(thread, self._close)
        thread.shutdown(wait=True)

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def count_by_state(self) -> dict[str, int]:
        # Its own read-only connection: the store's connection belongs to its thread, and WAL
        # readers neither wait for nor block the writer.
        conn = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, timeout=1.0)
        try:
            return dict(conn.execute("SELECT state, count(*) FROM jobs GROUP BY state").fetchall())
        finally:
            conn.close()

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        if self._thread is None:
            raise StoreUnavailable("the job store is closed")
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn` in one IMMEDIATE transaction; a failed write becomes StoreUnavailable."""
        conn = self._conn
        assert conn is not None
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = fn(conn)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            unavailable = _as_unavailable(exc)
            if unavailable is None:
                raise
            raise unavailable from exc
        return result

    # -- operations -----------------------------------------------------------------------------

    async def submit(self, record: JobRecord, max_queued: int) -> tuple[JobRecord | None, bool]:
        def run(conn: sqlite3.Connection) -> tuple[JobRecord | None, bool]:
            if record.idempotency_key:
                existing = _one(conn.execute("SELECT * FROM jobs WHERE idempotency_key = ?", (record.idempotency_key,)))
                if existing is not None:
                    return existing, False
            queued = conn.execute("SELECT count(*) FROM jobs WHERE state = 'QUEUED'").fetchone()[0]
            if queued >= max_queued:
                return None, False
            placeholders = ", ".join("?" for _ in COLUMNS)
            conn.execute(f"INSERT INTO jobs ({', '.join(COLUMNS)}) VALUES ({placeholders})", _values(record))
            return record, True

        return await self._call(self._write, run)

    async def claim(self, now: float) -> JobRecord | None:
        def run(conn: sqlite3.Connection) -> JobRecord | None:
            return _one(
                conn.execute(
                    "UPDATE jobs SET state = 'RUNNING', attempts = attempts + 1, start_time = COALESCE(start_time, ?),"
                    " update_time = ?, sequence = sequence + 1, lease_owner = ?, lease_expires = ?"
                    " WHERE id = (SELECT id FROM jobs WHERE state = 'QUEUED' AND not_before <= ?"
                    " ORDER BY create_time LIMIT 1) RETURNING *",
                    (now, now, self.owner, now + self.lease, now),
                )
            )

        return await self._call(self._write, run)

    async def renew(self, now: float) -> int:
        def run(conn: sqlite3.Connection) -> int:
            return conn.execute(
                "UPDATE jobs SET lease_expires = ? WHERE state = 'RUNNING' AND lease_owner = ?", (now + self.lease, self.owner)
            ).rowcount

        return await self._call(self._write, run)

    async def next_due(self) -> float | None:
        def run() -> float | None:
            return self._conn.execute("SELECT min(not_before) FROM jobs WHERE state = 'QUEUED'").fetchone()[0]

        return await self._call(run)

    async def _transition(self, job_id: str, expect: tuple[str, ...], state: str, now: float, values: dict[str, Any],
                          refund_attempt: bool) -> JobRecord | None:
        refund = ", attempts = CASE WHEN attempts > 0 THEN attempts - 1 ELSE 0 END" if refund_attempt else ""
        assignments = "".join(f", {name} = ?" for name in values) + refund
        sql = (
            f"UPDATE jobs SET state = ?, update_time = ?, sequence = sequence + 1{assignments}"
            f" WHERE id = ? AND state IN ({', '.join('?' for _ in expect)}) RETURNING *"
        )
        params = (state, now, *values.values(), job_id, *expect)

        def run(conn: sqlite3.Connection) -> JobRecord | None:
            return self._changed(conn, _one(conn.execute(sql, params)), now)

        return await self._call(self._write, run)

    async def progress(self, job_id: str, index: int, chunk: ChunkPayload, done: int, now: float) -> JobRecord | None:
        def run(conn: sqlite3.Connection) -> JobRecord | None:
            updated = _one(
                conn.execute(
                    "UPDATE jobs SET done = ?, result_count = result_count + ?, update_time = ?, sequence = sequence + 1"
                    " WHERE id = ? AND state = 'RUNNING' RETURNING *",
                    (done, chunk.count, now, job_id),
                )
            )
            if updated is not None:
                conn.execute(
                    "INSERT INTO job_chunks (job_id, chunk, first_entry, entries, payload, generation) VALUES (?, ?, ?, ?, ?, ?)",
                    (job_id, index, chunk.first, chunk.count, chunk.payload, chunk.generation),
                )
            return self._changed(conn, updated, now, progress=True)

        return await self._call(self._write, run)

    async def chunk_generations(self, job_id: str) -> dict[int, int]:
        def run() -> dict[int, int]:
            return dict(self._conn.execute("SELECT chunk, generation FROM job_chunks WHERE job_id = ?", (job_id,)))

        return await self._call(run)

    async def result_chunks(self, job_id: str, offset: int, limit: int) -> list[ChunkPayload]:
        def run() -> list[ChunkPayload]:
            rows = self._conn.execute(
                "SELECT first_entry, entries, payload, generation FROM job_chunks WHERE job_id = ?"
                " AND first_entry < ? AND first_entry + entries > ? ORDER BY first_entry",
                (job_id, offset + limit, offset),
            )
            return [ChunkPayload(*row) for row in rows]

        return await self._call(run)

    async def get(self, job_id: str, now: float) -> JobRecord | None:
        def run() -> JobRecord | None:
            return _one(
                self._conn.execute(
                    "SELECT * FROM jobs WHERE id = ? AND (expire_time IS NULL OR expire_time > ?)", (job_id, now)
                )
            )

        return await self._call(run)

    async def list(self, state: str | None, limit: int, after: tuple[float, str] | None, now: float) -> list[JobRecord]:
        sql, params = list_query(state, limit, after, now, "?")

        def run() -> list[JobRecord]:
            return [_record(row) for row in self._conn.execute(sql, params)]

        return await self._call(run)

    async def expire(self, now: float) -> int:
        def run(conn: sqlite3.Connection) -> int:
            conn.execute("DELETE FROM job_chunks WHERE job_id IN (SELECT id FROM jobs WHERE expire_time <= ?)", (now,))
            removed = conn.execute("DELETE FROM jobs WHERE expire_time <= ?", (now,)).rowcount
            # A pending delivery outlives its job until it is delivered or given up, or (no sender
            # any more: webhooks turned off) until it is PENDING_DELIVERY_MAX_AGE old.
            conn.execute(
                "DELETE FROM webhook_deliveries WHERE job_id NOT IN (SELECT id FROM jobs)"
                " AND (state != 'PENDING' OR create_time <= ?)",
                (now - PENDING_DELIVERY_MAX_AGE,),
            )
            return removed

        return await self._call(self._write, run)

    async def recover(self, max_attempts: int, ttl: float, now: float) -> tuple[list[str], list[str]]:
        def run(conn: sqlite3.Connection) -> tuple[list[str], list[str]]:
            reason = f"compute stopped while this job was running, {max_attempts} times: gave up (max attempts)"
            failed = [
                self._changed(conn, _record(row), now)
                for row in conn.execute(
                    "UPDATE jobs SET state = 'FAILED', error_code = 'UNAVAILABLE', error_message = ?, end_time = ?,"
                    " expire_time = ?, update_time = ?, sequence = sequence + 1"
                    f" WHERE state = 'RUNNING' AND attempts >= ? AND {_ORPHANED} RETURNING *",
                    (reason, now, now + ttl, now, max_attempts, self.owner),
                ).fetchall()
            ]
            requeued = conn.execute(
                "UPDATE jobs SET state = 'QUEUED', not_before = ?, update_time = ?, sequence = sequence + 1,"
                " error_code = 'UNAVAILABLE', error_message = 'compute stopped while this job was running; requeued'"
                f" WHERE state = 'RUNNING' AND {_ORPHANED} RETURNING id",
                (now, now, self.owner),
            ).fetchall()
            return [row[0] for row in requeued], [record.id for record in failed]

        return await self._call(self._write, run)

    def _changed(self, conn: sqlite3.Connection, record: JobRecord | None, now: float, progress: bool = False) -> JobRecord | None:
        """Queue the webhook delivery this change fires, in the change's own transaction: a
        committed change always has its delivery (the outbox pattern)."""
        event = None if record is None or self._webhook_body is None else record.webhook_event(progress)
        if event is not None:
            assert record is not None and record.webhook_url and self._webhook_body is not None
            conn.execute(
                "INSERT INTO webhook_deliveries (id, job_id, url, type, body, state, attempts, last_status,"
                " next_attempt_time, create_time) VALUES (?, ?, ?, ?, ?, 'PENDING', 0, 0, ?, ?)"
                " ON CONFLICT (id) DO NOTHING",
                (delivery_id(record), record.id, record.webhook_url, event, self._webhook_body(record, event, now), now, now),
            )
        return record

    async def claim_deliveries(self, limit: int, lease: float, exclude: frozenset[str] = frozenset()) -> list[Delivery]:
        def run(conn: sqlite3.Connection) -> list[Delivery]:
            now = time.time()  # in the store's thread: a queue before it cannot shorten the lease
            skip = f" AND id NOT IN ({', '.join('?' for _ in exclude)})" if exclude else ""
            rows = conn.execute(
                "UPDATE webhook_deliveries SET next_attempt_time = ? WHERE id IN ("
                f" SELECT id FROM webhook_deliveries WHERE state = 'PENDING' AND next_attempt_time <= ?{skip}"
                " ORDER BY next_attempt_time LIMIT ?) RETURNING *",
                (now + lease, now, *exclude, limit),
            ).fetchall()
            return sorted((_delivery(row) for row in rows), key=lambda d: d.create_time)

        return await self._call(self._write, run)

    async def next_delivery_due(self) -> float | None:
        def run() -> float | None:
            return self._conn.execute(
                "SELECT min(next_attempt_time) FROM webhook_deliveries WHERE state = 'PENDING'"
            ).fetchone()[0]

        return await self._call(run)

    async def record_attempt(
        self, leased: Delivery, state: str, status: int, error: str | None, next_attempt: float, now: float
    ) -> bool:
        def run(conn: sqlite3.Connection) -> bool:
            return conn.execute(
                "UPDATE webhook_deliveries SET state = ?, attempts = attempts + 1, last_status = ?, last_error = ?,"
                " last_attempt_time = ?, next_attempt_time = ? WHERE id = ? AND state = 'PENDING'"
                " AND next_attempt_time = ?",
                (state, status, error, now, next_attempt, leased.id, leased.next_attempt_time),
            ).rowcount == 1

        return await self._call(self._write, run)

    async def deliveries(self, job_id: str, limit: int) -> list[Delivery]:
        def run() -> list[Delivery]:
            rows = self._conn.execute(
                "SELECT * FROM webhook_deliveries WHERE job_id = ? ORDER BY create_time DESC, id DESC LIMIT ?",
                (job_id, limit),
            )
            return [_delivery(row) for row in rows]

        return await self._call(run)

    async def integrity_check(self) -> str:
        return await self._call(lambda: self._conn.execute("PRAGMA integrity_check").fetchone()[0])


def _lock_owner(path: Path) -> int | None:
    """Hold an exclusive lock for this process's lifetime: one compute per SQLite job store."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EROFS, errno.EPERM):
            raise
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            log.warning("cannot create the job store lock file (read-only directory?)", extra={"path": str(path)})
            return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RuntimeError(f"the job store {path.with_suffix('')} is used by another compute process") from None
    return fd


def _migrate(conn: sqlite3.Connection) -> None:
    """Bring the schema to the newest version, one transaction per migration."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > len(MIGRATIONS):
        raise RuntimeError(f"the job store's schema (version {version}) is newer than this compute knows")
    for number in range(version + 1, len(MIGRATIONS) + 1):
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in MIGRATIONS[number - 1].split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {number}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        log.info("job store schema migrated", extra={"version": number})


def _delivery(row: sqlite3.Row) -> Delivery:
    return delivery_from(row)


def _values(record: JobRecord) -> tuple[Any, ...]:
    return tuple(getattr(record, name) for name in COLUMNS)


def _record(row: sqlite3.Row) -> JobRecord:
    return record_from(row)


def _one(cursor: sqlite3.Cursor) -> JobRecord | None:
    row = cursor.fetchone()
    # Drain the cursor: an UPDATE ... RETURNING only completes when every row was read.
    cursor.fetchall()
    return None if row is None else _record(row)
