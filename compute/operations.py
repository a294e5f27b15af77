"""The built-in operations of offload.v1.ComputeService.

Each is one function, marked @light (answered on the event loop: microseconds) or @heavy
(run in a pool worker with the shared table). See compute/registry.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from compute.errors import InvalidArgument, NotFound
from compute.registry import heavy, light
from compute.search import top_k
from compute.table import MAX_ID_BYTES, normalised_query
from offload.v1 import compute_pb2, search_pb2

if TYPE_CHECKING:  # pool workers import this module: keep settings, metrics and grpc out of them
    from compute.runtime import Runtime
    from compute.worker import TaskContext

SERVICE = "offload.v1.ComputeService"


@light(f"{SERVICE}.GetItem")
def get_item(request: compute_pb2.GetItemRequest, runtime: Runtime) -> compute_pb2.Item:
    if not request.id:
        raise InvalidArgument("id is required")
    if len(request.id.encode("utf-8")) > MAX_ID_BYTES:
        raise InvalidArgument(f"id is longer than {MAX_ID_BYTES} bytes")
    row = runtime.table.row_of(request.id)
    if row is None:
        raise NotFound("no item with this id")
    return compute_pb2.Item(id=request.id, vector=runtime.table.vectors[row].tolist())


def validate_search(request: search_pb2.SearchRequest, runtime: Runtime) -> None:
    """Cheap checks on the loop, so bad input never takes a pool slot."""
    if not 1 <= request.k <= runtime.settings.max_k:
        raise InvalidArgument(f"k must be between 1 and {runtime.settings.max_k}")
    normalised_query(request.vector, runtime.table.dim)


@heavy(f"{SERVICE}.Search", validate=validate_search)
def search(request: search_pb2.SearchRequest, task: TaskContext) -> search_pb2.SearchResponse:
    table = task.table
    query = normalised_query(request.vector, table.dim)
    hits = top_k(table.vectors, table.ids, query, request.k, chunk_rows=task.chunk_rows, check=task.check)
    return search_pb2.SearchResponse(
        hits=[search_pb2.SearchHit(id=table.id_at(row), score=score) for row, score in hits]
    )


@light(f"{SERVICE}.GetStats")
def get_stats(request: compute_pb2.GetStatsRequest, runtime: Runtime) -> compute_pb2.Stats:
    table, pool, loop = runtime.table, runtime.pool.stats(), runtime.heartbeat.stats()
    return compute_pb2.Stats(
        cache=compute_pb2.CacheStats(
            rows=table.rows, dim=table.dim, bytes=table.nbytes, generation=table.spec.generation, source=table.spec.source
        ),
        pool=compute_pb2.PoolStats(
            size=pool.size,
            busy=pool.busy,
            queued=pool.queued,
            max_inflight=pool.max_inflight,
            rebuilds=pool.rebuilds,
            healthy=pool.healthy,
        ),
        loop=compute_pb2.LoopStats(
            last_lag_seconds=loop.last_lag_seconds,
            max_lag_seconds=loop.max_lag_seconds,
            stalled=loop.stalled,
            stalls=loop.stalls,
        ),
    )
