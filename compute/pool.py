"""The process pool: admission control, priority, deadlines, cancellation, self-healing.

A stdlib ProcessPoolExecutor does the process work; this class decides what reaches it:

- at most `size` tasks are handed to the executor at once (one per worker). The rest wait
  here, on the loop, in two lanes: interactive calls first, job chunks after. Waiting work
  whose deadline passes is dropped, never started.
- interactive calls are admitted up to `max_inflight` (running + waiting); beyond that,
  ResourceExhausted at once, never an unbounded queue.
- a cancelled call raises the task's flag in a shared control segment; the worker stops at
  its next `task.check()`. The worker slot stays taken until the worker lets go.
- a dead worker breaks a ProcessPoolExecutor for good: the calls it had fail with
  Unavailable (safe to retry) and a new executor is built. Workers only re-attach the
  shared table (milliseconds). Repeated crashes back off exponentially.

Workers come from a forkserver started before gRPC (`prepare()`): they fork from a clean
process that preloaded numpy, never from the gRPC process (grpc#16001).
"""

from __future__ import annotations

import asyncio
import collections
import enum
import logging
import multiprocessing
import multiprocessing.forkserver
import os
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from compute import shm, worker
from compute.errors import DeadlineExceeded, ResourceExhausted, Unavailable
from compute.table import TableSpec
from offload.context import RequestContext

log = logging.getLogger("compute.pool")

BLAS_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS")


class Lane(enum.IntEnum):
    INTERACTIVE = 0  # served first
    JOBS = 1


@dataclass(frozen=True, slots=True)
class PoolStats:
    size: int
    busy: int
    queued: int
    max_inflight: int
    rebuilds: int
    healthy: bool


