"""Job persistence: what every job store does, in job operations, and the records it returns.

Two backends implement it: SQLite (compute/jobs/sqlite_store.py, the embedded default: one
file, one compute) and PostgreSQL (compute/jobs/postgres_store.py: several compute replicas
sharing the jobs).

The interface speaks in job operations, not columns: submit (idempotent), claim, progress (a
chunk of results), succeed, fail, cancel, requeue, get, list, expire; leases (renew, recover);
and the webhook outbox's claim_deliveries and record_attempt. Every state change is a
conditional UPDATE (`... WHERE state IN (...)`), so when a cancel and a completion race,
exactly one of them wins and the job has exactly one terminal state. The states themselves are
the proto's (compute/jobs/states.py).

Each row carries a `sequence` bumped by every change: the event number WatchJob streams.

A claimed job is leased to the store instance that claimed it (`owner`): the running process
renews its leases while it works, and `recover` requeues (or, past max attempts, fails) the
RUNNING jobs whose owner is gone, so a dead process's jobs are never stuck RUNNING.

Webhook deliveries are an outbox in the same database: a change that fires an event inserts
its delivery in the change's own transaction, so no committed change loses its callback and a
restart finds every delivery still owed. Schemas are versioned migrations.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, fields
from typing import Any, Callable

from compute.errors import Unavailable
from compute.jobs.states import ACTIVE, CANCELLED, FAILED, QUEUED, RUNNING, STATES, SUCCEEDED, TERMINAL  # noqa: F401 (re-exported)




# Webhook events (the `type` of a Standard Webhooks payload) and delivery states.
TERMINAL_EVENTS = {SUCCEEDED: "job.succeeded", FAILED: "job.failed", CANCELLED: "job.cancelled"}
PROGRESS_EVENT = "job.progress"
PENDING, DELIVERED, GAVE_UP = "PENDING", "DELIVERED", "GAVE_UP"
PENDING_DELIVERY_MAX_AGE = 7 * 86_400.0  # of a pending delivery whose job expired (no sender left)
# Builds a delivery's body from the changed row, its event type and the time: given by the
# job service, so the store stays free of the wire format.
WebhookBody = Callable[["JobRecord", str, float], bytes]


@dataclass(frozen=True, slots=True)
class JobRecord:
    """One row of `jobs`. Times are Unix seconds (float); None when not reached yet."""

    id: str
    type: str
    state: str
    spec: bytes  # the serialized SubmitJobRequest
    idempotency_key: str | None
    request_id: str
    traceparent: str
    attempts: int
    done: int
    total: int
    result_count: int
    error_code: str | None
    error_message: str | None
    create_time: float
    update_time: float
    start_time: float | None
    end_time: float | None
    expire_time: float | None
    not_before: float
    sequence: int
    webhook_url: str | None = None
    webhook_events: str = ""  # comma-separated event types, e.g. "job.succeeded,job.failed"
    lease_owner: str | None = None  # the store instance running it (RUNNING only)
    lease_expires: float | None = None

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    def webhook_event(self, progress: bool) -> str | None:
        """The webhook event this change of the row fires, if the submitter asked for it."""
        if not self.webhook_url:
            return None
        event = PROGRESS_EVENT if progress else TERMINAL_EVENTS.get(self.state)
        return event if event is not None and event in self.webhook_events.split(",") else None


COLUMNS = tuple(f.name for f in fields(JobRecord))
COLUMN_SET = frozenset(COLUMNS)
# What `_transition` may set (besides state, update_time and sequence, always set).
UPDATABLE = frozenset(
    {"attempts", "done", "error_code", "error_message", "start_time", "end_time", "expire_time", "not_before"}
)


@dataclass(frozen=True, slots=True)
class ChunkPayload:
    """Serialized results of one chunk: entries [first, first + count) of the job's result."""

    first: int
    count: int
    payload: bytes
    generation: int = 0  # the table generation it was computed on (0: stored before generations were recorded)


@dataclass(frozen=True, slots=True)
class Delivery:
    """One webhook event for one job, with its retries. `id` is the stable webhook-id."""

    id: str
    job_id: str
    url: str
    type: str
    body: bytes  # fixed when the event happened: every attempt sends the same bytes
    state: str  # PENDING, DELIVERED, GAVE_UP
    attempts: int
    last_status: int  # HTTP status of the last attempt; 0 for none
    last_error: str | None
    last_attempt_time: float | None
    next_attempt_time: float
    create_time: float


