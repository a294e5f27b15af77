"""Which waiting call a free pool worker takes next, and which calls go with it.

Calls wait here in two lanes: interactive calls first, job chunks after. Each worker slot
is a loop (`_serve`): take the next batch, run it, repeat. A slot is busy exactly while its
loop awaits `run_batch`, so there is one place where a slot is taken and given back.

Dynamic batching: when a slot takes a call of an operation that declared a batch function,
the calls of that operation waiting in the same lane go with it, in arrival order, up to
`max_batch`. Nothing waits for a batch to fill: calls merge only while every worker is busy
and they queue anyway. `max_delay` (0 by default) lets a slot wait that long after the
first call's arrival for more calls to join.

Segmented scans (operations that also declared a merge, like Search): the table is cut into
row ranges ("segments") and each pool task scans one segment for a batch of calls. A call
needs every segment once, in any order, so a call that arrives while a scan is under way
joins it at the next segment instead of waiting for a whole scan to end, and one call's
segments run on several workers at once. A free slot takes the segment that the most
waiting calls still need, among those of the first waiting call (which so never starves).

Calls of different table generations never share a batch (a table swap, compute/pool.py).

Jobs yield to interactive calls: while interactive calls have arrived within the last
`jobs_yield_seconds`, job chunks leave one worker free (with more than one), so an
interactive call never waits behind two job chunks; with no interactive traffic, jobs use
every worker.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from compute import worker

log = logging.getLogger("compute.pool")


class Lane(enum.IntEnum):
    INTERACTIVE = 0  # served first
    JOBS = 1


@dataclass(eq=False, slots=True)
class PoolCall:
    """One caller's heavy call, from the moment it is queued until its result is set."""

    name: str  # the operation, for stats and metrics
    fn: Callable[..., Any]  # runs one request in a worker
    batch: Callable[..., Any] | None  # runs several requests of the same operation at once
    request: Any
    meta: worker.TaskMeta
    lane: Lane
    future: asyncio.Future
    generation: int  # the table generation it runs on, from start to end (compute/pool.py)
    # Segmented operations only: segments not yet handed to a worker, and the results of
    # those done (a call is complete when `segments_left` reaches 0).
    todo: list[int] | None = None
    segments_left: int = 0
    partials: list[Any] = field(default_factory=list)
    merge: Callable[[list[Any]], Any] | None = None
    queued_at: float = field(default_factory=time.perf_counter)
    expiry: asyncio.TimerHandle | None = None  # fails the call if its deadline passes while queued
    flags: set[int] = field(default_factory=set)  # its cancel flags in the tasks running it now
    dispatched: bool = False  # handed to a worker at least once
    batched: bool = False  # ran in a pool task with other calls

    @property
    def waiting(self) -> bool:
        return not self.future.done()

    @property
    def queued(self) -> bool:
        """Still needs a worker: not done, and (segmented) some segment not yet handed out."""
        return not self.future.done() and (self.todo is None or bool(self.todo))


@dataclass(slots=True)
class Batch:
    """What one pool task runs: calls of one operation, and for a segmented one, which segment."""

    calls: list[PoolCall]
    lane: Lane
    fn: Callable[..., Any] | None  # the batch function (None: a call of an unbatched operation)
    generation: int  # every call of a batch runs on the same table generation
    segment: int | None = None


RunBatch = Callable[[int, Batch], Awaitable[None]]


