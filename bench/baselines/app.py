"""The naive FastAPI app: every uvicorn worker holds its own table; Search inline or in an executor.

Same routes and JSON shapes as the offload gateway, so the same load hits every design:
`GET /v1/items/{id}`, `POST /v1/search` `{"vector": [...], "k": 10}`, `GET /v1/stats`,
`GET /readyz`. Responses are serialised with orjson (a fair, fast FastAPI, not a straw man).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from contextlib import asynccontextmanager

import orjson
from fastapi import FastAPI, HTTPException
from fastapi.responses import Response
from pydantic import BaseModel

from bench.baselines.common import (
    BaselineSettings,
    PrivateTable,
    announce_ready,
    worker_init,
    worker_ready,
    worker_search,
)
from compute.errors import InvalidArgument


class SearchBody(BaseModel):
    vector: list[float]
    k: int = 10


def _json(payload: object, status: int = 200) -> Response:
    return Response(orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY), status_code=status, media_type="application/json")


def build_app(mode: str) -> FastAPI:
    """mode: 'inline' (Search blocks the loop) or 'executor' (per-worker ProcessPoolExecutor)."""
    settings = BaselineSettings.from_env()
    state: dict = {}

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        table = await asyncio.to_thread(PrivateTable, settings)
        state["table"] = table
        pool = None
        if mode == "executor":
            # spawn: each pool process builds its own table in the initializer, like the articles do.
            pool = ProcessPoolExecutor(
                settings.pool_size, mp_context=multiprocessing.get_context("spawn"), initializer=worker_init, initargs=(settings,)
            )
            # Workers are spawned on demand: submit one task per worker at once so all exist
            # (and hold their copy) before this worker reports ready.
            loop = asyncio.get_running_loop()
            await asyncio.gather(*(loop.run_in_executor(pool, worker_ready) for _ in range(settings.pool_size)))
            state["pool"] = pool
        announce_ready(f"naive-{mode}", table)
        try:
            yield
        finally:
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/readyz")
    async def readyz() -> Response:
        return _json({"status": "ready"})

    @app.get("/v1/items/{item_id}")
    async def get_item(item_id: str) -> Response:
        table: PrivateTable = state["table"]
        row = table.row_of(item_id)
        if row is None:
            raise HTTPException(404, "no item with this id")
        return _json({"id": item_id, "vector": table.vectors[row]})

    @app.get("/v1/stats")
    async def stats() -> Response:
        table: PrivateTable = state["table"]
        return _json({"cache": {"rows": table.vectors.shape[0], "dim": table.dim, "bytes": table.nbytes}, "pid": os.getpid()})

    @app.post("/v1/search")
    async def search(body: SearchBody) -> Response:
        if not 1 <= body.k <= settings.max_k:
            raise HTTPException(400, f"k must be between 1 and {settings.max_k}")
        try:
            if mode == "inline":
                result = state["table"].search(body.vector, body.k)  # blocks the event loop
            else:
                loop = asyncio.get_running_loop()
                result = await loop.run_in_executor(state["pool"], worker_search, body.vector, body.k)
        except InvalidArgument as exc:
            raise HTTPException(400, str(exc)) from exc
        return _json(result)

    return app
