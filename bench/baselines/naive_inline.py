"""naive-inline: each uvicorn worker loads the table; Search runs inline in `async def`.

Run: `uvicorn bench.baselines.naive_inline:create_app --factory --workers N --loop uvloop
--http httptools --no-access-log` with BENCH_ROWS/BENCH_DIM/BENCH_SEED in the environment.
"""

from fastapi import FastAPI

from bench.baselines.app import build_app


def create_app() -> FastAPI:
    return build_app("inline")
