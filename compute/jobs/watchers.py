"""Who watches which job: each change is pushed to every watcher of that job (WatchJob streams).

A watcher has a bounded queue; a slow one loses old snapshots, never the newest, and never
slows the job down. Watchers only read: one that goes away never affects its job.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator, Awaitable, Callable

from compute.errors import Unavailable
from compute.jobs.store import JobRecord

POLL_SECONDS = 1.0  # a watcher re-reads its job this often too, for changes made elsewhere
QUEUE_SIZE = 256


class JobWatchers:
    """`watch()` per stream, `publish()` per change, `close()` once when draining (idempotent)."""

    def __init__(self, read: Callable[[str], Awaitable[JobRecord | None]]) -> None:
        self._read = read  # the job as stored now (None: unknown or expired)
        self._queues: dict[str, set[asyncio.Queue[JobRecord | None]]] = {}
        self._closed = False

    def publish(self, record: JobRecord) -> None:
        for queue in self._queues.get(record.id, ()):
            _offer(queue, record)

    def close(self) -> None:
        """End every stream (they resume elsewhere, from their last sequence)."""
        self._closed = True
        for queues in self._queues.values():
            for queue in queues:
                _offer(queue, None)

    async def watch(self, job_id: str, after_sequence: int) -> AsyncIterator[JobRecord]:
        """Every change of the job with sequence > after_sequence, ending after a terminal state."""
        queue: asyncio.Queue[JobRecord | None] = asyncio.Queue(QUEUE_SIZE)
        self._queues.setdefault(job_id, set()).add(queue)
        try:
            record: JobRecord | None = await self._read(job_id)  # after subscribing: no change is missed
            last = after_sequence
            while True:
                if record is None:
                    if self._closed:
                        raise Unavailable("compute is shutting down; reconnect with after_sequence to resume")
                    return  # the job expired while watched
                if record.sequence > last:
                    last = record.sequence
                    yield record
                if record.terminal:
                    return
                try:
                    record = await asyncio.wait_for(queue.get(), POLL_SECONDS)
                except TimeoutError:
                    record = await self._read(job_id)
        finally:
            queues = self._queues.get(job_id)
            if queues is not None:
                queues.discard(queue)
                if not queues:
                    del self._queues[job_id]


def _offer(queue: asyncio.Queue, item: JobRecord | None) -> None:
    """Never block the publisher: a full queue drops its oldest snapshot for the newest."""
    while True:
        try:
            queue.put_nowait(item)
            return
        except asyncio.QueueFull:
            queue.get_nowait()
