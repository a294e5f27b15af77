"""The supervisor of the pool's worker processes: build, watch, rebuild with backoff.

A stdlib ProcessPoolExecutor does the process work. A dead worker breaks it for good: the
stdlib fails every task it had and refuses new ones. This class notices (the task that saw
it, or a watch for a worker that died idle), kills the broken executor's other workers,
and builds a new executor off the loop; workers only re-attach the shared table
(milliseconds). Repeated crashes back off exponentially.

Workers come from a forkserver started before gRPC (`prepare()`): they fork from a clean
process that preloaded numpy, never from the gRPC process (grpc#16001).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import multiprocessing.forkserver
import os
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable

from compute import shm, worker
from compute.errors import Unavailable

log = logging.getLogger("compute.pool")

BLAS_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS")

RESTARTING = "the worker pool is restarting; safe to retry shortly"


def prepare(blas_threads: int) -> None:
    """Start the forkserver (call once, before any gRPC object exists).

    The BLAS thread variables are set first so that every worker inherits them, and the pool's
    semaphores are named after this process, so a start-up sweep can remove them once it is dead.
    """
    shm.name_semaphores()
    for name in BLAS_THREAD_VARIABLES:
        os.environ[name] = str(blas_threads)
    multiprocessing.set_forkserver_preload(["compute.worker"])
    multiprocessing.forkserver.ensure_running()


def _internals(executor: ProcessPoolExecutor | None) -> tuple[dict[int, Any], bool]:
    """(worker processes by pid, broken?) of a ProcessPoolExecutor.

    The stdlib exposes neither: `_processes` and `_broken` are private attributes (stable
    since Python 3.8, read-only here). This is the one place that reads them; an executor
    without them reads as no workers and not broken.
    """
    if executor is None:
        return {}, False
    return dict(getattr(executor, "_processes", None) or {}), bool(getattr(executor, "_broken", False))


async def _created(future: asyncio.Future) -> ProcessPoolExecutor:
    """The executor `future` builds in a thread. If we are cancelled first (stop() during a
    rebuild), the thread still finishes building it: it is shut down then, not left running."""
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        def shut(done: asyncio.Future) -> None:
            if not done.cancelled() and done.exception() is None:
                done.result().shutdown(wait=False, cancel_futures=True)

        future.add_done_callback(shut)
        raise


class ExecutorSupervisor:
    """`await start()` once, `submit()` many times, `await stop()` once (idempotent)."""

    def __init__(
        self,
        *,
        size: int,
        initargs: tuple,
        backoff: float,
        backoff_max: float,
        backoff_reset: float,
        on_rebuilt: Callable[[], None] = lambda: None,
    ) -> None:
        self.size = size
        self._initargs = initargs
        self._backoff = backoff
        self._backoff_max = backoff_max
        self._backoff_reset = backoff_reset
        self._on_rebuilt = on_rebuilt  # e.g. wake the scheduler, which stopped dispatching
        self._context = multiprocessing.get_context("forkserver")
        self._executor: ProcessPoolExecutor | None = None
        self.healthy = False
        self.rebuilds = 0
        self._stopping = False
        self._crash_streak = 0
        self._last_crash = 0.0
        self._rebuild_task: asyncio.Task[None] | None = None
        self._watch_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Returns when every worker answered a ping."""
        if self._executor is not None:
            raise RuntimeError("pool already started")
        self._executor = await _created(asyncio.ensure_future(asyncio.to_thread(self._create)))
        self.healthy = True
        self._watch_task = asyncio.get_running_loop().create_task(self._watch(), name="offload-pool-watch")

    async def stop(self, *, cancel_queued: bool = True) -> None:
        """Shut the workers down once their running tasks end. `cancel_queued`: tasks not yet
        handed to a worker are cancelled (False: they run first)."""
        self._stopping = True
        self.healthy = False
        for task in (self._rebuild_task, self._watch_task):
            if task is not None:
                task.cancel()
        executor, self._executor = self._executor, None
        if executor is not None:
            await asyncio.to_thread(executor.shutdown, wait=True, cancel_futures=cancel_queued)

    def worker_pids(self) -> list[int]:
        return sorted(_internals(self._executor)[0])

    def submit(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future:
        """Hand a task to a worker. Raises Unavailable while restarting; the returned future
        raises Unavailable if the worker dies during the task (the pool then heals)."""
        executor = self._executor
        if not self.healthy or executor is None:
            raise Unavailable(RESTARTING)
        try:
            future = asyncio.wrap_future(executor.submit(fn, *args))
        except (BrokenProcessPool, RuntimeError) as exc:
            self._on_broken(executor)
            raise Unavailable(RESTARTING) from exc
        return asyncio.ensure_future(self._result(future, executor))

    async def _result(self, future: asyncio.Future, executor: ProcessPoolExecutor) -> Any:
        try:
            return await future
        except BrokenProcessPool as exc:
            self._on_broken(executor)
            raise Unavailable("a pool worker died while running this call; safe to retry") from exc

    # -- building and healing ------------------------------------------------------------------

    def _create(self) -> ProcessPoolExecutor:
        """A new executor whose workers all answered a ping; shut down again if they did not."""
        executor = ProcessPoolExecutor(
            max_workers=self.size, mp_context=self._context, initializer=worker.initialize, initargs=self._initargs
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

    async def _watch(self, every: float = 0.1) -> None:
        """Notice a worker that died while idle (e.g. the OOM killer): no task would tell us,
        and the next call would fail on a broken executor. The executor's own manager thread
        marks it broken as soon as a worker's process ends; rebuild then, not on the next call."""
        while True:
            await asyncio.sleep(every)
            if _internals(self._executor)[1]:
                self._on_broken(self._executor)

    def _on_broken(self, executor: ProcessPoolExecutor | None) -> None:
        if executor is None or executor is not self._executor or self._stopping or self._rebuild_task is not None:
            return  # already handled, or shutting down
        self.healthy = False
        # The stdlib failed every call of the broken executor and sends its other workers
        # SIGTERM, which they ignore: they would finish tasks whose results nobody can
        # receive (burning CPU, delaying the executor's clean-up). Stop them now.
        for process in _internals(executor)[0].values():
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
                    self._executor = await _created(asyncio.ensure_future(asyncio.to_thread(self._create)))
                    break
                except Exception:  # a worker that failed to start or ping: try again, later
                    log.exception("pool rebuild failed; retrying")
                    await asyncio.sleep(min(self._backoff_max, self._backoff * 2**self._crash_streak))
            if self._stopping:
                return
            self.rebuilds += 1
            self.healthy = True
            log.info("pool rebuilt", extra={"seconds": round(time.perf_counter() - started, 3), "workers": self.worker_pids()})
            self._on_rebuilt()
        finally:
            self._rebuild_task = None
