"""The process pool as the servicer sees it: `await pool.run(fn, request, ...)`.

Three parts, one job each:
- compute/executor.py, `ExecutorSupervisor`: the worker processes (build, watch, rebuild
  with backoff after a crash);
- compute/scheduler.py, `Scheduler`: the two lanes of waiting calls, which call a free
  worker takes next, and which calls are batched with it;
- this module, `HealingPool`: admission (at most `max_inflight` interactive calls running
  + waiting; beyond, ResourceExhausted at once, never an unbounded queue), deadlines of
  waiting calls, the cancel flags, and turning a batch's outcomes into each caller's result.

Cancellation: a call owns one flag in a shared control segment per task running it.
Cancelling the awaiting coroutine raises its flags; the worker checks them between chunks,
and the worker's slot stays taken until the worker lets go. Inside a batch, every member
has its own flag and deadline: a member that leaves gets its own error, the others go on.

A segmented operation (batch + merge, e.g. Search) is one task per table segment; the
call's per-segment results are merged on the loop once the last segment is in.

Table generations (a table swap, compute/tables.py): each generation has its own workers,
attached to its table in their initializer. `switch(spec)` starts the new generation's
workers, then makes it the one new calls run on. A call runs on the generation it started
on until it ends, segments included, and never shares a batch with a call of another one.
The old generation is retired once no call runs on it any more: its executor finishes its
running tasks, its workers exit, and then `on_retired(spec)` lets the table's owner unlink
its segments. Workers move to the new table between tasks, never during one, because a
worker never changes tables: it is replaced.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol

import numpy as np

from compute import shm, worker
from compute.errors import ComputeError, DeadlineExceeded, ResourceExhausted, Unavailable
from compute.executor import RESTARTING, ExecutorSupervisor, prepare
from compute.scheduler import Batch, Lane, PoolCall, Scheduler
from compute.table import TableSpec
from offload.context import RequestContext

if TYPE_CHECKING:
    from offload.tracing import Tracing

__all__ = ["GenerationRetired", "HealingPool", "Lane", "PoolStats", "BatchingStats", "prepare"]

log = logging.getLogger("compute.pool")

NOT_STARTED = "the deadline passed while queued; the work was not started"
PASSED_WHILE_RUNNING = "the deadline passed while the work was running"


class GenerationRetired(Unavailable):
    """The call named a table generation that was replaced (and has no workers any more)."""


@dataclass(slots=True)
class BatchingStats:
    """Per heavy operation, since start."""

    calls: int = 0  # calls handed to a worker
    batched_calls: int = 0  # of which, in a batch of two or more
    batches: int = 0  # worker tasks that ran a batch of two or more
    largest_batch: int = 0
    queue_wait_seconds: float = 0.0  # summed over calls


@dataclass(frozen=True, slots=True)
class PoolStats:
    size: int
    busy: int
    queued: int
    max_inflight: int
    rebuilds: int
    healthy: bool
    max_batch: int
    operations: dict[str, BatchingStats]


class DispatchObserver(Protocol):
    """Told of every worker task as it starts (compute/metrics.py implements it)."""

    def dispatched(self, operation: str, size: int, queue_waits: list[float], newly_batched: int) -> None:
        """A task of `size` calls starts; `queue_waits`: of the calls it starts for the first
        time; `newly_batched`: calls that share a task with others for the first time."""


class _NoObserver:
    def dispatched(self, operation: str, size: int, queue_waits: list[float], newly_batched: int) -> None:
        pass


@dataclass(eq=False, slots=True)
class _Generation:
    """One table generation's workers, and the calls that run on it."""

    spec: TableSpec
    segments: list[tuple[int, int]]
    supervisor: ExecutorSupervisor
    calls: int = 0  # pool calls started on it and not finished
    retiring: bool = False


