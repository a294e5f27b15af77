"""What the machine can scan: the Search limit of issue 11, and the kernel against it.

- `limit()`: a matrix product of the table against a 128-query block, one BLAS thread, one
  process per pool worker, all at once (forked: they share the table's pages), as queries/s.
  No exact search can beat it; offload's targets are fractions of it.
- `kernel_rates()`: per block size, one process: the bare matrix product and `top_k_batch`
  (what offload runs) in queries/s, so the report shows the kernel's own overhead.
- `python -m bench.kernel [rows]`: both, plus faiss-cpu's `knn` on the same arrays (no copy)
  when faiss is installed (it is not a dependency; see the issue-11 closing note).
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time

from bench.procs import BLAS_ENV

os.environ.update(BLAS_ENV)  # before numpy (when run as a script): one BLAS thread, as in the pool

import numpy as np  # noqa: E402

BLOCK = 128


def _unit_block(dim: int, n: int, seed: int) -> np.ndarray:
    queries = np.random.default_rng(seed).standard_normal((n, dim), dtype=np.float32)
    return queries / np.linalg.norm(queries, axis=1, keepdims=True)


def _scan(vectors: np.ndarray, block: np.ndarray, chunk_rows: int) -> None:
    for start in range(0, vectors.shape[0], chunk_rows):
        block @ vectors[start : start + chunk_rows].T


def limit(vectors: np.ndarray, processes: int, *, seconds: float = 2.0, chunk_rows: int = 32768) -> dict:
    """queries/s of `processes` processes each scanning with 128-query blocks, at once."""
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(processes), context.Queue()

    def child(seed: int) -> None:
        block = _unit_block(vectors.shape[1], BLOCK, seed)
        _scan(vectors[: chunk_rows * 2], block, chunk_rows)  # warm
        barrier.wait()
        started, scanned = time.perf_counter(), 0
        while True:
            _scan(vectors, block, chunk_rows)
            scanned += BLOCK
            elapsed = time.perf_counter() - started
            if elapsed >= seconds:
                results.put(scanned / elapsed)
                return

    children = [context.Process(target=child, args=(seed,)) for seed in range(processes)]
    for proc in children:
        proc.start()
    try:
        rates = [results.get(timeout=seconds * 20 + 60) for _ in children]
    finally:
        for proc in children:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
    return {"queries_per_s": float(sum(rates)), "per_process": [float(r) for r in rates], "processes": processes, "block": BLOCK}


def _best_rate(fn, queries: int, reps: int = 3) -> float:
    best = float("inf")
    for _ in range(reps):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return queries / best


def kernel_rates(vectors: np.ndarray, ids: np.ndarray, blocks=(1, 8, 16, 32, BLOCK), k: int = 10) -> dict:
    """Per block size (one process): matrix product alone vs top_k_batch, queries/s."""
    from compute.search import top_k_batch

    out = {}
    for n in blocks:
        block = _unit_block(vectors.shape[1], n, 100 + n)
        product = _best_rate(lambda: _scan(vectors, block, 32768), n)
        kernel = _best_rate(lambda: top_k_batch(vectors, ids, block, k), n)
        out[str(n)] = {"matmul_qps": product, "top_k_batch_qps": kernel, "fraction": kernel / product}
    return out


def faiss_rates(vectors: np.ndarray, blocks=(1, 8, 16, 32, BLOCK), k: int = 10) -> dict | None:
    try:
        import faiss
    except ImportError:
        return None
    faiss.omp_set_num_threads(1)
    out = {}
    for n in blocks:
        block = _unit_block(vectors.shape[1], n, 100 + n)
        out[str(n)] = _best_rate(lambda: faiss.knn(block, vectors, k, metric=faiss.METRIC_INNER_PRODUCT), n)
    return out


def main() -> None:
    from compute.table import synthetic_arrays

    rows = int(sys.argv[1]) if len(sys.argv) > 1 else 1 << 20
    vectors, ids = synthetic_arrays(rows, 128, 42)
    print(f"table {rows} x 128; limit (2 processes): {limit(vectors, 2)['queries_per_s']:.0f} queries/s")
    faiss = faiss_rates(vectors)
    for n, rates in kernel_rates(vectors, ids).items():
        extra = f", faiss.knn {faiss[n]:.0f}" if faiss else ""
        print(f"block {n:>3}: matmul {rates['matmul_qps']:.0f}, top_k_batch {rates['top_k_batch_qps']:.0f} queries/s{extra}")


if __name__ == "__main__":
    main()
