"""The table's generations: the one compute serves, and how a new one replaces it while serving.

`TableManager.start()` builds the first table; `load(source)` builds the next one (generation
g+1) and swaps it in, under load, without a failed call:

1. check, before copying anything: the file is allowed (`table_load_dirs`) and readable, its
   header and ids are sound, the dimension is unchanged (unless allowed: queries in flight
   have the old one), and /dev/shm has room for a second table;
2. build g+1 into new segments, in a thread of low priority (the serving loop and the pool
   keep the CPU), with the checks made at start-up (NaN, zero vectors, duplicate ids);
3. start pool workers on g+1 (compute/pool.py `switch`), then switch, on the loop: new calls
   see g+1; a call in flight finishes on the generation it started on;
4. record the source in the state file, so that a restart serves g+1;
5. once no call and no worker uses g, unlink its segments (`_retired`).

Any failure before step 3 ends leaves g serving and removes g+1's segments. A SIGKILL during
the load leaves segments named after a dead pid, which the next start-up sweeps away, and a
state file that still names g's source, which the restart serves.

The state file (`table_state_path`) holds the last source that was switched to, and the
settings' own source at that time: when the settings name another source since, they win
(an operator changed them on purpose). Generations only grow, across restarts too.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from compute import shm
from compute.errors import Aborted, ComputeError, FailedPrecondition, InvalidArgument, Unavailable
from compute.pool import HealingPool
from compute.settings import ComputeSettings
from compute.table import EmbeddingTable, LoadCancelled, TablePlan, TableSource, plan

log = logging.getLogger("compute.tables")

STATE_VERSION = 1
STOPPED = "compute is shutting down: the load was stopped; load the table on the next one"
# Left free in shm_dir besides the new table: the pool's control segment and semaphores, and
# whatever else shares the filesystem.
SHM_HEADROOM_BYTES = 16 << 20
# The loader thread's niceness: it copies a gigabyte while the loop answers calls.
LOADER_NICE = 10


@dataclass(frozen=True, slots=True)
class TableStatus:
    """What GetStats and the metrics say about the table."""

    table: EmbeddingTable
    loaded_at: float  # wall clock, when it started serving
    load_seconds: float  # from the start of its load to the switch
    loading: bool  # a load is under way
    last_error: str  # of the last failed load since the last switch ("" after a success)
    retiring: list[int]  # old generations whose calls or workers are still finishing


class TableManager:
    """Owns every table generation of this compute. `start()` once, `load()` any time after
    `attach(pool, on_switch)`, `stop()` once."""

    def __init__(self, settings: ComputeSettings) -> None:
        self.settings = settings
        self.configured = (
            TableSource(settings.vectors_path, settings.ids_path) if settings.vectors_path is not None
            else TableSource(rows=settings.rows, dim=settings.dim, seed=settings.seed)
        )  # fmt: skip
        self.state_path = settings.effective_table_state_path
        self.table: EmbeddingTable | None = None
        self.source = self.configured  # of the table serving now
        # generation -> table, from its load until its segments are unlinked. Changed on the
        # loop only (the metrics thread reads a copy).
        self._tables: dict[int, EmbeddingTable] = {}
        self._pool: HealingPool | None = None
        self._on_switch: Callable[[EmbeddingTable], None] = lambda table: None
        self._load_task: asyncio.Task[EmbeddingTable] | None = None
        self._stopping = threading.Event()  # read by the loader thread between blocks
        self._watcher: asyncio.Task[None] | None = None
        self._source_changed = asyncio.Event()
        self._loaded_at = 0.0
        self._load_seconds = 0.0
        self._last_error = ""
        self.loads = {"ok": 0, "failed": 0}

    # -- start-up and shutdown ----------------------------------------------------------------

    async def start(self) -> EmbeddingTable:
        """Build the first table: the state file's source, or the settings' (see the module doc)."""
        started = time.perf_counter()
        state = self._read_state()
        generation = state.get("generation", 0) + 1
        source = self.configured
        if state and TableSource.from_json(state["configured"]) == self.configured:
            source = TableSource.from_json(state["source"])
        try:
            table = await asyncio.to_thread(_plan_and_load, self.settings.shm_dir, source, generation)
        except (OSError, ValueError) as exc:
            if source == self.configured:
                raise
            log.error(
                "the last loaded table cannot be rebuilt; serving the configured one",
                extra={"source": source.describe(), "error": str(exc), "configured": self.configured.describe()},
            )
            source = self.configured
            table = await asyncio.to_thread(_plan_and_load, self.settings.shm_dir, source, generation)
        self._tables[generation] = table
        self._serve(table, source, time.perf_counter() - started)
        self._write_state(source)
        return table

    def attach(self, pool: HealingPool, on_switch: Callable[[EmbeddingTable], None]) -> None:
        """`pool` runs the table's workers; `on_switch(table)` makes compute serve a new table."""
        self._pool = pool
        self._on_switch = on_switch
        pool.on_retired = self._retired

    async def stop_loading(self) -> None:
        """Shutdown, first step: no new load, the file watch ends, and a load under way stops at
        its next step (its caller gets UNAVAILABLE) and removes what it built. Not awaited here:
        `stop()` waits for it, after the pool."""
        self._stopping.set()
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
            self._watcher = None

    async def stop(self) -> None:
        """Shutdown, last step (the pool has stopped): the load under way has ended (it stops
        between blocks of its copy), then every generation's segments are unlinked."""
        if self._load_task is not None:
            await asyncio.gather(self._load_task, return_exceptions=True)
        for table in list(self._tables.values()):
            table.unlink()
        self._tables.clear()

    # -- watching the files ---------------------------------------------------------------------

    def start_watching(self) -> None:
        """`table_watch`: load the serving source's files again whenever they change."""
        self._watcher = asyncio.get_running_loop().create_task(self._watch(), name="offload-table-watch")

    async def _watch(self) -> None:
        from watchfiles import awatch  # imported only when watching

        while True:
            self._source_changed.clear()
            source = self.source
            files = {Path(os.path.realpath(p)) for p in (source.vectors_path, source.ids_path) if p is not None}
            if not files:  # a synthetic table: nothing to watch until a file is loaded
                await self._source_changed.wait()
                continue
            # The directories, not the files: a file replaced by a rename (the safe way to
            # publish one) is a new inode that a watch on the old file would never see.
            directories = sorted({str(f.parent) for f in files})
            log.info("watching the table's files", extra={"files": sorted(map(str, files))})
            async for changes in awatch(*directories, stop_event=self._source_changed, recursive=False):
                if not any(Path(path) in files for _, path in changes):
                    continue
                log.info("the table's files changed; loading them again", extra={"source": source.describe()})
                await self._load_when_free(source)

    async def _load_when_free(self, source: TableSource) -> None:
        """Load `source`, after the load under way if there is one: a file published while an
        older version of it loads must be loaded too."""
        while source == self.source:  # else another source was loaded meanwhile: the watch moves to it
            try:
                await self.load(source)
                return
            except Aborted:
                if self._load_task is not None:
                    await asyncio.gather(self._load_task, return_exceptions=True)
            except ComputeError:
                return  # logged by the load; the current table serves on, the next change tries again

    # -- a load -----------------------------------------------------------------------------

    async def load(self, source: TableSource, *, allow_dimension_change: bool = False) -> EmbeddingTable:
        """Load `source` as the next generation and switch to it; returns it once it serves.

        Raises InvalidArgument (a bad or forbidden source), FailedPrecondition (another
        dimension, or no room in shm_dir), Aborted (another load is under way), Unavailable
        (the new workers could not start, or compute is stopping). The current table serves
        on, untouched, whatever happens. A caller that goes away does not stop the load.
        """
        if self._stopping.is_set():
            raise Unavailable("compute is shutting down; load the table on the next one")
        if self.loading:
            raise Aborted("another table load is under way; retry when it is done")
        task = self._load_task = asyncio.get_running_loop().create_task(
            self._load(source, allow_dimension_change), name="offload-table-load"
        )
        # Forgotten once done: a failed load's exception leads to its frames, which would keep
        # the table it built mapped until the next load.
        task.add_done_callback(self._load_done)
        # Shielded: the load goes on if the caller disconnects, so the switch is all or nothing.
        return await asyncio.shield(task)

    def _load_done(self, task: asyncio.Task) -> None:
        if self._load_task is task:
            self._load_task = None

    @property
    def loading(self) -> bool:
        return self._load_task is not None

    async def _load(self, source: TableSource, allow_dimension_change: bool) -> EmbeddingTable:
        started = time.perf_counter()
        current = self.table
        assert current is not None and self._pool is not None, "start() and attach() first"
        generation = current.spec.generation + 1
        log.info("table load started", extra={"generation": generation, "source": source.describe()})
        table = None
        try:
            planned = await _in_low_priority_thread(self._check, source, current, allow_dimension_change)
            table = await self._copy(planned, generation, source)
            self._tables[generation] = table
            if self._stopping.is_set():
                raise Unavailable(STOPPED)
            try:
                await self._pool.switch(table.spec)
            except Exception as exc:
                raise Unavailable(f"the new table's pool workers did not start ({exc}); the current table serves on") from exc
        except BaseException as exc:
            if table is not None:  # built, not switched to: it goes
                self._tables.pop(generation, None)
                table.unlink()
                table = None  # and its mapping with it (this frame outlives the call, in the exception)
            self.loads["failed"] += 1
            self._last_error = getattr(exc, "message", None) or str(exc) or type(exc).__name__
            log.warning("table load failed; the current table serves on", extra={"generation": generation, "error": self._last_error})
            raise
        self._serve(table, source, time.perf_counter() - started)
        self.loads["ok"] += 1
        self._last_error = ""
        await asyncio.to_thread(self._write_state, source)
        log.info(
            "table switched",
            extra={"generation": generation, "previous": current.spec.generation, "source": table.spec.source,
                   "rows": table.rows, "dim": table.dim, "seconds": round(self._load_seconds, 3)},
        )  # fmt: skip
        return table

    async def _copy(self, planned: TablePlan, generation: int, source: TableSource) -> EmbeddingTable:
        """The new table, built in the loader thread, or a ComputeError saying why not. The error
        is raised outside the handler, unchained: a chained one would keep the failed build's
        frames, and the segments they map, alive."""
        try:
            return await _in_low_priority_thread(
                EmbeddingTable.load, self.settings.shm_dir, planned, generation, self._stopping.is_set
            )
        except OSError as exc:  # ENOSPC: another process took the room since the check
            error: ComputeError = FailedPrecondition(
                f"shared memory ran out while copying the new table ({exc.strerror}); the current table keeps serving"
            )
        except ValueError as exc:  # the data itself: NaN, a zero vector, duplicate ids
            error = _source_error(exc, source)
        except LoadCancelled:
            error = Unavailable(STOPPED)
        raise error

    def _check(self, source: TableSource, current: EmbeddingTable, allow_dimension_change: bool) -> TablePlan:
        """Everything that can be checked before copying (runs in the loader thread: reads the ids)."""
        for field, path in _fields(source):
            if path is not None and not self._allowed(path):
                raise InvalidArgument(
                    f"{field} is outside the directories compute may load tables from (OFFLOAD_COMPUTE_TABLE_LOAD_DIRS)",
                    [(field, "not in an allowed directory")],
                )
        # The header first (cheap): the dimension and the room needed, before reading any ids.
        planned = self._plan(source, read_ids=False)
        self._check_dimension(planned, current, allow_dimension_change)
        self._check_room(planned)
        if source.ids_path is not None:
            planned = self._plan(source)  # reads the header again: the file may have been replaced meanwhile
            self._check_dimension(planned, current, allow_dimension_change)
            self._check_room(planned)  # again, with the ids' real width
        return planned

    @staticmethod
    def _check_dimension(planned: TablePlan, current: EmbeddingTable, allow_dimension_change: bool) -> None:
        if planned.dim != current.dim and not allow_dimension_change:
            raise FailedPrecondition(
                f"the new table has dimension {planned.dim}, the current one {current.dim}: calls in flight and "
                "clients use the current dimension; set allow_dimension_change to switch anyway"
            )

    @staticmethod
    def _plan(source: TableSource, read_ids: bool = True) -> TablePlan:
        try:
            return plan(source, read_ids=read_ids)
        except (OSError, ValueError) as exc:
            raise _source_error(exc, source) from None

    def _check_room(self, planned: TablePlan) -> None:
        free = shm.free_bytes(self.settings.shm_dir)
        if planned.nbytes + SHM_HEADROOM_BYTES > free:
            raise FailedPrecondition(
                f"not enough shared memory for the new table: it needs {_size(planned.nbytes)} (plus {_size(SHM_HEADROOM_BYTES)} "
                f"headroom) and {_size(free)} is free; the current table keeps serving. Make room, or grow /dev/shm"
            )

    def _allowed(self, path: Path) -> bool:
        allowed = [Path(d) for d in self.settings.table_load_dirs]
        if self.configured.vectors_path is not None:
            allowed.append(self.configured.vectors_path.parent)
        real = Path(os.path.realpath(path))
        return any(real.is_relative_to(os.path.realpath(directory)) for directory in allowed)

    # -- generations --------------------------------------------------------------------------

    def _serve(self, table: EmbeddingTable, source: TableSource, load_seconds: float) -> None:
        self.table = table
        if source != self.source:
            self.source = source
            self._source_changed.set()
        self._loaded_at = time.time()
        self._load_seconds = load_seconds
        self._on_switch(table)

    def _retired(self, spec) -> None:
        """The pool's workers of an old generation are gone: its segments go too, and compute's
        own mapping, in a thread: unmapping a gigabyte takes the thread that does it ~80 ms,
        which must not be the loop's. (A call still holding the old table, e.g. an async
        operation in flight, unmaps it when it ends.)"""
        table = self._tables.pop(spec.generation, None)
        if table is not None:
            asyncio.get_running_loop().run_in_executor(None, table.unlink)
            del table  # the executor's work item holds the last reference (the bound method), dropped in its thread

    def status(self) -> TableStatus:
        assert self.table is not None
        current = self.table.spec.generation
        return TableStatus(
            self.table, self._loaded_at, self._load_seconds, self.loading, self._last_error,
            sorted(g for g in list(self._tables) if g < current),  # a copy: the metrics thread reads this too
        )

    # -- the state file -----------------------------------------------------------------------

    def _read_state(self) -> dict:
        try:
            state = json.loads(self.state_path.read_text(encoding="utf-8"))
            if state.get("version") != STATE_VERSION:
                raise ValueError(f"version {state.get('version')!r}")
            TableSource.from_json(state["source"]), TableSource.from_json(state["configured"])
            int(state["generation"])
            return state
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.error("ignoring an unreadable table state file", extra={"path": str(self.state_path), "error": str(exc)})
            return {}

    def _write_state(self, source: TableSource) -> None:
        """Atomically (write, fsync, rename): a crash leaves the old state or the new, never half."""
        assert self.table is not None
        state = {
            "version": STATE_VERSION,
            "generation": self.table.spec.generation,
            "source": source.to_json(),
            "configured": self.configured.to_json(),
            "loaded_at": self._loaded_at,
        }
        try:
            self.state_path.parent.mkdir(parents=True, exist_ok=True)
            temporary = self.state_path.with_name(f".{self.state_path.name}.{os.getpid()}.tmp")
            with open(temporary, "w", encoding="utf-8") as file:
                json.dump(state, file, indent=2)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, self.state_path)
        except OSError as exc:  # serving goes on; only a restart would fall back to an older source
            log.error("cannot write the table state file", extra={"path": str(self.state_path), "error": str(exc)})


