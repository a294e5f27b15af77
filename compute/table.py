"""The embedding table: N unit-normalised float32 vectors of dimension D, each with a string id.

Three shared arrays: `vectors` (N x D float32), `ids` (N fixed-width UTF-8 bytes) and
`id_order` (argsort of ids, for O(log N) lookups without a Python dict of N strings).
compute builds them once; pool workers attach the same pages read-only: one copy in RAM.
"""

from __future__ import annotations

import ctypes
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from compute import shm
from compute.errors import InvalidArgument

log = logging.getLogger("compute.table")

# Rows produced per step when filling the table: bounds temporary memory, and fixes the
# random stream so the synthetic table depends only on (rows, dim, seed).
FILL_CHUNK_ROWS = 65536
ID_WINDOW_BYTES = 1 << 20  # an ids file is split this much at a time (see _load_ids)
MAX_ID_BYTES = 256


class LoadCancelled(Exception):
    """A load was asked to stop (compute is shutting down); nothing of it is left."""


@dataclass(frozen=True, slots=True)
class TableSource:
    """Where a table comes from: a 2-D float `.npy` file (ids from a text file, or `item-<row>`),
    or, without a file, a synthetic table of `rows` x `dim` drawn from `seed`."""

    vectors_path: Path | None = None
    ids_path: Path | None = None
    rows: int = 0
    dim: int = 0
    seed: int = 0

    def describe(self) -> str:
        if self.vectors_path is None:
            return f"synthetic(rows={self.rows}, dim={self.dim}, seed={self.seed})"
        return str(self.vectors_path) if self.ids_path is None else f"{self.vectors_path} (ids {self.ids_path})"

    def to_json(self) -> dict:
        if self.vectors_path is None:
            return {"synthetic": {"rows": self.rows, "dim": self.dim, "seed": self.seed}}
        return {"file": {"vectors_path": str(self.vectors_path), "ids_path": str(self.ids_path or "")}}

    @classmethod
    def from_json(cls, value: dict) -> "TableSource":
        if "synthetic" in value:
            spec = value["synthetic"]
            return cls(rows=int(spec["rows"]), dim=int(spec["dim"]), seed=int(spec["seed"]))
        spec = value["file"]
        return cls(Path(spec["vectors_path"]), Path(spec["ids_path"]) if spec.get("ids_path") else None)


@dataclass(frozen=True, slots=True)
class TablePlan:
    """A source read and checked up to the copy: its shape, its ids, the bytes it will take."""

    source: TableSource
    rows: int
    dim: int
    ids: np.ndarray | None  # fixed-width UTF-8 bytes, one per row; None: `item-<row>`, made by the load

    @property
    def id_bytes(self) -> int:
        return self.ids.dtype.itemsize if self.ids is not None else len(f"item-{self.rows - 1}")

    @property
    def nbytes(self) -> int:
        """Shared memory the table takes: vectors, ids, and the ids' sort order."""
        return self.rows * (self.dim * 4 + self.id_bytes + 8)


