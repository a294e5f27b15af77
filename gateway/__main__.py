"""`python -m gateway`: N stateless uvicorn workers, each running `create_app()`.

The launcher prepares what must exist before any worker starts: a fresh
PROMETHEUS_MULTIPROC_DIR (prometheus_client picks its storage when first imported, so the
variable is set before uvicorn spawns workers; removed at exit). Body size is enforced by the
app while reading (413 for chunked bodies too), so no proxy is needed for that.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import uvicorn

from gateway.settings import GatewaySettings
from offload import logs


def main() -> None:
    settings = GatewaySettings()
    logs.configure("gateway", settings.log_level)
    owned_dir = None
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        owned_dir = tempfile.mkdtemp(prefix="offload-gateway-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = owned_dir
    try:
        uvicorn.run(
            "gateway.app:create_app",
            factory=True,
            host=settings.host,
            port=settings.port,
            workers=settings.workers,
            loop="uvloop",
            http="httptools",
            access_log=False,
            log_config=None,  # our JSON logging (configured in each worker by create_app)
            proxy_headers=False,
            server_header=False,
            timeout_graceful_shutdown=settings.graceful_shutdown_seconds,
        )
    finally:
        if owned_dir is not None:
            shutil.rmtree(owned_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
