"""The gateway's processes: gunicorn's arbiter preloads the app, then forks the uvicorn workers.

Why fork after import: every worker used to import FastAPI, pydantic, grpc, numpy and the proto
descriptors on its own (uvicorn spawns its workers), ~50 MiB of private memory each. Forked from
a master that already imported them and built the app (`gc.freeze()` first, so the collector
never writes to those pages), workers share them: ~16 MiB private each (bench: memory sweep).

Why it is safe with gRPC (grpc#16001): the master imports grpc but never creates a channel or a
server; each worker opens its channel in its lifespan, after the fork, in its own loop.
`load()` checks that the master is still single-threaded before any fork.

Gunicorn also brings what a supervisor of workers needs: a crashed worker is replaced, a worker
whose loop stops notifying for `worker_timeout_seconds` is killed and replaced, SIGTERM drains
gracefully (`graceful_shutdown_seconds`), SIGINT/SIGQUIT stop at once.
"""

from __future__ import annotations

import gc
import importlib
import logging
import math
import os
import threading
from typing import Any

from gunicorn.app.base import BaseApplication
from gunicorn.glogging import Logger
from uvicorn_worker import UvicornWorker

from gateway.settings import GatewaySettings

log = logging.getLogger("gateway")


class GatewayLogger(Logger):
    """Gunicorn's own lines (booting, worker exits) go through offload's logging, like ours."""

    def setup(self, cfg: Any) -> None:
        for logger in (self.error_log, self.access_log):
            logger.handlers = []
            logger.propagate = True
        self.error_log.setLevel(logging.INFO)


class GatewayWorker(UvicornWorker):
    """A uvicorn worker with the gateway's serving options (GatewayServer.uvicorn_options)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        app = kwargs.get("app", args[3] if len(args) > 3 else None)
        # Read by UvicornWorker.__init__ into its uvicorn Config.
        self.CONFIG_KWARGS = dict(app.uvicorn_options)
        super().__init__(*args, **kwargs)
        # UvicornWorker hands uvicorn's error logger to gunicorn's handlers: back to ours. (Its
        # access logger stays without handlers: uvicorn then skips access logging altogether.)
        logger = logging.getLogger("uvicorn.error")
        logger.handlers = []
        logger.propagate = True


class GatewayServer(BaseApplication):
    """`GatewayServer(settings).run()`: blocks until the arbiter stops."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.uvicorn_options = {
            "loop": "uvloop",
            "http": "httptools",
            # WebSocket streams (gateway/websocket.py): the sans-I/O websockets protocol, pinned
            # with the websockets library; its send() waits while the socket's buffer is full.
            "ws": "websockets-sansio",
            "ws_max_size": settings.max_body_bytes,
            "ws_ping_interval": settings.ws_ping_interval_seconds,
            "ws_ping_timeout": settings.ws_ping_timeout_seconds,
            "ws_per_message_deflate": settings.ws_compression,
            "access_log": False,
            "proxy_headers": False,
            "server_header": False,
            "timeout_graceful_shutdown": settings.graceful_shutdown_seconds,
            # How often a worker tells the arbiter it is alive: well within the arbiter's timeout.
            "timeout_notify": max(1.0, settings.worker_timeout_seconds / 4),
        }
        super().__init__()

    def load_config(self) -> None:
        s = self.settings
        host = f"[{s.host}]" if ":" in s.host else s.host
        options = {
            "bind": [f"{host}:{s.port}"],
            "workers": s.workers,
            "worker_class": "gateway.prefork.GatewayWorker",
            "logger_class": "gateway.prefork.GatewayLogger",
            "preload_app": True,
            # Longer than uvicorn's own graceful wait: a worker then runs its lifespan shutdown
            # (spans flushed, channel closed) before the arbiter would kill it.
            "graceful_timeout": math.ceil(s.graceful_shutdown_seconds) + 5,
            "timeout": math.ceil(s.worker_timeout_seconds),
            "keepalive": 5,
            "accesslog": None,
            "proc_name": "offload-gateway",
            "child_exit": _child_exit,
        }
        for key, value in options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        """Runs once, in the master, before any fork (preload_app)."""
        from gateway.app import create_app  # imports prometheus_client: only now that its directory is set
        from gateway.metrics import MASTER_PID_VARIABLE, worker_exited

        os.environ[MASTER_PID_VARIABLE] = str(os.getpid())

        app = create_app(self.settings)
        # What every worker imports once it serves, imported here to be shared too.
        for module in _SERVING_MODULES:
            importlib.import_module(module)
        # The master's own metric files (its gauges were made here): each worker makes its own.
        worker_exited(os.getpid())
        threads = _threads()
        if threads > 1:
            raise RuntimeError(
                f"the gateway master runs {threads} threads; it must run none besides the main one before it forks "
                "its workers (grpc#16001; OPENBLAS_NUM_THREADS=1 keeps numpy's BLAS from starting one)"
            )
        gc.collect()
        gc.freeze()  # the app's objects stay shared: the collector never touches their pages again
        return app


_SERVING_MODULES = (
    "uvloop",
    "uvicorn.protocols.http.httptools_impl",
    "uvicorn.protocols.websockets.websockets_sansio_impl",
    "uvicorn.lifespan.on",
    "grpc.aio",
    "google.rpc.status_pb2",
)


def _threads() -> int:
    """Threads of this process, native ones included (a C library's too), where /proc tells."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return threading.active_count()


def _child_exit(server: Any, worker: Any) -> None:
    """A worker is gone (stopped or crashed): drop its live gauges."""
    from gateway.metrics import worker_exited

    worker_exited(worker.pid)