class Scheduler:
    """`start(run_batch)` once, `put()` many times, `stop()` once."""

    def __init__(self, *, size: int, max_batch: int, max_delay: float, jobs_yield_seconds: float) -> None:
        self.size = size
        self.max_batch = max_batch
        self.max_delay = max_delay
        self.jobs_yield_seconds = jobs_yield_seconds
        self._lanes: dict[Lane, collections.deque[PoolCall]] = {lane: collections.deque() for lane in Lane}
        self._wake = asyncio.Event()
        self._busy: dict[int, Lane] = {}  # slot -> the lane of the batch it runs
        self._last_interactive = float("-inf")
        self._slots: list[asyncio.Task[None]] = []

    def start(self, run_batch: RunBatch) -> None:
        loop = asyncio.get_running_loop()
        self._slots = [loop.create_task(self._serve(slot, run_batch), name=f"offload-pool-slot-{slot}") for slot in range(self.size)]

    def stop(self) -> list[PoolCall]:
        """Stop taking work; returns the calls still waiting (the caller fails them)."""
        for task in self._slots:
            task.cancel()
        waiting = [call for lane in Lane for call in self._lanes[lane] if call.waiting]
        for lane in Lane:
            self._lanes[lane].clear()
        return waiting

    def put(self, call: PoolCall) -> None:
        if call.lane is Lane.INTERACTIVE:
            self._last_interactive = time.monotonic()
        self._lanes[call.lane].append(call)
        self._wake.set()

    def wake(self) -> None:
        """Look at the lanes again (e.g. the pool is healthy again)."""
        self._wake.set()

    @property
    def busy(self) -> int:
        return len(self._busy)

    @property
    def queued(self) -> int:
        return sum(call.queued for lane in Lane for call in self._lanes[lane])

    # -- the slot loops ------------------------------------------------------------------------

    async def _serve(self, slot: int, run_batch: RunBatch) -> None:
        while True:
            batch = await self._take()
            self._busy[slot] = batch.lane
            try:
                await run_batch(slot, batch)
            except Exception:  # run_batch sets every call's outcome itself; never lose the slot
                log.exception("pool slot failed to run a batch")
            finally:
                del self._busy[slot]
                self._wake.set()  # a freed slot may let a job chunk through
                # Not kept while the slot waits for the next: its calls hold their requests and
                # the table they ran on, which a table swap must be able to release.
                del batch

    async def _take(self) -> Batch:
        while True:
            batch, retry_in = self._pick()
            if batch is not None:
                if self.max_delay > 0 and batch.fn is not None and len(batch.calls) < self.max_batch:
                    await asyncio.sleep(max(0.0, batch.calls[0].queued_at + self.max_delay - time.perf_counter()))
                    self._join(batch)
                return batch
            # No await between _pick and clear: a put() cannot slip between them unseen.
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), retry_in)
            except TimeoutError:
                pass

    def _pick(self) -> tuple[Batch | None, float | None]:
        """The next batch, or (None, seconds until a held-back job may go)."""
        retry_in = None
        for lane in Lane:
            queue = self._lanes[lane]
            while queue and not queue[0].queued:
                queue.popleft()  # cancelled, expired, or every segment handed out
            if not queue:
                continue
            if lane is Lane.JOBS:
                retry_in = self._jobs_held_for()
                if retry_in is not None:
                    continue
            head = queue[0]
            if head.todo is None:
                batch = Batch([queue.popleft()], lane, head.batch, head.generation)
            else:
                batch = Batch([], lane, head.batch, head.generation, self._best_segment(head, queue))
            self._join(batch)
            return batch, None
        return None, retry_in

    def _best_segment(self, head: PoolCall, queue: collections.deque[PoolCall]) -> int:
        """Of the head's segments, the one the most waiting calls of its operation need."""
        assert head.todo
        if self.max_batch == 1:
            return head.todo[0]
        needed = collections.Counter(
            s for call in queue if call.batch is head.batch and call.generation == head.generation and call.queued for s in call.todo
        )
        return max(head.todo, key=lambda segment: (needed[segment], -segment))

    def _join(self, batch: Batch) -> None:
        """Move waiting calls of the batch's operation into it, in arrival order."""
        if batch.segment is not None:
            self._join_segment(batch)
            return
        if batch.fn is None or len(batch.calls) >= self.max_batch:
            return
        queue, others = self._lanes[batch.lane], collections.deque()
        while queue and len(batch.calls) < self.max_batch:
            call = queue.popleft()
            if call.batch is batch.fn and call.generation == batch.generation and call.queued:
                batch.calls.append(call)
            elif call.queued:
                others.append(call)
        queue.extendleft(reversed(others))  # the rest keep their places at the front

    def _join_segment(self, batch: Batch) -> None:
        for call in self._lanes[batch.lane]:
            if len(batch.calls) >= self.max_batch:
                break
            if call.batch is batch.fn and call.generation == batch.generation and call.queued and batch.segment in call.todo:
                call.todo.remove(batch.segment)
                batch.calls.append(call)
        # Calls with every segment handed out leave the queue when they reach its front (_pick).

    def _jobs_held_for(self) -> float | None:
        """None if a job chunk may take a slot now, else the seconds until it may."""
        jobs_busy = sum(lane is Lane.JOBS for lane in self._busy.values())
        if self.size == 1 or jobs_busy < self.size - 1:
            return None
        quiet = time.monotonic() - self._last_interactive
        if quiet >= self.jobs_yield_seconds:
            return None
        return self.jobs_yield_seconds - quiet
