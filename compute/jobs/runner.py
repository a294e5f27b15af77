"""JobService: accepts, claims, runs, retries, cancels and expires jobs; feeds watchers.

- Claiming: up to `jobs_concurrency` jobs run at once, each with up to
  `jobs_chunks_in_flight` chunks (default: one per pool worker) in the pool's JOBS lane.
  Interactive calls get free workers first, and while they arrive the scheduler leaves
  them a worker (compute/scheduler.py); jobs never count against interactive admission.
  Nothing is claimed while the pool is rebuilding.
- Progress: each chunk's results and the new progress are written in one transaction.
  A job requeued after a restart re-plans from its stored spec and skips stored chunks.
- Cancel: a conditional UPDATE to CANCELLED (wins or loses against completion, never both),
  then the job's task is cancelled, which raises the running chunk's cancel flag in the pool.
  The runner also re-reads the state before each chunk (a cancel from elsewhere).
- Retries: Unavailable (a worker died, the pool restarted) requeues the job after a delay
  drawn uniformly from [0, min(max, base * 2 ** (attempt - 1))] (full jitter), up to
  `jobs_max_attempts` attempts; any other error fails the job at once.
- Start-up: jobs left RUNNING by a dead compute are requeued or, past max attempts, failed.
- Watchers get every change pushed (and re-read the row every second, for safety).
- Webhooks: a job submitted with one gets its events queued by the store, in the same
  transaction as the change (compute/jobs/store.py), and POSTed by the WebhookSender.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from typing import TYPE_CHECKING, AsyncIterator

from compute.errors import ComputeError, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted, Unavailable
from compute.jobs import store as st
from compute.jobs import types as job_types
from compute.jobs.messages import webhook_body
from compute.jobs.sqlite_store import SqliteJobStore
from compute.jobs.backoff import Backoff
from compute.jobs.types import Chunk, JobType
from compute.jobs.watchers import JobWatchers
from compute.jobs.webhook_policy import REFUSED, DestinationRefused, DestinationUnresolved, WebhookPolicy
from compute.jobs.webhook_signing import parse_secret

if TYPE_CHECKING:
    from compute.jobs.webhooks import WebhookSender
from compute.pool import GenerationRetired, Lane
from compute.runtime import Runtime
from offload import context
from offload.context import RequestContext
from offload.v1 import jobs_pb2

log = logging.getLogger("compute.jobs")

IDLE_POLL_SECONDS = 1.0


def new_job_id() -> str:
    """24 URL-safe characters, 144 random bits: unguessable."""
    return secrets.token_urlsafe(18)


class JobService:
    """`await start()` once (after the pool), `drain()` then `await stop()` (idempotent)."""

    def __init__(
        self, runtime: Runtime, store: st.JobStore, types: dict[str, JobType], webhooks: WebhookSender | None = None
    ) -> None:
        settings = runtime.settings
        self.runtime = runtime
        self.store = store
        self.types = types
        self.webhooks = webhooks  # None: no signing secret configured, webhooks refused at submit
        self.ttl = settings.jobs_ttl_seconds
        self._concurrency = settings.jobs_concurrency
        self._chunks_in_flight = settings.jobs_chunks_in_flight or settings.pool_size
        self._backoff = Backoff(settings.jobs_max_attempts, settings.jobs_backoff_base_seconds, settings.jobs_backoff_max_seconds)
        self._sweep_interval = settings.jobs_sweep_interval_seconds
        self._max_queued = settings.jobs_max_queued
        self._running: dict[str, asyncio.Task[None]] = {}
        self._watchers = JobWatchers(lambda job_id: self.store.get(job_id, time.time()))
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._started = False
        self._draining = False
        self._stopped = False

    @classmethod
    def from_runtime(cls, runtime: Runtime) -> "JobService":
        """The service as the settings describe it: the PostgreSQL store if `jobs_database_url`
        is set, else SQLite; job types from `job_type_modules` + `extra_job_type_modules`."""
        settings = runtime.settings
        body = webhook_body if settings.webhook_secrets else None  # no sender: no deliveries queued
        store: st.JobStore
        if settings.jobs_database_url is not None:
            # Imported only then: psycopg is not loaded by a compute that does not use it.
            from compute.jobs.postgres_store import PostgresJobStore

            store = PostgresJobStore(
                settings.jobs_database_url.get_secret_value(), webhook_body=body, lease=settings.jobs_lease_seconds,
                pool_size=settings.jobs_database_pool_size,
            )
        else:
            store = SqliteJobStore(
                settings.jobs_db_path,
                max_bytes=settings.jobs_db_max_bytes,
                synchronous=settings.jobs_db_synchronous,
                webhook_body=body,
                lease=settings.jobs_lease_seconds,
            )
        webhooks = None
        if settings.webhook_secrets:
            # Imported only when webhooks are on: httpx alone is ~5 MiB of compute's memory.
            from compute.jobs.webhooks import WebhookSender

            webhooks = WebhookSender(
                store,
                WebhookPolicy(
                    settings.webhook_allowlist,
                    allow_public=settings.webhook_allow_public,
                    allow_http=settings.webhook_allow_http,
                ),
                [parse_secret(secret.get_secret_value()) for secret in settings.webhook_secrets],
                Backoff(settings.webhook_max_attempts, settings.webhook_backoff_base_seconds, settings.webhook_backoff_max_seconds),
                timeout=settings.webhook_timeout_seconds,
                concurrency=settings.webhook_concurrency,
            )
        return cls(runtime, store, job_types.collect(settings.served_job_type_modules), webhooks)

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the store, recover interrupted jobs, start claiming. Call once."""
        if self._started:
            raise RuntimeError("JobService already started")
        self._started = True
        await self.store.open()
        try:
            requeued, failed = await self.store.recover(self._backoff.max_attempts, self.ttl, time.time())
            if requeued or failed:
                log.warning("recovered interrupted jobs", extra={"requeued": requeued, "failed": failed})
        except st.StoreUnavailable as exc:
            log.error("cannot recover interrupted jobs: the job store is not writable", extra={"error": exc.message})
        self.store.subscribe(self._changed_elsewhere)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._dispatch()), loop.create_task(self._sweep()), loop.create_task(self._keep_leases())]
        if self.webhooks is not None:
            self.webhooks.start()  # deliveries still owed from before a restart go out now

    def drain(self) -> None:
        """Stop claiming and end watch streams (they resume elsewhere). Idempotent, sync."""
        self._draining = True
        self._wake.set()
        self._watchers.close()

    async def stop(self) -> None:
        """Stop running jobs (requeued, attempt refunded: they resume at next start). Idempotent."""
        if self._stopped or not self._started:
            return
        self._stopped = True
        self.drain()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        running = dict(self._running)
        for task in running.values():
            task.cancel()
        await asyncio.gather(*running.values(), return_exceptions=True)
        now = time.time()
        for job_id in running:
            try:
                await self.store.requeue(job_id, now, not_before=now, refund_attempt=True)
            except ComputeError as exc:
                log.error("could not requeue a job at shutdown", extra={"job_id": job_id, "error": exc.message})
        if self.webhooks is not None:
            await self.webhooks.stop()  # an attempt cut short is due again after its lease
        await self.store.close()

    # -- requests (called by the operations, on the loop) ---------------------------------------

    async def submit(
        self,
        job_type: str,
        spec: bytes,
        idempotency_key: str,
        ctx: RequestContext,
        total: int,
        webhook: tuple[str, list[str]] | None = None,
    ) -> tuple[st.JobRecord, bool]:
        """`webhook`: (url, event types) to call back, checked against the webhook policy first."""
        if self._draining:
            raise Unavailable("compute is shutting down; submit the job again shortly")
        if webhook is not None:
            if self.webhooks is None:
                raise FailedPrecondition("webhooks are off on this compute: it has no signing secret (webhook_secrets)")
            try:
                await self.webhooks.policy.check(webhook[0])
            except DestinationRefused as exc:
                raise InvalidArgument(f"webhook.url: {exc}") from exc
            except DestinationUnresolved as exc:  # the same words: submitters cannot probe which names exist
                raise InvalidArgument(f"webhook.url: {REFUSED}") from exc
        now = time.time()
        record = st.JobRecord(
            id=new_job_id(), type=job_type, state=st.QUEUED, spec=spec, idempotency_key=idempotency_key or None,
            request_id=ctx.request_id, traceparent=ctx.traceparent, attempts=0, done=0, total=total, result_count=0,
            error_code=None, error_message=None, create_time=now, update_time=now, start_time=None, end_time=None,
            expire_time=None, not_before=now, sequence=1,
            webhook_url=webhook[0] if webhook else None, webhook_events=",".join(webhook[1]) if webhook else "",
        )  # fmt: skip
        stored, created = await self.store.submit(record, self._max_queued)
        if stored is None:
            raise ResourceExhausted(f"{self._max_queued} jobs are already queued; retry later", retry_after=5.0)
        if created:
            log.info("job submitted", extra={"job_id": stored.id, "type": job_type, "total": total})
            self._wake.set()
        return stored, created

    async def get(self, job_id: str) -> st.JobRecord:
        record = await self.store.get(job_id, time.time())
        if record is None:
            raise NotFound("no job with this id")
        return record

    async def cancel(self, job_id: str) -> st.JobRecord:
        record = None
        current = await self.get(job_id)  # a finished job needs no write (works on a read-only store)
        if not current.terminal:
            now = time.time()
            # Conditional: if the job finished meanwhile, this changes nothing and the finish stands.
            record = await self.store.cancel(job_id, now, expire_time=now + self.ttl)
        if record is None:
            current = await self.get(job_id)
            if current.state == st.CANCELLED:
                return current  # cancelling twice is fine
            raise FailedPrecondition(f"the job already finished ({current.state}); it cannot be cancelled")
        task = self._running.get(job_id)
        if task is not None:
            task.cancel()  # stops the running chunk in its pool worker
        log.info("job cancelled", extra={"job_id": job_id})
        self._publish(record)
        return record

    async def watch(self, job_id: str, after_sequence: int) -> AsyncIterator[st.JobRecord]:
        """Every change with sequence > after_sequence, ending after a terminal state."""
        await self.get(job_id)  # NOT_FOUND before the stream starts
        async for record in self._watchers.watch(job_id, after_sequence):
            yield record

    def _publish(self, record: st.JobRecord) -> None:
        self._watchers.publish(record)
        if self.webhooks is not None and record.webhook_url:
            self.webhooks.wake()  # the change may have queued a delivery

    # -- claiming and running ----------------------------------------------------------------------

    async def _dispatch(self) -> None:
        while not self._draining:
            self._wake.clear()
            try:
                while len(self._running) < self._concurrency and self.runtime.pool.healthy and not self._draining:
                    record = await self.store.claim(time.time())
                    if record is None:
                        break
                    self._publish(record)
                    self._running[record.id] = asyncio.get_running_loop().create_task(self._run(record))
                due = await self.store.next_due()
            except ComputeError as exc:
                log.error("cannot claim jobs", extra={"error": exc.message})
                due = None
            timeout = IDLE_POLL_SECONDS if due is None else min(IDLE_POLL_SECONDS, max(0.0, due - time.time()))
            if len(self._running) >= self._concurrency or not self.runtime.pool.healthy:
                timeout = IDLE_POLL_SECONDS if self.runtime.pool.healthy else 0.1
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except TimeoutError:
                pass

    async def _run(self, record: st.JobRecord) -> None:
        try:
            # The submitter's request id and trace follow the job into its logs and pool tasks.
            with context.bound(RequestContext(record.request_id, record.traceparent)):
                await self._execute(record)
        except asyncio.CancelledError:
            pass  # cancelled (state already CANCELLED) or stopping (stop() requeues)
        except ComputeError as exc:
            # The store refused a write (full, read-only). Try to fail the job with the reason (an
            # in-place update may still fit); otherwise it stays RUNNING and is recovered at next start.
            log.error("job store write failed while running a job", extra={"job_id": record.id, "error": exc.message})
            try:
                await self._finish_failed(record, exc.code, f"results could not be saved: {exc.message}")
            except ComputeError:
                pass
        except Exception:
            log.exception("job runner failed", extra={"job_id": record.id})
            try:
                await self._finish_failed(record, "INTERNAL", "internal error")
            except ComputeError as exc:
                log.error("could not mark the job failed", extra={"job_id": record.id, "error": exc.message})
        finally:
            self._running.pop(record.id, None)
            self._wake.set()

    async def _execute(self, record: st.JobRecord) -> None:
        job_type = self.types.get(record.type)
        if job_type is None:
            await self._finish_failed(record, "UNIMPLEMENTED", f"job type {record.type!r} is not served by this compute")
            return
        spec = getattr(jobs_pb2.SubmitJobRequest.FromString(record.spec), record.type)
        planned = await self._plan(record, job_type, spec)
        if planned is None:
            return
        generation, chunks = planned
        stored = await self.store.chunk_generations(record.id)
        ctx = RequestContext(record.request_id, record.traceparent)
        log.info("job started", extra={"job_id": record.id, "attempt": record.attempts, "chunks": len(chunks), "resumed_chunks": len(stored)})
        done = sum(chunk.entries for index, chunk in enumerate(chunks) if index in stored)
        todo, first = [], 0
        for index, chunk in enumerate(chunks):
            if index not in stored:
                todo.append((index, first))
            first += chunk.entries
        todo.reverse()  # popped from the end: in order

        tracing = self.runtime.tracing

        def run_chunk(index: int, chunk: Chunk) -> asyncio.Task:
            chunk_ctx, span = ctx, None
            if tracing is not None:  # a span per chunk, child of the submit's: its pool task is the grandchild
                span = tracing.start(f"job chunk {record.type}", record.traceparent, attributes={
                    "offload.job.id": record.id, "offload.job.chunk": index, "offload.job.attempt": record.attempts,
                    "offload.request_id": record.request_id, "offload.table.generation": generation,
                })  # fmt: skip
                chunk_ctx = RequestContext(record.request_id, tracing.traceparent(span))
            call = self.runtime.pool.run(
                job_type.run_chunk, chunk.request, ctx=chunk_ctx, deadline=None, lane=Lane.JOBS, generation=generation
            )
            task = asyncio.ensure_future(call)
            if span is not None:
                task.add_done_callback(lambda t: tracing.end(span, _outcome(t)))
            return task

        # Up to `jobs_chunks_in_flight` chunks in the pool at once (the scheduler keeps a worker
        # for interactive calls while they arrive); each is saved as soon as it is done, with
        # the table generation it ran on. When the table is swapped during the job, the chunks
        # still to run are planned again on the new table (a job records each chunk's generation
        # rather than holding an old table in memory until it ends).
        in_flight: dict[asyncio.Task, tuple[int, int, int]] = {}
        try:
            while todo or in_flight:
                while todo and len(in_flight) < self._chunks_in_flight:
                    current = await self.store.get(record.id, time.time())
                    if current is None or current.state != st.RUNNING:
                        return  # cancelled (possibly by another process) or expired
                    if self.runtime.table.spec.generation != generation:
                        planned = await self._plan(record, job_type, spec, replan_of=chunks)
                        if planned is None:
                            return
                        generation, chunks = planned
                    index, start = todo.pop()
                    in_flight[run_chunk(index, chunks[index])] = (index, start, generation)
                finished, _ = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
                for task in sorted(finished, key=lambda t: in_flight[t][0]):
                    index, start, used = in_flight.pop(task)
                    try:
                        payload = task.result()
                    except GenerationRetired:
                        todo.append((index, start))  # swapped before it started: runs again, on the new table
                        continue
                    except Unavailable as exc:
                        await self._retry_or_fail(record, exc)
                        return
                    except ComputeError as exc:
                        await self._finish_failed(record, exc.code, exc.message)
                        return
                    done += chunks[index].entries
                    saved = st.ChunkPayload(start, chunks[index].entries, payload, used)
                    updated = await self.store.progress(record.id, index, saved, done, time.time())
                    if updated is None:
                        return  # cancelled while the chunk ran
                    self._publish(updated)
                todo.sort(reverse=True)
        finally:
            for task in in_flight:
                task.cancel()  # raises the chunk's cancel flag in its worker
            if in_flight:
                await asyncio.gather(*in_flight, return_exceptions=True)
        now = time.time()
        final = await self.store.succeed(record.id, now, expire_time=now + self.ttl)
        if final is not None:
            log.info("job succeeded", extra={"job_id": record.id, "seconds": round(now - (record.start_time or now), 3)})
            self._publish(final)

    async def _plan(
        self, record: st.JobRecord, job_type: JobType, spec, replan_of: list[Chunk] | None = None
    ) -> tuple[int, list[Chunk]] | None:
        """(table generation, chunks) of the job on the table served now, or None: the job failed
        (its spec no longer plans on this table: e.g. an item id the new table lacks)."""
        runtime = self.runtime.snapshot()  # one table for the whole plan, even if a swap happens meanwhile
        generation = runtime.table.spec.generation
        try:
            chunks = await asyncio.to_thread(job_type.plan, spec, runtime)  # off the loop, as on submit
        except ComputeError as exc:  # e.g. the table changed since the job was submitted
            changed = "" if replan_of is None else f"the table changed to generation {generation} while the job ran: "
            await self._finish_failed(record, exc.code, changed + exc.message)
            return None
        if replan_of is not None:
            if [c.entries for c in chunks] != [c.entries for c in replan_of]:
                await self._finish_failed(record, "FAILED_PRECONDITION", f"the table changed to generation {generation} "
                                          "while the job ran, and the job's chunks no longer match")  # fmt: skip
                return None
            log.info("job planned again on a new table", extra={"job_id": record.id, "generation": generation})
        return generation, chunks

    async def _retry_or_fail(self, record: st.JobRecord, exc: ComputeError) -> None:
        delay = self._backoff.delay(record.attempts)
        if delay is None:
            await self._finish_failed(record, exc.code, f"gave up after {record.attempts} attempts: {exc.message}")
            return
        now = time.time()
        requeued = await self.store.requeue(record.id, now, not_before=now + delay, error=(exc.code, exc.message))
        if requeued is not None:
            log.warning("job attempt failed; retrying", extra={"job_id": record.id, "attempt": record.attempts, "delay_seconds": round(delay, 3), "error": exc.message})
            self._publish(requeued)

    async def _finish_failed(self, record: st.JobRecord, code: str, message: str) -> None:
        now = time.time()
        failed = await self.store.fail(record.id, now, code, message, expire_time=now + self.ttl)
        if failed is not None:
            log.warning("job failed", extra={"job_id": record.id, "code": code, "error": message})
            self._publish(failed)

    async def _keep_leases(self) -> None:
        """Renew this process's claims; requeue the jobs of a process that is gone (another
        replica that died, with a shared store). Every third of a lease."""
        while True:
            await asyncio.sleep(self.store.lease / 3)
            try:
                await self.store.renew(time.time())
                requeued, failed = await self.store.recover(self._backoff.max_attempts, self.ttl, time.time())
                if requeued or failed:
                    log.warning("reclaimed the jobs of a compute that is gone", extra={"requeued": requeued, "failed": failed})
                    self._wake.set()
            except ComputeError as exc:
                log.error("cannot renew or reclaim job leases", extra={"error": exc.message})

    def _changed_elsewhere(self, job_id: str) -> None:
        """Another process changed a job (a shared store): tell this process's watchers, and stop
        the job here if it was cancelled there."""
        asyncio.get_running_loop().create_task(self._refresh(job_id))

    async def _refresh(self, job_id: str) -> None:
        try:
            record = await self.store.get(job_id, time.time())
        except ComputeError:
            return  # watchers re-read their job every second anyway
        if record is None:
            return
        self._watchers.publish(record)
        task = self._running.get(job_id)
        if record.state == st.CANCELLED and task is not None:
            task.cancel()  # stops the running chunk in its pool worker
        if self.webhooks is not None and record.webhook_url:
            self.webhooks.wake()

    async def _sweep(self) -> None:
        while True:
            try:
                removed = await self.store.expire(time.time())
                if removed:
                    log.info("expired finished jobs", extra={"removed": removed})
            except ComputeError as exc:
                log.error("cannot expire jobs", extra={"error": exc.message})
            await asyncio.sleep(self._sweep_interval)


def _outcome(task: asyncio.Task) -> str | None:
    """A finished chunk task's error code for its span (None: it succeeded)."""
    if task.cancelled():
        return "CANCELLED"
    exc = task.exception()
    if exc is None:
        return None
    return exc.code if isinstance(exc, ComputeError) else type(exc).__name__
