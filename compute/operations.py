"""The built-in operations of offload.v1.ComputeService.

Each is one function, marked @light (answered on the event loop: microseconds) or @heavy
(run in a pool worker with the shared table). See compute/registry.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from compute.errors import InvalidArgument, NotFound, Unavailable
from compute.registry import heavy, light
import numpy as np

from compute.search import top_k, top_k_batch
from compute.table import MAX_ID_BYTES, EmbeddingTable, TableSource, normalised_query
from offload.v1 import compute_pb2, search_pb2

if TYPE_CHECKING:  # pool workers import this module: keep settings, metrics and grpc out of them
    from compute.runtime import Runtime
    from compute.tables import TableManager
    from compute.worker import BatchTask, TaskContext

SERVICE = "offload.v1.ComputeService"


@light(f"{SERVICE}.GetItem")
def get_item(request: compute_pb2.GetItemRequest, runtime: Runtime) -> compute_pb2.Item:
    # The proto bounds the id (1..256 characters); an id of more bytes than any stored one
    # (MAX_ID_BYTES) names no item.
    row = None if len(request.id.encode("utf-8")) > MAX_ID_BYTES else runtime.table.row_of(request.id)
    if row is None:
        raise NotFound("no item with this id")
    return compute_pb2.Item(id=request.id, vector=runtime.table.vectors[row].tolist())


def check_k(k: int, max_k: int, field: str = "k") -> None:
    if k > max_k:
        raise InvalidArgument(f"{field} must be at most {max_k} (max_k)", field_violations=[(field, f"must be at most {max_k}")])


def validate_search(request: search_pb2.SearchRequest, runtime: Runtime) -> None:
    """Cheap checks on the loop, so bad input never takes a pool slot."""
    check_k(request.k, runtime.settings.max_k)  # 1..1000: the proto; max_k: this compute
    normalised_query(request.vector, runtime.table.dim)


def search_segment(requests: list[search_pb2.SearchRequest], task: BatchTask) -> list[tuple[np.ndarray, np.ndarray] | None]:
    """Search's batch function: one segment of the table (`task.rows`) scanned for every
    member at once, each with its own k. Per member: its best (rows, exact scores) in the
    segment, or None if it left (cancelled, deadline) and dropped out of the scan."""
    table = task.table
    start, stop = task.rows
    queries = np.stack([normalised_query(request.vector, table.dim) for request in requests])
    found = top_k_batch(
        table.vectors[start:stop],
        table.ids[start:stop],
        queries,
        [request.k for request in requests],
        chunk_rows=task.chunk_rows,
        check=task.check,
    )
    return [
        None if hits is None else (np.array([row for row, _ in hits], dtype=np.int64) + start, np.array([s for _, s in hits], dtype=np.float32))
        for hits in found
    ]


def merge_search(request: search_pb2.SearchRequest, partials: list[tuple[np.ndarray, np.ndarray]], runtime: Runtime) -> search_pb2.SearchResponse:
    """On the loop: a call's per-segment bests, ranked like one scan of the whole table
    (score descending, then id ascending: the scores are exact, so segments compare)."""
    table = runtime.table
    rows = np.concatenate([rows for rows, _ in partials])
    scores = np.concatenate([scores for _, scores in partials])
    order = np.lexsort((table.ids[rows], -scores))[: request.k]
    return _search_response(table, [(int(rows[i]), float(scores[i])) for i in order])


@heavy(f"{SERVICE}.Search", validate=validate_search, batch=search_segment, merge=merge_search)
def search(request: search_pb2.SearchRequest, task: TaskContext) -> search_pb2.SearchResponse:
    """One Search alone, over the whole table (when the pool's batching is off)."""
    table = task.table
    query = normalised_query(request.vector, table.dim)
    return _search_response(table, top_k(table.vectors, table.ids, query, request.k, chunk_rows=task.chunk_rows, check=task.check))


def _search_response(table: EmbeddingTable, hits: list[tuple[int, float]]) -> search_pb2.SearchResponse:
    return search_pb2.SearchResponse(hits=[search_pb2.SearchHit(id=table.id_at(row), score=score) for row, score in hits])


def cache_stats(table: EmbeddingTable, tables: TableManager | None) -> compute_pb2.CacheStats:
    stats = compute_pb2.CacheStats(
        rows=table.rows, dim=table.dim, bytes=table.nbytes, generation=table.spec.generation, source=table.spec.source
    )
    if tables is not None and tables.table is table:
        status = tables.status()
        stats.loaded_at.FromNanoseconds(int(status.loaded_at * 1e9))
        stats.load_seconds = status.load_seconds
        stats.loading = status.loading
        stats.last_load_error = status.last_error
        stats.retiring_generations.extend(status.retiring)
    return stats


@light(f"{SERVICE}.LoadTable")
async def load_table(request: compute_pb2.LoadTableRequest, runtime: Runtime) -> compute_pb2.LoadTableResponse:
    """Admin: a new table, swapped in while serving (compute/tables.py)."""
    if runtime.tables is None:
        raise Unavailable("this compute cannot load tables")
    if request.HasField("file"):
        source = TableSource(Path(request.file.vectors_path), Path(request.file.ids_path) if request.file.ids_path else None)
    else:
        spec = request.synthetic
        source = TableSource(rows=spec.rows, dim=spec.dim, seed=spec.seed)
    previous = runtime.table.spec.generation
    table = await runtime.tables.load(source, allow_dimension_change=request.allow_dimension_change)
    return compute_pb2.LoadTableResponse(table=cache_stats(table, runtime.tables), previous_generation=previous)


@light(f"{SERVICE}.GetStats")
def get_stats(request: compute_pb2.GetStatsRequest, runtime: Runtime) -> compute_pb2.Stats:
    pool, loop = runtime.pool.stats(), runtime.heartbeat.stats()
    return compute_pb2.Stats(
        cache=cache_stats(runtime.table, runtime.tables),
        pool=compute_pb2.PoolStats(
            size=pool.size,
            busy=pool.busy,
            queued=pool.queued,
            max_inflight=pool.max_inflight,
            rebuilds=pool.rebuilds,
            healthy=pool.healthy,
            max_batch=pool.max_batch,
            operations=[
                compute_pb2.OperationPoolStats(
                    method=name,
                    calls=op.calls,
                    batched_calls=op.batched_calls,
                    batches=op.batches,
                    largest_batch=op.largest_batch,
                    queue_wait_seconds=op.queue_wait_seconds,
                )
                for name, op in sorted(pool.operations.items())
            ],
        ),
        loop=compute_pb2.LoopStats(
            last_lag_seconds=loop.last_lag_seconds,
            max_lag_seconds=loop.max_lag_seconds,
            stalled=loop.stalled,
            stalls=loop.stalls,
        ),
    )