def _plan_and_load(directory: Path, source: TableSource, generation: int) -> EmbeddingTable:
    return EmbeddingTable.load(directory, plan(source), generation)


def _fields(source: TableSource) -> list[tuple[str, Path | None]]:
    return [("file.vectors_path", source.vectors_path), ("file.ids_path", source.ids_path)]


def _source_error(exc: OSError | ValueError, source: TableSource) -> InvalidArgument:
    """A source that cannot be read or holds bad data, said without echoing a path (the field's name instead)."""
    message = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    for field, path in _fields(source):
        if path is not None:
            message = message.replace(str(path), field)
    return InvalidArgument(f"the new table cannot be loaded: {message}")


async def _in_low_priority_thread(fn, *args):
    """Run `fn(*args)` in a thread of its own, reniced: Linux applies a thread's niceness to that
    thread alone, so the copy yields the CPU to the loop and the pool workers. A thread of its
    own, not the loop's default executor, whose threads would keep the niceness."""
    def run():
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), LOADER_NICE)
        except OSError:
            pass
        return fn(*args)

    executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="offload-table-load")
    try:
        return await asyncio.wrap_future(executor.submit(run))
    finally:
        executor.shutdown(wait=False)


def _size(count: int) -> str:
    return f"{count / (1 << 30):.1f} GiB" if count >= 1 << 30 else f"{count / (1 << 20):.0f} MiB"