DELIVERY_COLUMNS = tuple(f.name for f in fields(Delivery))


class StoreUnavailable(Unavailable):
    """The store cannot write (disk full, read-only, I/O error): reads may still work."""


class JobStore(abc.ABC):
    """What the job service needs from persistence. All methods are coroutines."""

    @abc.abstractmethod
    async def open(self) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def submit(self, record: JobRecord, max_queued: int) -> tuple[JobRecord | None, bool]:
        """Insert; or return the job with the same idempotency key (created=False).

        (None, False) when `max_queued` jobs are already queued.
        """

    # This instance's id (the owner of the jobs it claims) and how long a claim lasts unrenewed.
    owner: str = ""
    lease: float = 30.0

    @abc.abstractmethod
    async def claim(self, now: float) -> JobRecord | None:
        """The oldest QUEUED job due at `now`, moved to RUNNING with attempts + 1, leased to
        this instance until `now + lease`."""

    @abc.abstractmethod
    async def renew(self, now: float) -> int:
        """Extend the leases of this instance's RUNNING jobs to `now + lease`; how many."""

    @abc.abstractmethod
    async def next_due(self) -> float | None:
        """Earliest `not_before` of the queued jobs (None: nothing queued)."""

    # Each change below is conditional on the job's state: the new row, or None when the job was
    # not in a state it applies to (a cancel and a completion race: exactly one wins).

    @abc.abstractmethod
    async def progress(self, job_id: str, index: int, chunk: ChunkPayload, done: int, now: float) -> JobRecord | None:
        """RUNNING: store a chunk's results and the progress, in one transaction."""

    @abc.abstractmethod
    async def succeed(self, job_id: str, now: float, expire_time: float) -> JobRecord | None:
        """RUNNING -> SUCCEEDED."""

    @abc.abstractmethod
    async def fail(self, job_id: str, now: float, code: str, message: str, expire_time: float) -> JobRecord | None:
        """RUNNING -> FAILED, with the reason (a google.rpc code name and a message)."""

    @abc.abstractmethod
    async def cancel(self, job_id: str, now: float, expire_time: float) -> JobRecord | None:
        """QUEUED or RUNNING -> CANCELLED."""

    @abc.abstractmethod
    async def requeue(
        self, job_id: str, now: float, *, not_before: float, error: tuple[str, str] | None = None, refund_attempt: bool = False
    ) -> JobRecord | None:
        """RUNNING -> QUEUED, due at `not_before`: a retry after `error` (code, message), or
        (`refund_attempt`) a job stopped by a shutdown, whose interrupted attempt does not count."""

    @abc.abstractmethod
    async def chunk_generations(self, job_id: str) -> dict[int, int]:
        """Index -> table generation of each stored chunk of the job."""

    @abc.abstractmethod
    async def result_chunks(self, job_id: str, offset: int, limit: int) -> list[ChunkPayload]:
        """The chunks overlapping entries [offset, offset + limit), in order."""

    @abc.abstractmethod
    async def get(self, job_id: str, now: float) -> JobRecord | None:
        """The job, or None (unknown or expired)."""

    @abc.abstractmethod
    async def list(self, state: str | None, limit: int, after: tuple[float, str] | None, now: float) -> list[JobRecord]:
        """Newest first; `after` is the (create_time, id) of the previous page's last job."""

    @abc.abstractmethod
    async def expire(self, now: float) -> int:
        """Delete finished jobs (and results) whose expire_time passed; how many."""

    @abc.abstractmethod
    async def recover(self, max_attempts: int, ttl: float, now: float) -> tuple[list[str], list[str]]:
        """RUNNING jobs whose owner is gone (its lease expired; for a single-owner store, any
        other owner): (requeued ids, failed ids past max attempts). Safe to call often."""

    def subscribe(self, callback: Callable[[str], None]) -> None:
        """Call `callback(job_id)` when another process changed a job (a shared store); the
        default, for a store that only this process writes, never calls it."""

    # -- webhook deliveries: written in the same transaction as the change that fires them ----

    @abc.abstractmethod
    async def claim_deliveries(self, limit: int, lease: float, exclude: frozenset[str] = frozenset()) -> list[Delivery]:
        """Up to `limit` PENDING deliveries due now, oldest first, but those in `exclude` (being
        attempted), leased for `lease` seconds: their `next_attempt_time` is the lease's end, so
        a sender that dies mid-attempt leaves them due again after it."""

    @abc.abstractmethod
    async def next_delivery_due(self) -> float | None:
        """Earliest next attempt of the PENDING deliveries (None: none pending)."""

    @abc.abstractmethod
    async def record_attempt(
        self, leased: Delivery, state: str, status: int, error: str | None, next_attempt: float, now: float
    ) -> bool:
        """One more attempt of `leased` (as claimed): its outcome, the new state and (PENDING)
        when to try again. Only while that lease holds; False (nothing written) once it ran out."""

    @abc.abstractmethod
    async def deliveries(self, job_id: str, limit: int) -> list[Delivery]:
        """A job's deliveries, newest first."""

    @abc.abstractmethod
    def count_by_state(self) -> dict[str, int]:
        """Jobs per state. Plain function, not a coroutine: the metrics thread calls it at scrape
        time, so it must not touch the event loop (the scrape answers while the loop stalls)."""


