"""`python -m gateway`: N stateless uvicorn workers forked from one master that loaded the app
(gateway/prefork.py).

Before any worker starts, the launcher
- checks the settings, the proto modules and their routes once: a mistake is printed as one
  line per problem, prefixed `gateway:`, and the exit code is 2;
- creates a fresh PROMETHEUS_MULTIPROC_DIR, removed at exit. prometheus_client picks its
  storage when first imported, so nothing this module imports may import it: the master loads
  the app (and prometheus_client) only after this.

Body size is enforced by the app while reading (413 for chunked bodies too), so no proxy is
needed for that.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

# Before numpy is imported: the gateway does no BLAS work (numpy only formats float32 values),
# and one BLAS thread means none besides the main one, so the master that forks the workers runs
# no thread at all (gateway/prefork.py checks it).
for _variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

from gateway.auth import build_authenticator  # noqa: E402
from gateway.json_codec import Codec  # noqa: E402
from gateway.prefork import GatewayServer  # noqa: E402
from gateway.settings import GatewaySettings  # noqa: E402
from gateway.transcoding import routes_from_settings  # noqa: E402
from offload import config, logs, tracing  # noqa: E402


def main() -> int:
    try:
        settings = config.load(GatewaySettings, warn=lambda line: print(f"gateway: warning: {line}", file=sys.stderr))
        routes_from_settings(settings, Codec())  # checked once, before any worker starts
        if settings.auth_enabled:
            try:
                build_authenticator(settings)
            except (ValueError, OSError) as exc:
                raise config.ConfigError([f"authentication: {exc}"]) from None
        try:
            tracing.check_env()  # each worker builds its own exporter: check the variables once, here
        except ValueError as exc:
            raise config.ConfigError([str(exc)]) from None
    except config.ConfigError as exc:
        for line in exc.lines:
            print(f"gateway: {line}", file=sys.stderr)
        return 2
    logs.configure("gateway", settings.log_level, settings.log_format)
    owned_dir = None
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        owned_dir = tempfile.mkdtemp(prefix="offload-gateway-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = owned_dir
    try:
        GatewayServer(settings).run()  # gunicorn's arbiter: preloads the app, forks the workers
    finally:
        if owned_dir is not None:
            shutil.rmtree(owned_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
