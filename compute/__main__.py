"""`python -m compute`: run the compute process until SIGTERM/SIGINT.

A configuration mistake (a setting, a module, an RPC without an operation) is printed as one
line per problem, prefixed `compute:`, and the exit code is 2: no traceback.
"""

from __future__ import annotations

import sys

import uvloop

from compute.server import ComputeServer
from compute.settings import ComputeSettings
from offload import config, logs


def main() -> int:
    try:
        settings = config.load(ComputeSettings, warn=lambda line: print(f"compute: warning: {line}", file=sys.stderr))
        server = ComputeServer(settings)
    except config.ConfigError as exc:
        for line in exc.lines:
            print(f"compute: {line}", file=sys.stderr)
        return 2
    logs.configure("compute", settings.log_level, settings.log_format)
    uvloop.run(server.serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
