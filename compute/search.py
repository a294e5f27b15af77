"""Exact top-k cosine similarity over the table, scanned in chunks.

Vectors are unit-length, so cosine similarity is a dot product. Each chunk keeps only the
candidates that can still be in the top k (ties included), so memory stays O(k) and the
scan can stop between chunks when the call is cancelled. Order: score descending, then id
ascending, identical to a full numpy sort.
"""

from __future__ import annotations

from typing import Callable

import numpy as np


def _keep_best(scores: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Candidates whose score is >= the k-th best (keeps ties at the boundary)."""
    if scores.shape[0] <= k:
        return scores, rows
    threshold = np.partition(scores, scores.shape[0] - k)[scores.shape[0] - k]
    keep = scores >= threshold
    return scores[keep], rows[keep]


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
    best_scores = np.empty(0, dtype=np.float32)
    best_rows = np.empty(0, dtype=np.int64)
    for start in range(0, vectors.shape[0], chunk_rows):
        check()
        scores = vectors[start : start + chunk_rows] @ query
        chunk_scores, chunk_rows_idx = _keep_best(scores, np.arange(start, start + scores.shape[0]), k)
        best_scores, best_rows = _keep_best(
            np.concatenate((best_scores, chunk_scores)), np.concatenate((best_rows, chunk_rows_idx)), k
        )
    order = np.lexsort((ids[best_rows], -best_scores))[:k]
    return [(int(best_rows[i]), float(best_scores[i])) for i in order]


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
    best_scores = [np.empty(0, dtype=np.float32) for _ in range(n)]
    best_rows = [np.empty(0, dtype=np.int64) for _ in range(n)]
    for start in range(0, vectors.shape[0], chunk_rows):
        check()
        scores = vectors[start : start + chunk_rows] @ queries.T  # (chunk, n)
        rows = np.arange(start, start + scores.shape[0])
        for q in range(n):
            chunk_scores, chunk_rows_idx = _keep_best(scores[:, q], rows, k)
            best_scores[q], best_rows[q] = _keep_best(
                np.concatenate((best_scores[q], chunk_scores)), np.concatenate((best_rows[q], chunk_rows_idx)), k
            )
    results = []
    for q in range(n):
        order = np.lexsort((ids[best_rows[q]], -best_scores[q]))[:k]
        results.append([(int(best_rows[q][i]), float(best_scores[q][i])) for i in order])
    return results