def plan(source: TableSource, *, read_ids: bool = True) -> TablePlan:
    """Read a source's header and ids (unless `read_ids` is False: a first look, to check the
    shape and the room needed before reading a big ids file), without copying its vectors.
    Raises ValueError (a bad source: the message names the file and what is wrong) or OSError."""
    if source.vectors_path is None:
        if source.rows < 1 or source.dim < 1:
            raise ValueError("a synthetic table needs rows >= 1 and dim >= 1")
        return TablePlan(source, source.rows, source.dim, None)
    rows, dim = _npy_shape(source.vectors_path)
    ids = _load_ids(source.ids_path, rows) if source.ids_path is not None and read_ids else None
    return TablePlan(source, rows, dim, ids)


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
        return cls.load(directory, plan(TableSource(vectors_path, ids_path, rows, dim, seed)), generation)

    @classmethod
    def load(
        cls, directory: Path, planned: TablePlan, generation: int, stop: Callable[[], bool] = lambda: False
    ) -> "EmbeddingTable":
        """Create generation `generation`'s segments and fill them from a planned source.

        Every byte is reserved up front (shm.create), so a full /dev/shm is an OSError here,
        never a SIGBUS while copying. Raises ValueError for bad data (NaN, a zero vector,
        duplicate ids), LoadCancelled once `stop()` says so (asked between blocks); nothing
        is left behind on any error.
        """
        started = time.perf_counter()
        source, rows, dim = planned.source, planned.rows, planned.dim
        ids = planned.ids if planned.ids is not None else _synthetic_ids(rows)
        if stop():
            raise LoadCancelled("the load was stopped")
        tag = f"g{generation}"
        created = []
        try:
            order = np.argsort(ids, kind="stable").astype(np.int64)
            sorted_ids = ids[order]
            if rows > 1 and np.any(sorted_ids[1:] == sorted_ids[:-1]):
                raise ValueError("ids must be unique")
            del sorted_ids
            vectors, vectors_spec = shm.create(directory, f"{tag}-vectors", np.float32, (rows, dim))
            created.append(vectors_spec)
            ids_array, ids_spec = shm.create(directory, f"{tag}-ids", ids.dtype, ids.shape)
            created.append(ids_spec)
            for start in range(0, rows, FILL_CHUNK_ROWS):  # numpy copies bytes strings holding the GIL: in blocks
                ids_array[start : start + FILL_CHUNK_ROWS] = ids[start : start + FILL_CHUNK_ROWS]
            order_array, order_spec = shm.create(directory, f"{tag}-order", np.int64, (rows,))
            created.append(order_spec)
            order_array[:] = order
            del order
            if source.vectors_path is not None:
                _copy_normalised(_npy_blocks(source.vectors_path, rows), vectors, stop)
            else:
                _fill_synthetic(vectors, source.seed, stop)
        except BaseException:
            for spec in created:
                shm.unlink(spec)
            raise
        _release_freed_memory()
        spec = TableSpec(vectors_spec, ids_spec, order_spec, generation, source.describe())
        table = cls(spec, vectors, ids_array, order_array, owner=True)
        log.info(
            "table built",
            extra={
                "generation": generation, "rows": rows, "dim": dim, "bytes": table.nbytes,
                "seconds": round(time.perf_counter() - started, 3),
            },
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
    """b"item-0", b"item-1", ...: made a block at a time, because numpy's string functions hold
    the GIL throughout, and a load runs in a thread next to the serving loop."""
    ids = np.empty(rows, dtype=f"S{len(f'item-{rows - 1}')}")
    for start in range(0, rows, FILL_CHUNK_ROWS):
        ids[start : start + FILL_CHUNK_ROWS] = np.char.add(b"item-", np.arange(start, min(rows, start + FILL_CHUNK_ROWS)).astype("S"))
    return ids


def _load_ids(path: Path, rows: int) -> np.ndarray:
    """One id per line (UTF-8; lines end with \\n or \\r\\n). Kept as bytes from the file on, and
    worked through a window of about 1 MiB at a time, then put into the array a block at a
    time: each C call (decode, split, numpy's conversion) holds the GIL throughout, and a load
    runs in a thread next to the serving loop (30M ids in one call would stall it for seconds)."""
    data = path.read_bytes()
    size = len(data) - 1 if data.endswith(b"\n") else len(data)  # the last line's newline ends no line
    lines: list[bytes] = []
    start = 0
    while start < size:
        end = data.find(b"\n", start + ID_WINDOW_BYTES, size)  # a newline byte is never inside a UTF-8 character
        end = size if end < 0 else end
        window = data[start:end]
        try:
            window.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path}: not UTF-8 text (byte {start + exc.start})") from None
        lines.extend(window.split(b"\n"))
        start = end + 1
    del data
    if len(lines) != rows:
        raise ValueError(f"{path}: {len(lines)} ids for {rows} vectors")
    width = 1
    for number, value in enumerate(lines, start=1):
        if value.endswith(b"\r"):
            value = lines[number - 1] = value[:-1]
        if not value or len(value) > MAX_ID_BYTES or b"\0" in value or b"\r" in value:
            raise ValueError(f"{path}:{number}: ids must be 1..{MAX_ID_BYTES} bytes without NUL or carriage return")
        width = max(width, len(value))
    ids = np.empty(rows, dtype=f"S{width}")
    for start in range(0, rows, FILL_CHUNK_ROWS):
        ids[start : start + FILL_CHUNK_ROWS] = lines[start : start + FILL_CHUNK_ROWS]
    return ids


