"""Code that runs inside pool worker processes. Never imports grpc (grpc#16001).

Each worker attaches the table read-only in its initializer (milliseconds: it maps pages,
copies nothing) and the small control segment through which compute asks a running call to
stop: one flag per call. A single call receives a `TaskContext`, and its operation calls
`task.check()` between chunks. A batch of calls receives a `BatchTask`, whose `check()`
answers which members are still wanted: each has its own flag and deadline.
"""

from __future__ import annotations

import ctypes
import multiprocessing.forkserver
import os
import signal
import time
from dataclasses import dataclass

import numpy as np

from compute import shm
from compute.errors import Cancelled, ComputeError, DeadlineExceeded
from compute.table import EmbeddingTable, TableSpec
from offload import context, logs

CANCEL_REQUESTED = 1
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True, slots=True)
class TaskMeta:
    """The task envelope: what crosses into the worker besides the request itself."""

    request_id: str
    traceparent: str
    deadline: float | None  # wall clock (time.time()); None = no deadline
    flag: int  # index of this call's cancel flag in the control segment


@dataclass(frozen=True, slots=True)
class Timed:
    """A task's outcome with when it ran in the worker (time.time_ns()), for its trace span."""

    value: object
    started_ns: int
    ended_ns: int
    pid: int


class TaskContext:
    """What a heavy operation gets: the shared table and a way to notice it should stop."""

    def __init__(self, table: EmbeddingTable, meta: TaskMeta, flags: np.ndarray, chunk_rows: int) -> None:
        self.table = table
        self.meta = meta
        self.chunk_rows = chunk_rows
        self._flags = flags

    @property
    def request_id(self) -> str:
        return self.meta.request_id

    def cancelled(self) -> bool:
        return bool(self._flags[self.meta.flag] == CANCEL_REQUESTED)

    def check(self) -> None:
        """Raise if the call was cancelled or its deadline passed. Cheap: call it often."""
        if self._flags[self.meta.flag] == CANCEL_REQUESTED:
            raise Cancelled("the call was cancelled")
        if self.meta.deadline is not None and time.time() > self.meta.deadline:
            raise DeadlineExceeded("the deadline passed while the work was running")


class BatchTask:
    """What a batch function gets: the table, the rows to scan (`rows`, a (start, stop) pair:
    one segment of the table for a segmented operation, else all of it), and the calls it
    serves at once ("members").

    `check()` between chunks returns a boolean mask of the members still wanted. A member
    whose call was cancelled, or whose deadline passed, leaves for good: its result is
    replaced by its error (Cancelled / DeadlineExceeded), so the batch function should stop
    spending CPU on it. When every member has left, `check()` raises and the batch stops.
    """

    def __init__(
        self, table: EmbeddingTable, metas: list[TaskMeta], flags: np.ndarray, chunk_rows: int, rows: tuple[int, int]
    ) -> None:
        self.table = table
        self.chunk_rows = chunk_rows
        self.rows = rows
        self.metas = metas
        self._flags = flags
        self._flag_index = np.array([meta.flag for meta in metas], dtype=np.intp)
        self._deadlines = np.array([np.inf if meta.deadline is None else meta.deadline for meta in metas])
        self._wanted = np.ones(len(metas), dtype=bool)
        # Why each member left (None: still in); the error its caller gets.
        self.left: list[ComputeError | None] = [None] * len(metas)

    @property
    def size(self) -> int:
        return len(self.metas)

    def check(self) -> np.ndarray:
        """The mask of members still wanted (do not modify it); raises when none is."""
        cancelled = self._wanted & (self._flags[self._flag_index] == CANCEL_REQUESTED)
        expired = self._wanted & ~cancelled & (self._deadlines < time.time())
        if cancelled.any() or expired.any():
            for index in np.flatnonzero(cancelled):
                self.left[index] = Cancelled("the call was cancelled")
            for index in np.flatnonzero(expired):
                self.left[index] = DeadlineExceeded("the deadline passed while the work was running")
            self._wanted &= ~(cancelled | expired)
        if not self._wanted.any():
            raise Cancelled("every call of the batch left")
        return self._wanted