class HealingPool:
    """`await start()` once, `await run(...)` many times, `await stop()` once (idempotent)."""

    def __init__(
        self,
        *,
        table_spec: TableSpec,
        shm_dir: Path,
        size: int,
        max_inflight: int,
        nice: int,
        log_level: str,
        log_format: str = "auto",
        chunk_rows: int,
        backoff: float,
        backoff_max: float,
        backoff_reset: float,
        max_batch: int = 64,
        max_batch_delay: float = 0.0,
        scan_segments: int = 2,
        jobs_yield_seconds: float = 1.0,
        observer: DispatchObserver | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self.size = size
        self.max_inflight = max_inflight
        self._observer = observer or _NoObserver()
        self._tracing = tracing  # None: off; else a span per member of each task
        self._scheduler = Scheduler(size=size, max_batch=max_batch, max_delay=max_batch_delay, jobs_yield_seconds=jobs_yield_seconds)
        # One flag per (slot, batch position): slot s's members use flags[s * max_batch + i].
        self._flags, self._flags_spec = shm.create(shm_dir, "control", np.uint8, (size * max_batch,))
        self._worker_args = (nice, log_level, chunk_rows, log_format)
        self._healing = (backoff, backoff_max, backoff_reset)
        self._scan_segments, self._chunk_rows = scan_segments, chunk_rows
        self._current = self._generation(table_spec)
        # Every generation with workers: the current one, and old ones whose calls still run.
        self._generations: dict[int, _Generation] = {table_spec.generation: self._current}
        self._retired_rebuilds = 0  # rebuilds of generations since retired (stats count every rebuild)
        self._retiring: set[asyncio.Task[None]] = set()
        self.on_retired: Callable[[TableSpec], None] = lambda spec: None
        self._admitted = 0
        self._operations: dict[str, BatchingStats] = {}
        self._stopped = False

    def _generation(self, spec: TableSpec) -> _Generation:
        backoff, backoff_max, backoff_reset = self._healing
        supervisor = ExecutorSupervisor(
            size=self.size,
            initargs=(spec, self._flags_spec, *self._worker_args),
            backoff=backoff,
            backoff_max=backoff_max,
            backoff_reset=backoff_reset,
            on_rebuilt=self._scheduler.wake,
        )
        return _Generation(spec, _segments(spec.vectors.shape[0], self._scan_segments, self._chunk_rows), supervisor)

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        await self._current.supervisor.start()
        self._scheduler.start(self._run_batch)

    async def stop(self) -> None:
        """Fail waiting calls, ask running tasks to stop, then shut the workers down. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        for call in self._scheduler.stop():
            _fail(call, Unavailable("compute is shutting down; retry shortly"))
        self._flags[:] = worker.CANCEL_REQUESTED
        for task in self._retiring:
            task.cancel()
        await asyncio.gather(*(generation.supervisor.stop() for generation in self._generations.values()))
        shm.unlink(self._flags_spec)

    async def switch(self, spec: TableSpec) -> None:
        """Start workers on table `spec`, then run every new call on it (see the module doc).

        Returns once the switch is made; the old generation retires in the background, and
        `on_retired` is called with its spec once its workers are gone. Raises (and changes
        nothing) if the new workers cannot start.
        """
        if self._stopped:
            raise Unavailable("compute is shutting down")
        if spec.generation in self._generations:
            raise ValueError(f"table generation {spec.generation} already has workers")
        new = self._generation(spec)
        try:
            await new.supervisor.start()
        except BaseException:
            await new.supervisor.stop()
            raise
        if self._stopped:
            await new.supervisor.stop()
            raise Unavailable("compute is shutting down")
        old, self._current = self._current, new
        self._generations[spec.generation] = new
        self._retire_if_unused(old)
        self._scheduler.wake()

    def _retire_if_unused(self, generation: _Generation) -> None:
        if generation is self._current or generation.calls or generation.retiring or self._stopped:
            return
        generation.retiring = True
        task = asyncio.get_running_loop().create_task(self._retire(generation), name=f"offload-pool-retire-g{generation.spec.generation}")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _retire(self, generation: _Generation) -> None:
        # A call that gave up may still have its task running (its flag is raised): shutdown
        # waits for it, so the segments outlive every task that maps them.
        # Not cancel_queued: a task submitted for the last call just before retirement began
        # would be cancelled under its slot (its call's flag is raised: it ends at once anyway).
        await generation.supervisor.stop(cancel_queued=False)
        del self._generations[generation.spec.generation]
        self._retired_rebuilds += generation.supervisor.rebuilds
        log.info("table generation retired", extra={"generation": generation.spec.generation})
        self.on_retired(generation.spec)

    # -- state -----------------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        return self._current.supervisor.healthy

    def stats(self) -> PoolStats:
        return PoolStats(
            self.size,
            self._scheduler.busy,
            self._scheduler.queued,
            self.max_inflight,
            self._retired_rebuilds + sum(g.supervisor.rebuilds for g in self._generations.values()),
            self.healthy,
            self._scheduler.max_batch,
            {name: dataclasses.replace(stats) for name, stats in self._operations.items()},
        )

    def worker_pids(self) -> list[int]:
        return sorted(pid for g in self._generations.values() for pid in g.supervisor.worker_pids())

    # -- running work ----------------------------------------------------------------------

    async def run(
        self,
        fn: Callable[..., Any],
        request: Any,
        *,
        ctx: RequestContext,
        deadline: float | None,
        lane: Lane = Lane.INTERACTIVE,
        batch: Callable[..., Any] | None = None,
        merge: Callable[[list[Any]], Any] | None = None,
        name: str | None = None,
        generation: int | None = None,
    ) -> Any:
        """Run `fn(request, task)` in a worker, or `batch([request, ...], task)` together with
        other waiting calls that pass the same `batch`. With `merge` too, the call is scanned
        segment by segment (`task.rows`), batched per segment, and its result is
        `merge([per-segment result, ...])`, on the loop. `deadline` is wall-clock (time.time());
        `name` labels the call in stats and metrics (default: the function's name).
        `generation`: the table generation to run on (default: the current one); a call that
        names one already retired gets Unavailable (retry: it then runs on the current one).

        Raises ResourceExhausted (not admitted), DeadlineExceeded (expired while queued or
        while running), Unavailable (pool restarting, or the worker died), or what the
        operation raised. Cancelling the awaiting coroutine stops the work in the worker.
        """
        table = self._current if generation is None else self._generations.get(generation)
        if table is None or table.retiring:
            raise GenerationRetired(f"table generation {generation} was replaced by {self._current.spec.generation}; retry")
        if not table.supervisor.healthy:
            raise Unavailable(RESTARTING)
        interactive = lane is Lane.INTERACTIVE
        if interactive and self._admitted >= self.max_inflight:
            raise ResourceExhausted("too many heavy calls in flight; retry later", retry_after=1.0)
        loop = asyncio.get_running_loop()
        meta = worker.TaskMeta(ctx.request_id, ctx.traceparent, deadline, -1)  # flags are given per task
        call = PoolCall(name or fn.__name__, fn, batch, request, meta, lane, loop.create_future(), table.spec.generation)
        if batch is not None and merge is not None and self._scheduler.max_batch > 1:
            call.todo, call.segments_left, call.merge = list(range(len(table.segments))), len(table.segments), merge
        if deadline is not None:
            call.expiry = loop.call_later(max(0.0, deadline - time.time()), _expire, call)
        call.future.add_done_callback(self._on_done(call))
        if interactive:
            self._admitted += 1
        table.calls += 1
        try:
            self._scheduler.put(call)
            return await call.future  # cancelling us cancels the future: see _on_done
        finally:
            if interactive:
                self._admitted -= 1
            table.calls -= 1
            if not table.calls and table is not self._current:
                self._retire_if_unused(table)

    def _on_done(self, call: PoolCall) -> Callable[[asyncio.Future], None]:
        def done(future: asyncio.Future) -> None:
            if call.expiry is not None:
                call.expiry.cancel()
            if future.cancelled() or future.exception() is not None:
                for flag in call.flags:  # tasks still running it (cancelled; or failed in another segment)
                    self._flags[flag] = worker.CANCEL_REQUESTED

        return done

    async def _run_batch(self, slot: int, batch: Batch) -> None:
        """Run a batch the scheduler took, on `slot`; set each call's outcome."""
        now = time.time()
        live = []
        for call in batch.calls:
            if not call.waiting:
                continue  # cancelled while a delayed batch filled, or failed in another segment
            if call.meta.deadline is not None and now >= call.meta.deadline:
                _fail(call, DeadlineExceeded(PASSED_WHILE_RUNNING if call.dispatched else NOT_STARTED))
            else:
                live.append(call)
        if not live:
            return
        metas = []
        for index, call in enumerate(live):
            flag = slot * self._scheduler.max_batch + index
            self._flags[flag] = 0
            call.flags.add(flag)
            metas.append(worker.TaskMeta(call.meta.request_id, call.meta.traceparent, call.meta.deadline, flag))
        self._observe(live, time.perf_counter())
        # Its calls are waiting, so their generation has not retired.
        generation = self._generations[batch.generation]
        supervisor = generation.supervisor
        try:
            if batch.segment is not None:
                rows = generation.segments[batch.segment]
                future = supervisor.submit(worker.run_batch, batch.fn, [c.request for c in live], metas, rows)
            elif len(live) == 1:
                future = supervisor.submit(worker.run, live[0].fn, live[0].request, metas[0])
            else:
                future = supervisor.submit(worker.run_batch, batch.fn, [c.request for c in live], metas)
        except ComputeError as exc:
            for call, meta in zip(live, metas):
                call.flags.discard(meta.flag)
                _fail(call, exc)
            return
        submitted_ns = time.time_ns()
        try:
            # The slot's own await, not the callers': a caller that gives up leaves the
            # slot taken until the worker has stopped (its flag is raised in _on_done).
            timed = await future
        except BaseException as exc:
            if self._tracing is not None:
                self._trace(live, batch, submitted_ns, time.time_ns(), None, [type(exc).__name__] * len(live))
            for call, meta in zip(live, metas):
                call.flags.discard(meta.flag)
                _fail(call, exc if isinstance(exc, Exception) else Unavailable(RESTARTING))
            # The task's future cancelled by its executor's shutdown (a pool stopping or a
            # generation retiring), not this slot: the slot goes on.
            slot_cancelled = (task := asyncio.current_task()) is not None and task.cancelling() > 0
            if isinstance(exc, Exception) or (isinstance(exc, asyncio.CancelledError) and not slot_cancelled):
                return
            raise
        outcome = timed.value
        if batch.segment is None and len(live) == 1:
            outcome = [outcome]
        if self._tracing is not None:
            errors = [type(r).__name__ if isinstance(r, BaseException) else None for r in outcome]
            self._trace(live, batch, timed.started_ns, timed.ended_ns, timed.pid, errors)
        for call, meta, result in zip(live, metas, outcome, strict=True):
            call.flags.discard(meta.flag)
            if not call.waiting:
                continue
            if isinstance(result, BaseException):
                call.future.set_exception(result)
            elif batch.segment is None:
                call.future.set_result(result)
            else:
                call.partials.append(result)
                call.segments_left -= 1
                if call.segments_left == 0:
                    _finish(call)

    def _trace(self, calls: list[PoolCall], batch: Batch, start_ns: int, end_ns: int, pid: int | None,
               errors: list[str | None]) -> None:
        """One span per member call (a child of its call's span), with the worker's times (the
        loop's, when the task failed as a whole) and the member's own outcome."""
        attributes = {"offload.pool.batch_size": len(calls)}
        if pid is not None:
            attributes["process.pid"] = pid
        if batch.segment is not None:
            attributes["offload.pool.segment"] = batch.segment
        for call, error in zip(calls, errors):
            self._tracing.record(f"pool {call.name}", call.meta.traceparent, start_ns, end_ns,
                                 {**attributes, "offload.request_id": call.meta.request_id}, error)

    def _observe(self, calls: list[PoolCall], now: float) -> None:
        """Stats count a call once (its first task), a batch per task of two or more calls."""
        name = calls[0].name
        stats = self._operations.get(name)
        if stats is None:
            stats = self._operations[name] = BatchingStats()
        size = len(calls)
        waits, newly_batched = [], 0
        for call in calls:
            if not call.dispatched:
                call.dispatched = True
                waits.append(now - call.queued_at)
            if size > 1 and not call.batched:
                call.batched = True
                newly_batched += 1
        stats.calls += len(waits)
        stats.batched_calls += newly_batched
        stats.queue_wait_seconds += sum(waits)
        if size > 1:
            stats.batches += 1
            stats.largest_batch = max(stats.largest_batch, size)
        self._observer.dispatched(name, size, waits, newly_batched)


def _segments(rows: int, count: int, chunk_rows: int) -> list[tuple[int, int]]:
    """`count` row ranges covering the table, each a whole number of scan chunks (the last may be short)."""
    chunks = -(-rows // chunk_rows)  # ceil
    per = -(-chunks // count) * chunk_rows
    return [(start, min(start + per, rows)) for start in range(0, rows, per)]


def _expire(call: PoolCall) -> None:
    """A call's deadline passed while it waited for a worker: answer now, start nothing more.
    (While a task runs it, the worker sees the deadline itself.)"""
    if call.waiting and not call.flags:
        call.future.set_exception(DeadlineExceeded(PASSED_WHILE_RUNNING if call.dispatched else NOT_STARTED))


def _finish(call: PoolCall) -> None:
    """Every segment is in: the call's result is its merge (on the loop)."""
    try:
        call.future.set_result(call.merge(call.partials))
    except Exception as exc:  # a bug in the merge: the call fails with it (Internal, logged by the call path)
        call.future.set_exception(exc)


def _fail(call: PoolCall, exc: BaseException) -> None:
    if call.waiting:
        call.future.set_exception(exc)
