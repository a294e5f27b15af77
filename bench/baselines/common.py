"""What both naive apps share: settings from env, a private copy of the table, the route logic.

Each process that calls `load_table()` holds its own copy of the table in private memory:
that is the point of the naive designs (N workers, N copies). Lookups and Search use the same
code as compute (`compute.table`, `compute.search`) so every design does identical work.
Kept free of FastAPI imports: ProcessPoolExecutor workers import this module only.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import numpy as np

from compute.search import top_k
from compute.table import normalised_query, synthetic_arrays


@dataclass(frozen=True, slots=True)
class BaselineSettings:
    rows: int
    dim: int
    seed: int
    pool_size: int
    max_k: int = 1000

    @classmethod
    def from_env(cls) -> "BaselineSettings":
        env = os.environ
        return cls(
            rows=int(env.get("BENCH_ROWS", "100000")),
            dim=int(env.get("BENCH_DIM", "128")),
            seed=int(env.get("BENCH_SEED", "42")),
            pool_size=int(env.get("BENCH_POOL_SIZE", "1")),
        )


class PrivateTable:
    """vectors + ids + sorted-id order, exactly what compute's table holds, in private memory."""

    def __init__(self, settings: BaselineSettings) -> None:
        self.vectors, self.ids = synthetic_arrays(settings.rows, settings.dim, settings.seed)
        self.id_order = np.argsort(self.ids, kind="stable").astype(np.int64)
        self.dim = settings.dim

    @property
    def nbytes(self) -> int:
        return self.vectors.nbytes + self.ids.nbytes + self.id_order.nbytes

    def row_of(self, item_id: str) -> int | None:
        key = item_id.encode("utf-8")
        if not key or len(key) > self.ids.dtype.itemsize:
            return None
        position = int(np.searchsorted(self.ids, key, sorter=self.id_order))
        if position < self.vectors.shape[0]:
            row = int(self.id_order[position])
            if self.ids[row] == key:
                return row
        return None

    def search(self, vector: list[float], k: int) -> dict:
        query = normalised_query(vector, self.dim)
        hits = top_k(self.vectors, self.ids, query, k)
        return {"hits": [{"id": self.ids[row].decode(), "score": score} for row, score in hits]}


# -- ProcessPoolExecutor worker side (naive-executor) ------------------------------------------

_WORKER_TABLE: PrivateTable | None = None


def worker_init(settings: BaselineSettings) -> None:
    """Executor initializer: every pool process builds its own copy (the naive 'after')."""
    global _WORKER_TABLE
    _WORKER_TABLE = PrivateTable(settings)


def worker_ready() -> int:
    return os.getpid()


def worker_search(vector: list[float], k: int) -> dict:
    assert _WORKER_TABLE is not None, "worker_init did not run"
    return _WORKER_TABLE.search(vector, k)


def announce_ready(name: str, table: PrivateTable) -> None:
    """One line per worker; the bench orchestrator counts these to know all workers are up."""
    print(f"bench worker ready: {name} pid={os.getpid()} table_bytes={table.nbytes}", file=sys.stderr, flush=True)
