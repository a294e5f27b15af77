"""Exact top-k cosine similarity over the table, scanned in chunks.

Vectors are unit-length, so cosine similarity is a dot product. Each chunk keeps only the
candidates that can still be in the top k (ties included), so memory stays O(k) and the
scan can stop between chunks when the call is cancelled. Order: score descending, then id
ascending, identical to a full numpy sort of the scores `exact_scores` defines.

Why two scores: BLAS computes a row's float32 dot product differently depending on where
the row sits in the matrix (kernel blocks, remainders), so two identical vectors can score
1 ulp apart and a tie would be broken by position instead of by id. The fast float32 scan
only selects candidates, with a slack covering that rounding error; the candidates are then
ranked by a score that depends on the row's values alone.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np


def _slack(dim: int) -> float:
    """Twice the worst float32 rounding error of a dot product of two unit vectors (with margin)."""
    return dim * 2.0**-22


def _keep_best(scores: np.ndarray, rows: np.ndarray, k: int, slack: float) -> tuple[np.ndarray, np.ndarray]:
    """Candidates whose score is within `slack` of the k-th best (ties and near-ties kept)."""
    if scores.shape[0] <= k:
        return scores, rows
    threshold = np.partition(scores, scores.shape[0] - k)[scores.shape[0] - k]
    keep = scores >= threshold - slack
    return scores[keep], rows[keep]


def exact_scores(candidates: np.ndarray, query: np.ndarray) -> np.ndarray:
    """float32 scores that depend only on each row's values: float64 products (exact for
    float32 inputs), summed row by row the same way, rounded once."""
    return (candidates.astype(np.float64) * query.astype(np.float64)).sum(axis=1).astype(np.float32)


def _ranked(vectors, ids, query, rows: np.ndarray, k: int) -> list[tuple[int, float]]:
    scores = exact_scores(vectors[rows], query)
    order = np.lexsort((ids[rows], -scores))[:k]
    return [(int(rows[i]), float(scores[i])) for i in order]


def top_k(
    vectors: np.ndarray,
    ids: np.ndarray,
    query: np.ndarray,
    k: int,
    *,
    chunk_rows: int = 32768,
    check: Callable[[], None] = lambda: None,
) -> list[tuple[int, float]]:
    """Rows and scores of the k best matches of a unit `query` (the batch kernel, for one).

    `check` is called between chunks; it raises to stop the scan (cancel, deadline).
    """
    [hits] = top_k_batch(vectors, ids, query[None, :], k, chunk_rows=chunk_rows, check=check)
    assert hits is not None
    return hits


def top_k_batch(
    vectors: np.ndarray,
    ids: np.ndarray,
    queries: np.ndarray,
    k: int | Sequence[int],
    *,
    chunk_rows: int = 32768,
    check: Callable[[], np.ndarray | None] = lambda: None,
) -> list[list[tuple[int, float]] | None]:
    """top_k for several unit queries at once: one matrix product per chunk, the same results.

    `k` is one k for every query, or one per query. `check` is called between chunks: it
    raises to stop the scan, or returns a boolean mask over the queries of those still
    wanted (None: all). A query that is no longer wanted leaves the block for good (no
    more CPU is spent on it) and its result is None.

    Per query, a running threshold (its k-th best score so far, minus the rounding slack)
    rises as the scan goes; a chunk contributes only the scores above it, selected for all
    queries at once (one comparison over the chunk's score matrix), so the work per chunk is
    the matrix product plus a few candidates per query, not two partitions per query.
    """
    n = queries.shape[0]
    slack = _slack(vectors.shape[1])
    ks = np.broadcast_to(np.asarray(k, dtype=np.int64), (n,))
    keeps = np.clip(ks, 1, max(1, vectors.shape[0]))
    alive = np.arange(n)  # the queries still in the block, by their index in `queries`
    block = np.ascontiguousarray(queries, dtype=np.float32)
    thresholds = np.full(n, -np.inf, dtype=np.float32)
    pending_scores: list[list[np.ndarray]] = [[] for _ in range(n)]
    pending_rows: list[list[np.ndarray]] = [[] for _ in range(n)]
    pending = np.zeros(n, dtype=np.int64)  # candidates held per query
    prune_above = np.maximum(4 * keeps, keeps + 1024)
    for start in range(0, vectors.shape[0], chunk_rows):
        wanted = check()
        if wanted is not None and not wanted[alive].all():
            alive = alive[wanted[alive]]
            if alive.size == 0:
                break
            block = np.ascontiguousarray(queries[alive], dtype=np.float32)
        scores = block @ vectors[start : start + chunk_rows].T  # (alive, chunk): row i is query alive[i]
        width = scores.shape[1]
        unsettled = pending[alive] < keeps[alive]
        if unsettled.any():
            # No threshold yet (first chunk): this chunk's own kk-th best, for those queries at
            # once. kk, the largest of their k, gives a threshold low enough for each of them.
            kk = int(keeps[alive][unsettled].max())
            if width > kk:
                kth = np.partition(scores[unsettled], width - kk, axis=1)[:, width - kk]
                settling = alive[unsettled]
                thresholds[settling] = np.maximum(thresholds[settling], kth - slack)
        # flatnonzero + divmod: ~30x faster than a 2-D np.nonzero here; indices come out in
        # row-major order, so picked_i is ascending.
        flat = np.flatnonzero(scores >= thresholds[alive][:, None])
        picked_i, picked_col = np.divmod(flat, width)
        picked_scores = scores.ravel()[flat]
        bounds = np.searchsorted(picked_i, np.arange(alive.size + 1))
        for i in np.flatnonzero(bounds[1:] > bounds[:-1]):
            q, lo, hi = alive[i], bounds[i], bounds[i + 1]
            pending_scores[q].append(picked_scores[lo:hi])
            pending_rows[q].append(picked_col[lo:hi] + start)
            pending[q] += hi - lo
            if pending[q] > prune_above[q]:
                keep = keeps[q]
                best_scores, best_rows = _keep_best(
                    np.concatenate(pending_scores[q]), np.concatenate(pending_rows[q]), keep, slack
                )
                pending_scores[q], pending_rows[q], pending[q] = [best_scores], [best_rows], best_scores.shape[0]
                if best_scores.shape[0] >= keep:
                    kth_best = np.partition(best_scores, best_scores.shape[0] - keep)[best_scores.shape[0] - keep]
                    thresholds[q] = max(thresholds[q], kth_best - slack)
    results: list[list[tuple[int, float]] | None] = [None] * n
    for q in alive:
        if pending_scores[q]:
            _, rows = _keep_best(np.concatenate(pending_scores[q]), np.concatenate(pending_rows[q]), int(keeps[q]), slack)
        else:
            rows = np.empty(0, dtype=np.int64)
        results[q] = _ranked(vectors, ids, queries[q], rows, int(ks[q]))
    return results
