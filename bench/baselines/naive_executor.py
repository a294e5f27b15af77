"""naive-executor: like naive-inline, but Search goes to a per-worker ProcessPoolExecutor
(`run_in_executor`) whose BENCH_POOL_SIZE processes each build their own copy of the table.
"""

from fastapi import FastAPI

from bench.baselines.app import build_app


def create_app() -> FastAPI:
    return build_app("executor")