def prepare(blas_threads: int) -> None:
    """Start the forkserver (call once, before any gRPC object exists).

    The BLAS thread variables are set first so that every worker inherits them.
    """
    for name in BLAS_THREAD_VARIABLES:
        os.environ[name] = str(blas_threads)
    multiprocessing.set_forkserver_preload(["compute.worker"])
    multiprocessing.forkserver.ensure_running()


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
        chunk_rows: int,
        backoff: float,
        backoff_max: float,
        backoff_reset: float,
    ) -> None:
        self.size = size
        self.max_inflight = max_inflight
        self._table_spec = table_spec
        self._shm_dir = shm_dir
        self._nice = nice
        self._log_level = log_level
        self._chunk_rows = chunk_rows
        self._backoff = backoff
        self._backoff_max = backoff_max
        self._backoff_reset = backoff_reset
        self._context = multiprocessing.get_context("forkserver")
        self._executor: ProcessPoolExecutor | None = None
        self._flags: np.ndarray | None = None
        self._flags_spec: shm.ArraySpec | None = None
        self._free_slots: list[int] = list(range(size))
        self._waiters: dict[Lane, collections.deque[asyncio.Future[int]]] = {
            lane: collections.deque() for lane in Lane
        }
        self._admitted = 0
        self._busy = 0
        self._healthy = False
        self._stopping = False
        self._rebuilds = 0
        self._crash_streak = 0
        self._last_crash = 0.0
        self._rebuild_task: asyncio.Task[None] | None = None
        self._watch_task: asyncio.Task[None] | None = None

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Create the control segment and the workers; returns when every worker is up."""
        if self._executor is not None:
            raise RuntimeError("pool already started")
        self._flags, self._flags_spec = shm.create(self._shm_dir, "control", np.uint8, (self.size,))
        self._executor = await self._new_executor()
        self._healthy = True
        self._watch_task = asyncio.get_running_loop().create_task(self._watch(), name="offload-pool-watch")

    async def stop(self) -> None:
        """Ask running tasks to stop, then shut the workers down. Idempotent."""
        self._stopping = True
        self._healthy = False
        for task in (self._rebuild_task, self._watch_task):
            if task is not None:
                task.cancel()
        if self._flags is not None:
            self._flags[:] = worker.CANCEL_REQUESTED
        executor, self._executor = self._executor, None
        if executor is not None:
            await asyncio.to_thread(executor.shutdown, wait=True, cancel_futures=True)
        if self._flags_spec is not None:
            shm.unlink(self._flags_spec)

    async def _new_executor(self) -> ProcessPoolExecutor:
        # Spawning workers blocks for a while: do it off the loop, which keeps serving.
        return await asyncio.to_thread(self._create_executor)

    def _create_executor(self) -> ProcessPoolExecutor:
        """A new executor whose workers all answered a ping; shut down again if they did not."""
        executor = ProcessPoolExecutor(
            max_workers=self.size,
            mp_context=self._context,
            initializer=worker.initialize,
            initargs=(self._table_spec, self._flags_spec, self._nice, self._log_level, self._chunk_rows),
        )
        # `size` pings start every worker now (the executor spawns one per pending task),
        # so the first real call pays nothing.
        try:
            pings = [executor.submit(worker.ping, 0.05) for _ in range(self.size)]
            for ping in pings:
                ping.result(timeout=120)
        except BaseException:
            executor.shutdown(wait=False, cancel_futures=True)
            raise
        return executor

    # -- state -----------------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        return self._healthy

    def stats(self) -> PoolStats:
        queued = sum(len(waiters) for waiters in self._waiters.values())
        return PoolStats(self.size, self._busy, queued, self.max_inflight, self._rebuilds, self._healthy)

    def worker_pids(self) -> list[int]:
        processes = getattr(self._executor, "_processes", None) or {}
        return sorted(processes)

    # -- running work ----------------------------------------------------------------------

    async def run(
        self,
        fn: Callable[..., Any],
        request: Any,
        *,
        ctx: RequestContext,
        deadline: float | None,
        lane: Lane = Lane.INTERACTIVE,
    ) -> Any:
        """Run `fn(request, task)` in a worker. `deadline` is wall-clock (time.time()).

        Raises ResourceExhausted (not admitted), DeadlineExceeded (expired while queued),
        Unavailable (pool restarting, or the worker died), or what the operation raised.
        Cancelling the awaiting coroutine stops the work in the worker.
        """
        if not self._healthy:
            raise Unavailable("the worker pool is restarting; safe to retry shortly")
        interactive = lane is Lane.INTERACTIVE
        if interactive:
            if self._admitted >= self.max_inflight:
                raise ResourceExhausted("too many heavy calls in flight; retry later", retry_after=1.0)
            self._admitted += 1
        try:
            slot = await self._acquire(lane, deadline)
            return await self._run_in_slot(slot, fn, request, ctx, deadline)
        finally:
            if interactive:
                self._admitted -= 1

    async def _run_in_slot(self, slot: int, fn, request, ctx: RequestContext, deadline: float | None) -> Any:
        executor = self._executor
        if not self._healthy or executor is None:
            self._release(slot)
            raise Unavailable("the worker pool is restarting; safe to retry shortly")
        if deadline is not None and time.time() >= deadline:
            self._release(slot)
            raise DeadlineExceeded("the deadline passed while queued; the work was not started")
        assert self._flags is not None
        self._flags[slot] = 0
        meta = worker.TaskMeta(ctx.request_id, ctx.traceparent, deadline, slot)
        try:
            future = asyncio.wrap_future(executor.submit(worker.run, fn, request, meta))
        except (BrokenProcessPool, RuntimeError) as exc:
            self._release(slot)
            self._on_broken(executor)
            raise Unavailable("the worker pool is restarting; safe to retry shortly") from exc
        self._busy += 1
        # The slot is freed when the worker is done with the task, not when the caller
        # stops waiting: a cancelled task keeps its worker until it notices the flag.
        future.add_done_callback(lambda done: self._task_done(slot, executor, done))
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            self._flags[slot] = worker.CANCEL_REQUESTED
            raise
        except BrokenProcessPool as exc:
            raise Unavailable("a pool worker died while running this call; safe to retry") from exc

    def _task_done(self, slot: int, executor: ProcessPoolExecutor, future: asyncio.Future) -> None:
        self._busy -= 1
        if not future.cancelled() and isinstance(future.exception(), BrokenProcessPool):
            self._on_broken(executor)
        self._release(slot)

    async def _acquire(self, lane: Lane, deadline: float | None) -> int:
        if self._free_slots and not any(self._waiters[l] for l in Lane if l <= lane):
            return self._free_slots.pop()
        waiter: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiters[lane].append(waiter)
        timeout = None if deadline is None else max(0.0, deadline - time.time())
        try:
            return await asyncio.wait_for(waiter, timeout)
        except TimeoutError as exc:
            raise DeadlineExceeded("the deadline passed while queued; the work was not started") from exc
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._release(waiter.result())  # handed a slot just as we were cancelled
            raise
        finally:
            try:
                self._waiters[lane].remove(waiter)
            except ValueError:
                pass

    def _release(self, slot: int) -> None:
        for lane in Lane:
            waiters = self._waiters[lane]
            while waiters:
                waiter = waiters.popleft()
                if not waiter.done():
                    waiter.set_result(slot)
                    return
        self._free_slots.append(slot)

    # -- healing ---------------------------------------------------------------------------

    async def _watch(self, every: float = 0.1) -> None:
        """Notice a worker that died while idle (e.g. the OOM killer): no task would tell us,
        and the next call would fail on a broken executor. The executor's own manager thread
        marks it broken as soon as a worker's process ends; rebuild then, not on the next call."""
        while True:
            await asyncio.sleep(every)
            executor = self._executor
            if executor is not None and getattr(executor, "_broken", False):
                self._on_broken(executor)

    def _on_broken(self, executor: ProcessPoolExecutor) -> None:
        if executor is not self._executor or self._stopping or self._rebuild_task is not None:
            return  # already handled, or shutting down
        self._healthy = False
        # The stdlib failed every call of the broken executor and sends its other workers
        # SIGTERM, which they ignore: they would finish tasks whose results nobody can
        # receive (burning CPU, delaying the executor's clean-up). Stop them now.
        for process in list((getattr(executor, "_processes", None) or {}).values()):
            try:
                process.kill()
            except (OSError, ValueError):
                pass  # already gone
        self._rebuild_task = asyncio.get_running_loop().create_task(self._rebuild(executor))

    async def _rebuild(self, broken: ProcessPoolExecutor) -> None:
        now = time.monotonic()
        if now - self._last_crash > self._backoff_reset:
            self._crash_streak = 0
        delay = 0.0 if self._crash_streak == 0 else min(self._backoff_max, self._backoff * 2 ** (self._crash_streak - 1))
        self._crash_streak += 1
        self._last_crash = now
        log.warning("pool worker died; rebuilding the pool", extra={"delay_seconds": delay, "crash_streak": self._crash_streak})
        try:
            await asyncio.sleep(delay)
            await asyncio.to_thread(broken.shutdown, wait=False, cancel_futures=True)
            started = time.perf_counter()
            while not self._stopping:
                try:
                    self._executor = await self._new_executor()
                    break
                except Exception:  # a worker that failed to start or ping: try again, later
                    log.exception("pool rebuild failed; retrying")
                    await asyncio.sleep(min(self._backoff_max, self._backoff * 2**self._crash_streak))
            if self._stopping:
                return
            self._rebuilds += 1
            self._healthy = True
            log.info(
                "pool rebuilt",
                extra={"seconds": round(time.perf_counter() - started, 3), "workers": self.worker_pids()},
            )
        finally:
            self._rebuild_task = None
