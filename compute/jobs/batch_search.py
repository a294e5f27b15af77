"""The built-in job type: exact top-k for many query vectors, or for items by id.

The planner validates on the loop with a few vectorised numpy calls (no per-query Python
validation), normalises the queries like Search does, and cuts them into chunks of
`jobs_chunk_queries`. Each chunk is one pool call: a scan of the whole table for all of
the chunk's queries, stopping between table chunks when the job is cancelled.
Item-id queries use the item's own vector, so the item itself is normally its first hit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from compute.errors import InvalidArgument
from compute.jobs.types import Chunk, job_type
from compute.operations import check_k
from compute.search import top_k_batch
from compute.table import MAX_ID_BYTES, EmbeddingTable
from offload.v1 import jobs_pb2, search_pb2

if TYPE_CHECKING:
    from compute.runtime import Runtime
    from compute.worker import TaskContext


@dataclass(frozen=True, slots=True)
class SearchChunk:
    k: int
    queries: np.ndarray | None  # unit float32 (n x dim), or
    rows: np.ndarray | None  # table rows whose vectors are the queries


def search_chunk(chunk: SearchChunk, task: "TaskContext") -> bytes:
    """Runs in a pool worker: the chunk's top-k lists as a serialized BatchSearchResult."""
    table = task.table
    queries = chunk.queries if chunk.queries is not None else table.vectors[chunk.rows]
    found = top_k_batch(table.vectors, table.ids, queries, chunk.k, chunk_rows=task.chunk_rows, check=task.check)
    hits = search_pb2.SearchHit
    return jobs_pb2.BatchSearchResult(
        results=[jobs_pb2.BatchSearchHits(hits=[hits(id=table.id_at(row), score=score) for row, score in query_hits]) for query_hits in found]
    ).SerializeToString()


@job_type("batch_search", chunk=search_chunk)
def plan_batch_search(spec: jobs_pb2.BatchSearchSpec, runtime: "Runtime") -> list[Chunk]:
    settings = runtime.settings
    check_k(spec.k, settings.max_k, "batch_search.k")
    count = len(spec.vectors) or len(spec.item_ids)
    if count > settings.jobs_max_queries:
        raise InvalidArgument(f"a job takes at most {settings.jobs_max_queries} queries")
    size = settings.jobs_chunk_queries
    if spec.vectors:
        queries = _unit_queries(spec.vectors, runtime.table.dim)
        return [Chunk(SearchChunk(spec.k, queries[i : i + size], None), len(queries[i : i + size])) for i in range(0, count, size)]
    rows = _rows_of(spec.item_ids, runtime.table)
    return [Chunk(SearchChunk(spec.k, None, rows[i : i + size]), len(rows[i : i + size])) for i in range(0, count, size)]


def _unit_queries(vectors, dim: int) -> np.ndarray:
    for index, vector in enumerate(vectors):
        if len(vector.values) != dim:
            raise InvalidArgument(f"vectors[{index}] must have {dim} values, got {len(vector.values)}")
    matrix = np.array([vector.values for vector in vectors], dtype=np.float32).reshape(len(vectors), dim)
    finite = np.isfinite(matrix).all(axis=1)
    if not finite.all():
        raise InvalidArgument(f"vectors[{int(np.argmin(finite))}] contains NaN or Infinity")
    norms = np.linalg.norm(matrix.astype(np.float64), axis=1)
    bad = (norms == 0.0) | ~np.isfinite(norms)
    if bad.any():
        raise InvalidArgument(f"vectors[{int(np.argmax(bad))}] has zero length: cosine similarity is undefined")
    # Same arithmetic as normalised_query (Search): float32 values / float32 norm.
    return (matrix / norms.astype(np.float32)[:, None]).astype(np.float32)


def _rows_of(item_ids, table: EmbeddingTable) -> np.ndarray:
    """Rows of all ids at once (one searchsorted); never echoes an id in an error."""
    keys = [item_id.encode("utf-8") for item_id in item_ids]
    width = table.ids.dtype.itemsize
    for index, key in enumerate(keys):
        if not key or len(key) > min(width, MAX_ID_BYTES) or b"\0" in key:
            raise InvalidArgument(f"item_ids[{index}] is not a known item")
    wanted = np.array(keys, dtype=table.ids.dtype)
    positions = np.minimum(np.searchsorted(table.ids, wanted, sorter=table.id_order), table.rows - 1)
    rows = table.id_order[positions].astype(np.int64)
    found = table.ids[rows] == wanted
    if not found.all():
        raise InvalidArgument(f"item_ids[{int(np.argmin(found))}] is not a known item")
    return rows