def _fill_synthetic(out: np.ndarray, seed: int, stop: Callable[[], bool] = lambda: False) -> None:
    rng = np.random.default_rng(seed)
    for start in range(0, out.shape[0], FILL_CHUNK_ROWS):
        if stop():
            raise LoadCancelled("the load was stopped")
        block = rng.standard_normal((min(FILL_CHUNK_ROWS, out.shape[0] - start), out.shape[1]), dtype=np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        out[start : start + block.shape[0]] = block


def _npy_shape(path: Path) -> tuple[int, int]:
    """(rows, dim) of a 2-D float .npy file, from its header alone."""
    array = np.load(path, mmap_mode="r", allow_pickle=False)
    try:
        if array.ndim != 2 or array.shape[0] < 1 or array.shape[1] < 1 or array.dtype.kind != "f":
            raise ValueError(f"{path}: expected a 2-D float array, got {array.dtype} {array.shape}")
        return int(array.shape[0]), int(array.shape[1])
    finally:
        del array


def _npy_blocks(path: Path, rows: int) -> Iterator[np.ndarray]:
    """The rows of a .npy file, FILL_CHUNK_ROWS at a time, in one reused buffer (each block is
    valid until the next is read).

    Read with plain reads, not through a mapping: a mapped file's pages count in compute's
    memory (PSS) while they stay mapped, a third copy of the table at the peak of a swap. One
    buffer, not one per block: a fresh 32 MiB allocation is a fresh mapping from the kernel,
    paid in page faults at every block.
    """
    array = np.load(path, mmap_mode="r", allow_pickle=False)
    if array.shape[0] != rows:
        raise ValueError(f"{path} changed while it was being loaded")
    if not array.flags.c_contiguous:  # Fortran order: rows are not contiguous, read through the mapping
        for start in range(0, rows, FILL_CHUNK_ROWS):
            yield np.array(array[start : start + FILL_CHUNK_ROWS])
        return
    dtype, dim, offset = array.dtype, array.shape[1], array.offset
    del array
    buffer = np.empty((min(FILL_CHUNK_ROWS, rows), dim), dtype=dtype)
    with open(path, "rb") as file:
        file.seek(offset)
        for start in range(0, rows, FILL_CHUNK_ROWS):
            block = buffer[: min(FILL_CHUNK_ROWS, rows - start)]
            if file.readinto(memoryview(block).cast("B")) != block.nbytes:
                raise ValueError(f"{path} is shorter than its header says")
            yield block


def _copy_normalised(blocks: Iterator[np.ndarray], out: np.ndarray, stop: Callable[[], bool] = lambda: False) -> None:
    """Each block's rows, divided by their norms, straight into `out`, with one scratch buffer
    for all blocks (see _npy_blocks). The norms are np.linalg.norm's arithmetic exactly
    (squares, then numpy's pairwise sum along the row): a file loads to the same float32 values
    whatever the version of this loop."""
    start = 0
    scratch = None
    for raw in blocks:
        if stop():
            raise LoadCancelled("the load was stopped")
        end = start + raw.shape[0]
        target = out[start:end]
        if raw.dtype == np.float32:
            block = raw
        else:
            target[:] = raw  # the conversion lands in place
            block = target
        if scratch is None or scratch.shape[0] < block.shape[0]:
            scratch = np.empty_like(block)
        squares = np.multiply(block, block, out=scratch[: block.shape[0]])
        norms = np.sqrt(np.add.reduce(squares, axis=1, keepdims=True))
        if not np.isfinite(norms).all():
            if not np.isfinite(block).all():
                raise ValueError(f"vectors file has NaN/Inf in rows {start}..{end - 1}")
            norms = np.linalg.norm(block.astype(np.float64), axis=1, keepdims=True)  # huge values: no overflow
        if (norms == 0).any():
            raise ValueError(f"vectors file has a zero vector near row {start}: cosine similarity is undefined")
        np.divide(block, norms, out=target, casting="unsafe")
        start = end


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
