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

from typing import Callable

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
    """Rows and scores of the k best matches of a unit `query`.

    `check` is called between chunks; it raises to stop the scan (cancel, deadline).
    """
    slack = _slack(vectors.shape[1])
    best_scores = np.empty(0, dtype=np.float32)
    best_rows = np.empty(0, dtype=np.int64)
    for start in range(0, vectors.shape[0], chunk_rows):
        check()
        scores = vectors[start : start + chunk_rows] @ query
        chunk_scores, chunk_rows_idx = _keep_best(scores, np.arange(start, start + scores.shape[0]), k, slack)
        best_scores, best_rows = _keep_best(
            np.concatenate((best_scores, chunk_scores)), np.concatenate((best_rows, chunk_rows_idx)), k, slack
        )
    return _ranked(vectors, ids, query, best_rows, k)


def top_k_batch(
    vectors: np.ndarray,
    ids: np.ndarray,
    queries: np.ndarray,
    k: int,
    *,
    chunk_rows: int = 32768,
    check: Callable[[], None] = lambda: None,
) -> list[list[tuple[int, float]]]:
    """top_k for several unit queries at once (one matrix product per chunk)."""
    n = queries.shape[0]
    slack = _slack(vectors.shape[1])
    best_scores = [np.empty(0, dtype=np.float32) for _ in range(n)]
    best_rows = [np.empty(0, dtype=np.int64) for _ in range(n)]
    for start in range(0, vectors.shape[0], chunk_rows):
        check()
        scores = vectors[start : start + chunk_rows] @ queries.T  # (chunk, n)
        rows = np.arange(start, start + scores.shape[0])
        for q in range(n):
            chunk_scores, chunk_rows_idx = _keep_best(scores[:, q], rows, k, slack)
            best_scores[q], best_rows[q] = _keep_best(
                np.concatenate((best_scores[q], chunk_scores)), np.concatenate((best_rows[q], chunk_rows_idx)), k, slack
            )
    return [_ranked(vectors, ids, queries[q], best_rows[q], k) for q in range(n)]