def delivery_id(record: JobRecord) -> str:
    """Stable per event: the job and the sequence number of the change that fired it."""
    return f"msg_{record.id}_{record.sequence}"


def list_query(state: str | None, limit: int, after: tuple[float, str] | None, now: float, mark: str) -> tuple[str, list[Any]]:
    """The SQL and parameters of `JobStore.list`, with `mark` as the backend's placeholder."""
    where, params = [f"(expire_time IS NULL OR expire_time > {mark})"], [now]
    if state is not None:
        where.append(f"state = {mark}")
        params.append(state)
    if after is not None:
        where.append(f"(create_time < {mark} OR (create_time = {mark} AND id < {mark}))")
        params.extend((after[0], after[0], after[1]))
    params.append(limit)
    return f"SELECT * FROM jobs WHERE {' AND '.join(where)} ORDER BY create_time DESC, id DESC LIMIT {mark}", params


def record_from(row: Any) -> JobRecord:
    """A JobRecord from a row that maps column names to values (any backend). A row from an
    older schema may lack the newer columns: their defaults stand."""
    keys = row.keys()
    return JobRecord(**{name: row[name] for name in keys if name in COLUMN_SET})


def delivery_from(row: Any) -> Delivery:
    return Delivery(**{name: row[name] for name in DELIVERY_COLUMNS})


class TransitionStore(JobStore):
    """The state changes every backend makes alike: each is one conditional UPDATE, which a
    backend writes once, in `_transition`."""

    async def succeed(self, job_id: str, now: float, expire_time: float) -> JobRecord | None:
        return await self._checked(job_id, (RUNNING,), SUCCEEDED, now,
                                   {"end_time": now, "expire_time": expire_time, "error_code": None, "error_message": None})

    async def fail(self, job_id: str, now: float, code: str, message: str, expire_time: float) -> JobRecord | None:
        return await self._checked(job_id, (RUNNING,), FAILED, now,
                                   {"end_time": now, "expire_time": expire_time, "error_code": code, "error_message": message})

    async def cancel(self, job_id: str, now: float, expire_time: float) -> JobRecord | None:
        return await self._checked(job_id, ACTIVE, CANCELLED, now, {"end_time": now, "expire_time": expire_time})

    async def requeue(
        self, job_id: str, now: float, *, not_before: float, error: tuple[str, str] | None = None, refund_attempt: bool = False
    ) -> JobRecord | None:
        values: dict[str, Any] = {"not_before": not_before}
        if error is not None:
            values["error_code"], values["error_message"] = error
        return await self._checked(job_id, (RUNNING,), QUEUED, now, values, refund_attempt)

    async def _checked(self, job_id: str, expect: tuple[str, ...], state: str, now: float, values: dict[str, Any],
                       refund_attempt: bool = False) -> JobRecord | None:
        unknown = set(values) - UPDATABLE
        if unknown or state not in STATES:
            raise ValueError(f"cannot set {sorted(unknown) or state}")
        return await self._transition(job_id, expect, state, now, values, refund_attempt)

    @abc.abstractmethod
    async def _transition(self, job_id: str, expect: tuple[str, ...], state: str, now: float, values: dict[str, Any],
                          refund_attempt: bool) -> JobRecord | None:
        """Set `state` and `values` (and, with `refund_attempt`, one attempt less) only if the
        job is in one of `expect`, in one conditional UPDATE; the new row, or None. The change's
        side effects (webhook outbox, notifications) go in the same transaction."""
