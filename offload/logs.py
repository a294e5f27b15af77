"""Structured (JSON lines) logging with the request context on every line.

Call `configure(process=...)` once per process (entry points, pool worker initializer).
"""

from __future__ import annotations

import logging
import os
import sys
import time

import orjson

from offload import context

# Attributes every LogRecord has; anything else passed via `extra=` is emitted as a field.
_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def __init__(self, process_name: str) -> None:
        super().__init__()
        self._process_name = process_name

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "process": self._process_name,
            "pid": record.process,
            "msg": record.getMessage(),
        }
        ctx = context.current()
        if ctx is not None:
            entry["request_id"] = ctx.request_id
            if ctx.traceparent:
                entry["traceparent"] = ctx.traceparent
            if ctx.principal:
                entry["principal"] = ctx.principal
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def configure(process: str, level: str | None = None) -> None:
    """Send JSON log lines to stderr. Idempotent: replaces the root handlers."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(process))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel((level or os.environ.get("OFFLOAD_LOG_LEVEL", "INFO")).upper())
