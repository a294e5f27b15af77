"""The shared-memory table and its segments, in-process."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from compute import shm
from compute.table import EmbeddingTable


@pytest.fixture
def segdir(tmp_path):
    directory = tmp_path / "shm"
    directory.mkdir()
    return directory


def write_source(tmp_path, vectors: np.ndarray, ids: list[str]):
    vectors_path, ids_path = tmp_path / "vectors.npy", tmp_path / "ids.txt"
    np.save(vectors_path, vectors)
    ids_path.write_text("\n".join(ids) + "\n", encoding="utf-8")
    return vectors_path, ids_path


def build_from(segdir, vectors_path, ids_path) -> EmbeddingTable:
    return EmbeddingTable.build(segdir, rows=0, dim=0, seed=0, vectors_path=vectors_path, ids_path=ids_path)


def test_build_from_npy_and_ids(tmp_path, segdir):
    rng = np.random.default_rng(1)
    raw = rng.standard_normal((50, 8)) * 3  # float64, not normalised
    ids = [f"doc/{n:03d}-é" for n in range(50)][::-1]
    table = build_from(segdir, *write_source(tmp_path, raw, ids))
    try:
        assert (table.rows, table.dim) == (50, 8)
        assert table.vectors.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(table.vectors, axis=1), 1, rtol=1e-6)
        np.testing.assert_allclose(table.vectors, raw / np.linalg.norm(raw, axis=1, keepdims=True), rtol=1e-6)
        for row, item_id in enumerate(ids):
            assert table.row_of(item_id) == row
            assert table.id_at(row) == item_id
        assert table.row_of("doc/999-é") is None
        assert table.row_of("") is None
        assert table.row_of("x" * 10_000) is None
        assert table.row_of("doc/000") is None  # a prefix is not a match
        assert table.row_of("doc/000-é\0") is None
        assert len(list(segdir.iterdir())) == 3
        assert table.nbytes == sum(os.path.getsize(p) for p in segdir.iterdir())
    finally:
        table.unlink()
    assert list(segdir.iterdir()) == []


def test_synthetic_table_is_deterministic(segdir):
    first = EmbeddingTable.build(segdir, rows=300, dim=4, seed=9, generation=1)
    second = EmbeddingTable.build(segdir, rows=300, dim=4, seed=9, generation=2)
    try:
        np.testing.assert_array_equal(first.vectors, second.vectors)
        assert first.row_of("item-299") == 299 and first.row_of("item-300") is None
    finally:
        first.unlink()
        second.unlink()


@pytest.mark.parametrize(
    "mutate, ids_change, message",
    [
        (None, lambda ids: ids[:3] + [ids[2]] + ids[4:], "ids must be unique"),
        (lambda v: v.__setitem__((5, slice(None)), 0.0), None, "zero vector"),
        (lambda v: v.__setitem__((7, 1), np.nan), None, "NaN/Inf"),
        (lambda v: v.__setitem__((7, 1), np.inf), None, "NaN/Inf"),
        (None, lambda ids: ids[:-1], "ids for"),
        (None, lambda ids: ids[:4] + [""] + ids[5:], "ids must be 1.."),
    ],
)
def test_bad_sources_are_refused_and_leave_no_segment(tmp_path, segdir, mutate, ids_change, message):
    vectors = np.random.default_rng(2).standard_normal((20, 4)).astype(np.float32)
    ids = [f"id-{n}" for n in range(20)]
    if mutate:
        mutate(vectors)
    if ids_change:
        ids = ids_change(ids)
    with pytest.raises(ValueError, match=message):
        build_from(segdir, *write_source(tmp_path, vectors, ids))
    assert list(segdir.iterdir()) == []


def test_attached_table_is_read_only(segdir):
    table = EmbeddingTable.build(segdir, rows=100, dim=4, seed=1)
    try:
        attached = EmbeddingTable.attach(table.spec)
        np.testing.assert_array_equal(attached.vectors, table.vectors)
        assert attached.row_of("item-42") == 42
        with pytest.raises(ValueError, match="read-only"):
            attached.vectors[0, 0] = 1.0
        with pytest.raises(ValueError, match="read-only"):
            attached.ids[0] = b"x"
        with pytest.raises(ValueError):
            attached.vectors.setflags(write=True)  # not even by asking numpy
        # The owner's writes are visible through the mapping: same pages, not a copy.
        table.vectors[0, 0] = 0.5
        assert attached.vectors[0, 0] == 0.5
        attached.unlink()  # not the owner: a no-op
        assert len(list(segdir.iterdir())) == 3
    finally:
        table.unlink()
    assert list(segdir.iterdir()) == []


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_sweep_removes_segments_of_dead_owners_only(segdir):
    gone = dead_pid()
    live = os.getppid()  # pytest's parent: alive for the whole test
    for name in (f"offload-{gone}-g1-vectors", f"offload-{gone}-control", f"offload-{live}-g1-vectors", "unrelated-file"):
        (segdir / name).write_bytes(b"x")
    mine, _ = shm.create(segdir, "mine", np.float32, (4,))
    removed = shm.sweep_stale(segdir)
    assert sorted(removed) == sorted([f"offload-{gone}-g1-vectors", f"offload-{gone}-control"])
    assert sorted(p.name for p in segdir.iterdir()) == sorted(
        [f"offload-{live}-g1-vectors", "unrelated-file", f"offload-{os.getpid()}-mine"]
    )
    assert shm.sweep_stale(segdir) == []
    assert shm.sweep_stale(segdir / "missing") == []


def test_segments_have_owner_only_permissions(segdir):
    _, spec = shm.create(segdir, "private", np.uint8, (16,))
    assert os.stat(spec.path).st_mode & 0o777 == 0o600
    with pytest.raises(FileExistsError):
        shm.create(segdir, "private", np.uint8, (16,))
    shm.unlink(spec)
    shm.unlink(spec)  # idempotent


def test_ids_files_with_crlf_lines_or_no_final_newline_load_the_same(tmp_path, segdir):
    vectors = np.random.default_rng(4).standard_normal((3, 4)).astype(np.float32)
    vectors_path = tmp_path / "vectors.npy"
    np.save(vectors_path, vectors)
    for name, text in (("crlf.txt", b"a\r\nbb\r\nc\xc3\xa9\r\n"), ("bare.txt", b"a\nbb\nc\xc3\xa9")):
        (tmp_path / name).write_bytes(text)
        table = build_from(segdir, vectors_path, tmp_path / name)
        try:
            assert [table.id_at(row) for row in range(3)] == ["a", "bb", "cé"] and table.row_of("cé") == 2
        finally:
            table.unlink()
    (tmp_path / "latin1.txt").write_bytes(b"a\nb\n\xe9\n")
    with pytest.raises(ValueError, match="not UTF-8"):
        build_from(segdir, vectors_path, tmp_path / "latin1.txt")
