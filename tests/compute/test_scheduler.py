"""The pool's scheduler on its own: lanes, dynamic batching, jobs yielding to interactive calls.

`run_batch` here is a stand-in for the worker processes (what it runs is not the point:
which calls a free slot takes together is). The real pool is tested with real processes in
test_pool_faults.py and test_pool_batching.py.
"""

from __future__ import annotations

import asyncio

import pytest

from compute.scheduler import Batch, Lane, PoolCall, Scheduler
from compute.worker import TaskMeta


def search(request, task):  # two batchable operations and a plain one
    pass


def search_together(requests, task):
    pass


def count(request, task):
    pass


def count_together(requests, task):
    pass


def job_chunk(request, task):
    pass


class Workers:
    """Records each batch a slot takes; a batch runs until `release()` lets it finish."""

    def __init__(self) -> None:
        self.batches: list[tuple[int, list[str]]] = []
        self.segments: list[int | None] = []
        self._gates: list[asyncio.Event] = []

    async def run_batch(self, slot: int, batch: Batch) -> None:
        gate = asyncio.Event()
        self._gates.append(gate)
        self.batches.append((slot, [call.request for call in batch.calls]))
        self.segments.append(batch.segment)
        await gate.wait()
        for call in batch.calls:
            if batch.segment is not None:
                call.segments_left -= 1
                if call.segments_left:
                    continue
            if not call.future.done():
                call.future.set_result(call.request)

    def release(self, index: int) -> None:
        self._gates[index].set()


def make_call(
    name: str, fn=search, batch=search_together, lane: Lane = Lane.INTERACTIVE, segments: int = 0, generation: int = 1
) -> PoolCall:
    future = asyncio.get_running_loop().create_future()
    call = PoolCall(fn.__name__, fn, batch, name, TaskMeta(name, "", None, -1), lane, future, generation)
    if segments:
        call.todo, call.segments_left = list(range(segments)), segments
    return call


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


def test_waiting_calls_of_one_operation_go_together_in_arrival_order():
    async def scenario():
        scheduler, workers = Scheduler(size=1, max_batch=3, max_delay=0, jobs_yield_seconds=1), Workers()
        scheduler.start(workers.run_batch)
        first = make_call("s1")
        scheduler.put(first)
        await settle()
        assert workers.batches == [(0, ["s1"])], "a free worker takes a call at once, alone"
        calls = [make_call("s2"), make_call("c1", count, count_together), make_call("s3"), make_call("s4"), make_call("s5"), make_call("c2", count, count_together)]
        for call in calls:
            scheduler.put(call)
        cancelled = make_call("s-cancelled")
        scheduler.put(cancelled)
        cancelled.future.cancel()
        await settle()
        assert scheduler.queued == 6
        workers.release(0)
        await settle()
        # Up to max_batch (3) Searches in arrival order; Count keeps its place at the front.
        assert workers.batches[1] == (0, ["s2", "s3", "s4"])
        workers.release(1)
        await settle()
        assert workers.batches[2] == (0, ["c1", "c2"])
        workers.release(2)
        await settle()
        assert workers.batches[3] == (0, ["s5"]), "the cancelled call is never run"
        workers.release(3)
        await settle()
        assert scheduler.busy == 0 and scheduler.queued == 0
        scheduler.stop()

    run(scenario())


def test_calls_of_different_table_generations_never_share_a_batch():
    async def scenario():
        scheduler, workers = Scheduler(size=1, max_batch=8, max_delay=0, jobs_yield_seconds=1), Workers()
        scheduler.start(workers.run_batch)
        scheduler.put(make_call("occupier", count, None))
        await settle()
        for name, generation in [("old-1", 1), ("new-1", 2), ("old-2", 1), ("new-2", 2)]:
            scheduler.put(make_call(name, generation=generation))
        scheduler.put(make_call("seg-old", count, count_together, segments=2, generation=1))
        scheduler.put(make_call("seg-new", count, count_together, segments=2, generation=2))
        for index in range(6):
            workers.release(index)
            await settle()
        assert [names for _, names in workers.batches[1:]] == [
            ["old-1", "old-2"], ["new-1", "new-2"], ["seg-old"], ["seg-old"], ["seg-new"], ["seg-new"]
        ]
        workers.release(6)
        scheduler.stop()

    run(scenario())


