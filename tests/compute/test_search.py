"""Exact top-k: identical to a full numpy sort by (score desc, id asc), whatever the chunking."""

from __future__ import annotations

import math

import numpy as np
import pytest

from compute.search import top_k, top_k_batch


def random_table(rng, rows: int, dim: int, duplicates: int = 0):
    """Unit vectors with string ids; `duplicates` rows copy other rows (ties, different ids)."""
    vectors = rng.standard_normal((rows, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    if duplicates:
        sources = rng.integers(0, rows, duplicates)
        targets = rng.choice(rows, duplicates, replace=False)
        vectors[targets] = vectors[sources]
    ids = np.array([f"id-{n}".encode() for n in rng.permutation(rows)])  # ids not in row order
    return vectors, ids


def reference(vectors, ids, query, k):
    """Each row's exact dot product (math.fsum of float64 products, exact for float32 inputs)
    rounded to float32, then a full sort by (-score, id). Identical rows score identically."""
    q = query.astype(np.float64)
    scores = np.array([math.fsum(row.astype(np.float64) * q) for row in vectors]).astype(np.float32)
    order = np.lexsort((ids, -scores))[:k]
    return [(int(row), float(scores[row])) for row in order]


def unit(rng, dim):
    query = rng.standard_normal(dim).astype(np.float32)
    return query / np.linalg.norm(query)


def assert_same(got, expected):
    assert [row for row, _ in got] == [row for row, _ in expected]
    np.testing.assert_allclose([s for _, s in got], [s for _, s in expected], rtol=0, atol=1e-6)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("chunk_rows", [7, 64, 32768])
def test_top_k_equals_a_full_sort(seed, chunk_rows):
    rng = np.random.default_rng(seed)
    rows, dim = int(rng.integers(1, 400)), int(rng.integers(1, 40))
    vectors, ids = random_table(rng, rows, dim, duplicates=rows // 3)
    for k in (1, 3, 10, rows - 1, rows, rows + 5, 1000):
        if k < 1:
            continue
        query = unit(rng, dim)
        got = top_k(vectors, ids, query, k, chunk_rows=chunk_rows)
        assert len(got) == min(k, rows)
        assert_same(got, reference(vectors, ids, query, k))


def test_ties_are_broken_by_id_across_chunks():
    rng = np.random.default_rng(11)
    base = unit(rng, 16)
    vectors = np.tile(base, (100, 1))  # 100 identical vectors, every score ties
    ids = np.array([f"k{n:03d}".encode() for n in rng.permutation(100)])
    for chunk_rows in (1, 3, 16, 1000):
        got = top_k(vectors, ids, base, 10, chunk_rows=chunk_rows)
        assert [ids[row] for row, _ in got] == sorted(ids)[:10]
        assert len({score for _, score in got}) == 1


def test_a_row_of_the_table_ranks_itself_first():
    rng = np.random.default_rng(5)
    vectors, ids = random_table(rng, 500, 32)
    for row in (0, 123, 499):
        [(best, score)] = top_k(vectors, ids, vectors[row], 1, chunk_rows=50)
        assert best == row and score == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("seed", range(4))
def test_top_k_batch_with_a_k_per_query_equals_brute_force(seed):
    rng = np.random.default_rng(100 + seed)
    rows, dim = int(rng.integers(1, 300)), int(rng.integers(1, 24))
    vectors, ids = random_table(rng, rows, dim, duplicates=rows // 4)
    queries = np.stack([unit(rng, dim) for _ in range(5)] + [vectors[0]])  # a query equal to a row
    for ks in ([1] * 6, [5, 1, rows, rows + 3, 2, 7], [rows] * 6):
        batch = top_k_batch(vectors, ids, queries, ks, chunk_rows=17)
        assert len(batch) == len(queries)
        for query, k, got in zip(queries, ks, batch):
            assert_same(got, reference(vectors, ids, query, k))


class RecordedMatrix(np.ndarray):
    """The table, recording how many queries each matrix product against it carried."""

    products: list[int]

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        if ufunc is np.matmul:
            RecordedMatrix.products.append(inputs[0].shape[0])
        plain = [x.view(np.ndarray) if isinstance(x, RecordedMatrix) else x for x in inputs]
        return getattr(ufunc, method)(*plain, **kwargs)


def test_queries_that_leave_drop_out_of_the_scan_and_the_rest_stay_exact():
    rng = np.random.default_rng(9)
    vectors, ids = random_table(rng, 2000, 8, duplicates=500)
    queries = np.stack([unit(rng, 8) for _ in range(4)])
    ks = [3, 10, 1, 50]
    wanted = np.ones(4, dtype=bool)
    checks = []

    def check():  # query 1 leaves before the 3rd chunk, query 3 before the 6th
        checks.append(1)
        if len(checks) == 3:
            wanted[1] = False
        if len(checks) == 6:
            wanted[3] = False
        return wanted

    RecordedMatrix.products = []
    found = top_k_batch(vectors.view(RecordedMatrix), ids, queries, ks, chunk_rows=100, check=check)
    assert RecordedMatrix.products == [4, 4, 3, 3, 3] + [2] * 15, "a query that left must cost no more products"
    assert found[1] is None and found[3] is None
    for q in (0, 2):
        assert_same(found[q], reference(vectors, ids, queries[q], ks[q]))

    # When every query has left, the scan stops.
    RecordedMatrix.products = []
    gone = np.zeros(4, dtype=bool)
    assert top_k_batch(vectors.view(RecordedMatrix), ids, queries, ks, chunk_rows=100, check=lambda: gone) == [None] * 4
    assert RecordedMatrix.products == []


@pytest.mark.parametrize("search", ["single", "batch"])
def test_check_raising_stops_the_scan(search):
    rng = np.random.default_rng(3)
    vectors, ids = random_table(rng, 1000, 8)
    calls = []

    class Stop(Exception):
        pass

    def check():
        calls.append(1)
        if len(calls) == 3:
            raise Stop

    with pytest.raises(Stop):
        if search == "single":
            top_k(vectors, ids, unit(rng, 8), 5, chunk_rows=100, check=check)
        else:
            top_k_batch(vectors, ids, np.stack([unit(rng, 8)] * 2), 5, chunk_rows=100, check=check)
    assert len(calls) == 3, "the scan must stop at the first check that raises"

    calls.clear()
    top_k(vectors, ids, unit(rng, 8), 5, chunk_rows=100, check=lambda: calls.append(1))
    assert len(calls) == 10  # once per chunk


@pytest.mark.parametrize("seed", range(3))
def test_top_k_batch_equals_brute_force_through_thresholds_and_pruning(seed):
    """Long enough scans that the running thresholds rise and candidate sets are pruned
    (more than 1,024 per query), with many exact ties (duplicated rows) at every rank."""
    rng = np.random.default_rng(200 + seed)
    rows, dim = 6000, 8
    vectors, ids = random_table(rng, rows, dim, duplicates=rows // 3)
    vectors[: rows // 10] = vectors[rows // 10 : 2 * (rows // 10)]  # a block of twins: ties galore
    vectors[2000:4000] = vectors[4000]  # 2,001 rows tied at the top for the last query
    queries = np.stack([unit(rng, dim) for _ in range(3)] + [vectors[5], vectors[4000]])
    for k in (1, 3, 50):
        batch = top_k_batch(vectors, ids, queries, k, chunk_rows=64)
        for query, got in zip(queries, batch):
            assert_same(got, reference(vectors, ids, query, k))
