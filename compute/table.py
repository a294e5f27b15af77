"""The embedding table: N unit-normalised float32 vectors of dimension D, each with a string id.

Three shared arrays: `vectors` (N x D float32), `ids` (N fixed-width UTF-8 bytes) and
`id_order` (argsort of ids, for O(log N) lookups without a Python dict of N strings).
compute builds them once; pool workers attach the same pages read-only: one copy in RAM.
"""

from __future__ import annotations

import ctypes
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from compute import shm
from compute.errors import InvalidArgument

log = logging.getLogger("compute.table")

# Rows produced per step when filling the table: bounds temporary memory, and fixes the
# random stream so the synthetic table depends only on (rows, dim, seed).
FILL_CHUNK_ROWS = 65536
MAX_ID_BYTES = 256


@dataclass(frozen=True, slots=True)
class TableSpec:
    vectors: shm.ArraySpec
    ids: shm.ArraySpec
    id_order: shm.ArraySpec
    generation: int
    source: str


class EmbeddingTable:
    """Use `build()` in compute (owner) or `attach()` in pool workers (read-only)."""

    def __init__(self, spec: TableSpec, vectors: np.ndarray, ids: np.ndarray, id_order: np.ndarray, owner: bool) -> None:
        self.spec = spec
        self.vectors = vectors
        self.ids = ids
        self.id_order = id_order
        self._owner = owner

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        directory: Path,
        *,
        rows: int,
        dim: int,
        seed: int,
        vectors_path: Path | None = None,
        ids_path: Path | None = None,
        generation: int = 1,
    ) -> "EmbeddingTable":
        """Create the segments and fill them (synthetic from a seed, or from a .npy file)."""
        started = time.perf_counter()
        source_array = None
        if vectors_path is not None:
            source_array = np.load(vectors_path, mmap_mode="r", allow_pickle=False)
            if source_array.ndim != 2 or source_array.shape[0] < 1 or source_array.dtype.kind != "f":
                raise ValueError(f"{vectors_path}: expected a 2-D float array, got {source_array.dtype} {source_array.shape}")
            rows, dim = source_array.shape
        ids = _load_ids(ids_path, rows) if ids_path is not None else _synthetic_ids(rows)

        tag = f"g{generation}"
        vectors, vectors_spec = shm.create(directory, f"{tag}-vectors", np.float32, (rows, dim))
        created = [vectors_spec]
        try:
            ids_array, ids_spec = shm.create(directory, f"{tag}-ids", ids.dtype, ids.shape)
            created.append(ids_spec)
            ids_array[:] = ids
            order = np.argsort(ids, kind="stable").astype(np.int64)
            sorted_ids = ids[order]
            if rows > 1 and np.any(sorted_ids[1:] == sorted_ids[:-1]):
                raise ValueError("ids must be unique")
            order_array, order_spec = shm.create(directory, f"{tag}-order", np.int64, (rows,))
            created.append(order_spec)
            order_array[:] = order
            if source_array is not None:
                _copy_normalised(source_array, vectors)
            else:
                _fill_synthetic(vectors, seed)
        except BaseException:
            for spec in created:
                shm.unlink(spec)
            raise
        _release_freed_memory()
        source = str(vectors_path) if vectors_path is not None else f"synthetic(rows={rows}, dim={dim}, seed={seed})"
        spec = TableSpec(vectors_spec, ids_spec, order_spec, generation, source)
        table = cls(spec, vectors, ids_array, order_array, owner=True)
        log.info(
            "table built",
            extra={"rows": rows, "dim": dim, "bytes": table.nbytes, "seconds": round(time.perf_counter() - started, 3)},
        )
        return table

    @classmethod
    def attach(cls, spec: TableSpec) -> "EmbeddingTable":
        """Map the owner's segments read-only: no copy, no pickling, no resource tracker."""
        return cls(spec, shm.attach(spec.vectors), shm.attach(spec.ids), shm.attach(spec.id_order), owner=False)

    def unlink(self) -> None:
        """Owner only; idempotent. Mappings stay valid until the processes drop them."""
        if self._owner:
            for spec in (self.spec.vectors, self.spec.ids, self.spec.id_order):
                shm.unlink(spec)

    # -- queries ----------------------------------------------------------------------------

    @property
    def rows(self) -> int:
        return self.vectors.shape[0]

    @property
    def dim(self) -> int:
        return self.vectors.shape[1]

    @property
    def nbytes(self) -> int:
        return self.vectors.nbytes + self.ids.nbytes + self.id_order.nbytes

    def row_of(self, item_id: str) -> int | None:
        """Row index of `item_id`, or None. Binary search over the sorted id order."""
        key = item_id.encode("utf-8")
        if not key or len(key) > self.ids.dtype.itemsize or b"\0" in key:
            return None
        position = int(np.searchsorted(self.ids, key, sorter=self.id_order))
        if position < self.rows:
            row = int(self.id_order[position])
            if self.ids[row] == key:
                return row
        return None

    def id_at(self, row: int) -> str:
        return self.ids[row].decode("utf-8")