@dataclass(slots=True)
class _WorkerState:
    table: EmbeddingTable
    flags: np.ndarray
    chunk_rows: int


# This process's state. One per worker process, set once by `initialize` (the pool's
# initializer): a ProcessPoolExecutor offers no other place to keep it.
_state: _WorkerState | None = None


def initialize(
    table_spec: TableSpec, control_spec: shm.ArraySpec, nice: int, log_level: str, chunk_rows: int, log_format: str = "auto"
) -> None:
    global _state
    # Ctrl-C / SIGTERM reach the whole process group; compute decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with_parent()
    if nice:
        os.nice(nice)  # serving loops get the CPU first
    logs.configure("compute-worker", log_level, log_format)  # same stderr as compute
    _state = _WorkerState(EmbeddingTable.attach(table_spec), shm.attach(control_spec), chunk_rows)


def _die_with_parent() -> None:
    """If compute (and so the forkserver, our parent) dies, die too: never hold the table alone."""
    _release_forkserver()
    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # parent died before prctl took effect
        os._exit(1)


def _release_forkserver() -> None:
    """Close our copy of the forkserver's "alive" pipe.

    The forkserver exits when every holder of that pipe's write end is gone, and it hands a
    copy to each process it forks. Workers keeping theirs would keep the forkserver alive
    after compute dies, and the forkserver alive keeps PDEATHSIG from firing: orphans that
    map the table forever. Workers never fork through the forkserver, so they drop it.
    """
    server = getattr(multiprocessing.forkserver, "_forkserver", None)
    fd = getattr(server, "_forkserver_alive_fd", None)
    if fd is not None:
        server._forkserver_alive_fd = None
        try:
            os.close(fd)
        except OSError:
            pass


def ping(delay: float = 0.0) -> int:
    time.sleep(delay)
    return os.getpid()


def run(fn, request, meta: TaskMeta) -> Timed:
    """Run one heavy call. Work whose deadline already passed is never started."""
    assert _state is not None, "worker not initialized"
    started = time.time_ns()
    if meta.deadline is not None and time.time() > meta.deadline:
        raise DeadlineExceeded("the deadline passed before the work started; it was not run")
    task = TaskContext(_state.table, meta, _state.flags, _state.chunk_rows)
    with context.bound(context.RequestContext(meta.request_id, meta.traceparent)):
        task.check()
        return Timed(fn(request, task), started, time.time_ns(), os.getpid())


def run_batch(batch_fn, requests: list, metas: list[TaskMeta], rows: tuple[int, int] | None = None) -> Timed:
    """Run several calls of one operation at once, over `rows` of the table (default: all):
    `batch_fn(requests, task)` returns one result per request. Returns, per member, its
    result or the error it left with."""
    started = time.time_ns()
    outcome = _run_batch(batch_fn, requests, metas, rows)
    return Timed(outcome, started, time.time_ns(), os.getpid())


def _run_batch(batch_fn, requests: list, metas: list[TaskMeta], rows: tuple[int, int] | None) -> list:
    assert _state is not None, "worker not initialized"
    task = BatchTask(_state.table, metas, _state.flags, _state.chunk_rows, rows or (0, _state.table.rows))
    # Log lines of the batch carry its first member's context (each member's own is in compute's logs).
    with context.bound(context.RequestContext(metas[0].request_id, metas[0].traceparent)):
        try:
            task.check()
            results = batch_fn(requests, task)
        except Cancelled:
            if any(reason is None for reason in task.left):
                raise  # the operation's own Cancelled, not "every member left"
            return list(task.left)
    if len(results) != len(requests):
        raise TypeError(f"{batch_fn.__name__} returned {len(results)} results for {len(requests)} requests")
    return [result if reason is None else reason for result, reason in zip(results, task.left)]
