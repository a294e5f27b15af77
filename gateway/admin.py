"""The FastAPI side of the gateway: /healthz, /readyz, /metrics, /docs, /openapi.json.

These routes are few and cold, so they stay idiomatic FastAPI; the generated REST routes are
served by the RestFrontend in front (frontend.py) but documented here, in one OpenAPI.
"""

from __future__ import annotations

from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway.errors import ApiError
from gateway.frontend import COMPUTE_STATE_KEY, HEARTBEAT_STATE_KEY
from gateway.metrics import GatewayMetrics


def build_admin(
    lifespan: Callable[[FastAPI], Any],
    metrics: GatewayMetrics,
    generated_openapi: dict[str, Any],
) -> FastAPI:
    """The FastAPI app; the compute client and heartbeat come from the lifespan state."""
    app = FastAPI(
        title=generated_openapi["info"]["title"],
        version=generated_openapi["info"]["version"],
        lifespan=lifespan,
        default_response_class=JSONResponse,
    )

    @app.get("/healthz", tags=["admin"], summary="The process is alive")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/readyz",
        tags=["admin"],
        summary="Compute serves every routed service and this worker's event loop is healthy",
        responses={503: {"description": "Not ready"}},
    )
    async def readyz(request: Request) -> Response:
        heartbeat = getattr(request.state, HEARTBEAT_STATE_KEY, None)
        client = getattr(request.state, COMPUTE_STATE_KEY, None)
        heartbeat_ok = heartbeat is not None and heartbeat.healthy
        readiness = await client.readiness() if client is not None else None
        compute_ok = readiness is not None and readiness.serving
        metrics.ready.set(1 if compute_ok else 0)
        ready = heartbeat_ok and compute_ok
        body: dict[str, Any] = {"status": "ready" if ready else "not ready", "compute": compute_ok, "event_loop": heartbeat_ok}
        if readiness is not None and readiness.unserved:
            body["unserved_services"] = readiness.unserved  # routed here, but compute has no such service
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get(
        "/metrics",
        tags=["admin"],
        summary="Prometheus metrics of every gateway worker",
        response_class=PlainTextResponse,
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus text format"}},
    )
    async def prometheus() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        error = ApiError.http(exc.status_code, str(exc.detail) if exc.status_code < 500 else "internal error")
        request_id = request.scope.get("state", {}).get("request_id", "")
        # Starlette's own headers (Allow on a 405) are kept.
        return Response(
            error.body(request_id), status_code=exc.status_code, media_type="application/json", headers=exc.headers
        )

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            own = get_openapi(title=app.title, version=app.version, routes=app.routes)
            merged = dict(generated_openapi)
            merged["paths"] = {**generated_openapi["paths"], **own.get("paths", {})}
            schemas = {**generated_openapi["components"]["schemas"], **own.get("components", {}).get("schemas", {})}
            merged["components"] = {**generated_openapi["components"], "schemas": schemas}
            app.openapi_schema = merged
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