def _release_freed_memory() -> None:
    """Give the build's temporaries (argsort, sorted ids) back to the OS: glibc keeps them otherwise."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def synthetic_arrays(rows: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The synthetic table as private arrays (vectors, ids): what a naive design holds per process."""
    vectors = np.empty((rows, dim), dtype=np.float32)
    _fill_synthetic(vectors, seed)
    return vectors, _synthetic_ids(rows)


def _synthetic_ids(rows: int) -> np.ndarray:
    return np.char.add(b"item-", np.arange(rows).astype("S"))


def _load_ids(path: Path, rows: int) -> np.ndarray:
    lines = path.read_text(encoding="utf-8").splitlines()
    if len(lines) != rows:
        raise ValueError(f"{path}: {len(lines)} ids for {rows} vectors")
    encoded = [line.encode("utf-8") for line in lines]
    for number, value in enumerate(encoded, start=1):
        if not value or len(value) > MAX_ID_BYTES or b"\0" in value:
            raise ValueError(f"{path}:{number}: ids must be 1..{MAX_ID_BYTES} bytes without NUL")
    return np.array(encoded, dtype="S")


def _fill_synthetic(out: np.ndarray, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for start in range(0, out.shape[0], FILL_CHUNK_ROWS):
        block = rng.standard_normal((min(FILL_CHUNK_ROWS, out.shape[0] - start), out.shape[1]), dtype=np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        out[start : start + block.shape[0]] = block


def _copy_normalised(source: np.ndarray, out: np.ndarray) -> None:
    for start in range(0, out.shape[0], FILL_CHUNK_ROWS):
        block = np.asarray(source[start : start + FILL_CHUNK_ROWS], dtype=np.float32)
        if not np.isfinite(block).all():
            raise ValueError(f"vectors file has NaN/Inf in rows {start}..{start + len(block) - 1}")
        norms = np.linalg.norm(block, axis=1, keepdims=True)
        if (norms == 0).any():
            raise ValueError(f"vectors file has a zero vector near row {start}: cosine similarity is undefined")
        out[start : start + block.shape[0]] = block / norms


def normalised_query(values, dim: int) -> np.ndarray:
    """Validate a query vector (dimension, finiteness, non-zero) and return it unit-length."""
    if len(values) == 0:
        raise InvalidArgument("vector is empty")
    if len(values) != dim:
        raise InvalidArgument(f"vector must have {dim} values, got {len(values)}")
    query = np.asarray(values, dtype=np.float32)
    if not np.isfinite(query).all():
        raise InvalidArgument("vector contains NaN or Infinity")
    norm = float(np.linalg.norm(query.astype(np.float64)))
    if norm == 0.0 or not np.isfinite(norm):
        raise InvalidArgument("vector has zero length: cosine similarity is undefined")
    return (query / np.float32(norm)).astype(np.float32)