def test_interactive_calls_go_before_job_chunks_and_unbatchable_calls_run_alone():
    async def scenario():
        scheduler, workers = Scheduler(size=1, max_batch=8, max_delay=0, jobs_yield_seconds=0), Workers()
        scheduler.start(workers.run_batch)
        scheduler.put(make_call("occupier", count, None))
        await settle()
        scheduler.put(make_call("job-1", job_chunk, None, Lane.JOBS))
        scheduler.put(make_call("job-2", job_chunk, None, Lane.JOBS))
        scheduler.put(make_call("plain-1", count, None))
        scheduler.put(make_call("plain-2", count, None))
        for index in range(4):
            workers.release(index)
            await settle()
        assert [names for _, names in workers.batches] == [["occupier"], ["plain-1"], ["plain-2"], ["job-1"], ["job-2"]]
        workers.release(4)
        scheduler.stop()

    run(scenario())


def test_job_chunks_leave_a_worker_to_interactive_calls_while_they_arrive():
    async def scenario():
        scheduler, workers = Scheduler(size=2, max_batch=8, max_delay=0, jobs_yield_seconds=0.3), Workers()
        scheduler.start(workers.run_batch)
        scheduler.put(make_call("search"))
        await settle()
        workers.release(0)
        for n in range(3):
            scheduler.put(make_call(f"job-{n}", job_chunk, None, Lane.JOBS))
        await settle()
        assert [names for _, names in workers.batches[1:]] == [["job-0"]], "one worker stays free for interactive calls"
        await asyncio.sleep(0.4)  # no interactive call for jobs_yield_seconds: jobs may use every worker
        assert [names for _, names in workers.batches[1:]] == [["job-0"], ["job-1"]]
        for index in (1, 2):
            workers.release(index)
        await settle()
        scheduler.stop()

    run(scenario())


@pytest.mark.parametrize("delay", [0.0, 0.05])
def test_max_delay_lets_a_free_worker_wait_for_more_calls(delay):
    async def scenario():
        scheduler, workers = Scheduler(size=1, max_batch=8, max_delay=delay, jobs_yield_seconds=1), Workers()
        scheduler.start(workers.run_batch)
        scheduler.put(make_call("s1"))
        await asyncio.sleep(0.01)
        scheduler.put(make_call("s2"))
        await asyncio.sleep(0.1)
        assert workers.batches[0] == (0, ["s1", "s2"] if delay else ["s1"])
        workers.release(0)
        if not delay:
            await settle()
            workers.release(1)
        await settle()
        scheduler.stop()

    run(scenario())


def test_segmented_calls_join_a_scan_at_the_next_segment_and_share_the_workers():
    async def scenario():
        scheduler, workers = Scheduler(size=2, max_batch=8, max_delay=0, jobs_yield_seconds=1), Workers()
        scheduler.start(workers.run_batch)
        first = make_call("first", segments=4)
        scheduler.put(first)
        await settle()
        # One call alone takes both workers, on two of its segments.
        assert workers.batches == [(0, ["first"]), (1, ["first"])] and workers.segments == [0, 1]
        late = make_call("late", segments=4)
        scheduler.put(late)
        workers.release(0)
        await settle()
        # The free worker takes a segment both still need (first's 2, not late's 0): they share it.
        assert workers.batches[2] == (0, ["first", "late"]) and workers.segments[2] == 2
        workers.release(1)
        await settle()
        assert workers.batches[3] == (1, ["first", "late"]) and workers.segments[3] == 3
        for index in (2, 3):
            workers.release(index)
        await settle()
        assert first.future.result() == "first"
        # late still needs segments 0 and 1, one per worker.
        assert sorted(workers.segments[4:]) == [0, 1] and all(names == ["late"] for _, names in workers.batches[4:])
        assert not late.future.done()
        for index in (4, 5):
            workers.release(index)
        await settle()
        assert late.future.result() == "late"
        assert scheduler.queued == 0 and scheduler.busy == 0
        scheduler.stop()

    run(scenario())


def test_stop_hands_back_the_waiting_calls():
    async def scenario():
        scheduler, workers = Scheduler(size=1, max_batch=8, max_delay=0, jobs_yield_seconds=1), Workers()
        scheduler.start(workers.run_batch)
        scheduler.put(make_call("running", count, None))
        await settle()
        waiting = make_call("waiting")
        scheduler.put(waiting)
        assert scheduler.stop() == [waiting]

    run(scenario())
