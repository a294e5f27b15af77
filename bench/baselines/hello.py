"""A FastAPI hello-world: the floor of one HTTP request through uvicorn + FastAPI (hop cost)."""

from contextlib import asynccontextmanager

import orjson
from fastapi import FastAPI
from fastapi.responses import Response

_BODY = orjson.dumps({"hello": "world"})


def create_app() -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI):
        import os
        import sys

        print(f"bench worker ready: hello pid={os.getpid()}", file=sys.stderr, flush=True)
        yield

    app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/readyz")
    async def readyz() -> Response:
        return Response(_BODY, media_type="application/json")

    @app.get("/hello")
    async def hello() -> Response:
        return Response(_BODY, media_type="application/json")

    return app
