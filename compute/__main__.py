"""`python -m compute`: run the compute process until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import sys

import uvloop
from pydantic import ValidationError

from compute.server import ComputeServer
from compute.settings import ComputeSettings
from offload import logs


def main() -> int:
    try:
        settings = ComputeSettings()
    except ValidationError as exc:
        print(f"compute: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    logs.configure("compute", settings.log_level)
    uvloop.run(ComputeServer(settings).serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
