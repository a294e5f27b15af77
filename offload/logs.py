"""Logging for machines (JSON lines) and for people (aligned key=value), with the request context
on every line.

Call `configure(process=..., level=..., fmt=...)` once per process (entry points, pool worker
initializer). `fmt`: "json" (one object per line, for log shippers), "console" (for a person at
a terminal), or "auto": console when stderr is a terminal, else JSON. Colours only in console
form, and only when stderr is a terminal or FORCE_COLOR is set (NO_COLOR wins). honcho pipes
our output, so `make dev` asks for the console form and sets FORCE_COLOR when its own output is
a terminal. JSON lines never carry ANSI codes, nor uvicorn's `color_message` (a copy of its
message with ANSI codes).

Why not structlog (structlog 26.1, measured on this 2-CPU VM under load, three runs, best of
5 x 20,000 lines each, one INFO record with three extras and a request context): through stdlib
logging to /dev/null, our JsonFormatter costs 24-28 us per line against 30-44 us for structlog's
ProcessorFormatter + orjson JSONRenderer, our console form 21-40 us against 64-90 us for its
ConsoleRenderer (format() alone: 6-13 against 14-20 us, and 14-22 against 41-67 us). Its native
BoundLogger is faster (11-15 us) only for our own call sites, and only by bypassing stdlib
logging, but grpc, uvicorn and asyncio log through stdlib, so we would keep both paths and
rewrite every call site. Importing it (without rich, as in a production install) adds 0.1-0.27 s
and ~1.2 MiB of Python allocations (tracemalloc) to each process: every gateway worker, compute,
every pool worker. With rich present (a test dependency) structlog.dev pulls it in: 0.4-0.75 s.
One stdlib path for every record, no new dependency: we keep this module.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from typing import Any, Iterator, TextIO

import orjson

from offload import context

FORMATS = ("auto", "console", "json")

# Attributes every LogRecord has; anything else passed via `extra=` is emitted as a field.
_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}
# Extras never emitted: uvicorn's copy of its message with ANSI colour codes.
_DROPPED_ATTRS = frozenset({"color_message"})
# An ANSI escape sequence as it reads inside JSON text (orjson writes ESC as \u001b).
_JSON_ANSI_RE = re.compile(r"\\u001b\[[0-9;?]*[ -/]*[@-~]")


def fields(record: logging.LogRecord) -> Iterator[tuple[str, Any]]:
    """The request context, then the record's own `extra=` fields: what both forms show."""
    ctx = context.current()
    if ctx is not None:
        yield "request_id", ctx.request_id
        if ctx.traceparent:
            yield "traceparent", ctx.traceparent
        if ctx.principal:
            yield "principal", ctx.principal
    for key, value in vars(record).items():
        if key not in _STANDARD_ATTRS and key not in _DROPPED_ATTRS and not key.startswith("_"):
            yield key, value


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
        entry.update(fields(record))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        line = orjson.dumps(entry, default=str).decode()
        # A library may log text with colour codes: keep the text, drop the codes (otherwise
        # one substring test per line).
        return _JSON_ANSI_RE.sub("", line) if "\\u001b" in line else line


class ConsoleFormatter(logging.Formatter):
    """`12:00:01.234 warning compute[4242]  compute.pool  pool worker died  delay_seconds=0.0 crash_streak=1`.

    Columns are aligned (level, logger, message padded), then key=value pairs; values with
    spaces, quotes or `=` are quoted. Multi-line values (a stack, a traceback) follow, indented.
    """

    _LEVEL_COLORS = {"debug": "\x1b[2m", "info": "\x1b[32m", "warning": "\x1b[33m", "error": "\x1b[31m", "critical": "\x1b[1;31m"}
    _DIM, _KEY, _BOLD, _RESET = "\x1b[2m", "\x1b[36m", "\x1b[1m", "\x1b[0m"

    def __init__(self, process_name: str, colors: bool) -> None:
        super().__init__()
        self._process_name = process_name
        self._colors = colors

    def format(self, record: logging.LogRecord) -> str:
        paint = self._paint
        level = record.levelname.lower()
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created)) + f".{int(record.msecs):03d}"
        who = f"{self._process_name}[{record.process}]"
        head = (
            f"{paint(stamp, self._DIM)} {paint(f'{level:<8}', self._LEVEL_COLORS.get(level, ''))}"
            f"{paint(f'{who:<22}', self._DIM)} {paint(f'{record.name:<18}', self._DIM)} "
            f"{paint(f'{record.getMessage():<32}', self._BOLD)}"
        )
        pairs, blocks = [], []
        for key, value in fields(record):
            if isinstance(value, str) and "\n" in value:
                blocks.append((key, value))
            else:  # a string, quoted when it must be; anything else as JSON (unambiguous as it is)
                text = _quoted(value) if isinstance(value, str) else orjson.dumps(value, default=str).decode()
                pairs.append(f"{paint(key, self._KEY)}={text}")
        if record.exc_info:
            blocks.append(("exc", self.formatException(record.exc_info)))
        line = f"{head} {' '.join(pairs)}".rstrip()
        for key, text in blocks:
            indented = "\n".join(f"    {part}" for part in text.rstrip("\n").splitlines())
            line += f"\n  {paint(key, self._KEY)}:\n{indented}"
        return line

    def _paint(self, text: str, code: str) -> str:
        return f"{code}{text}{self._RESET}" if self._colors and code else text


def _quoted(text: str) -> str:
    if text and not any(c in text for c in ' "=\t'):
        return text
    return orjson.dumps(text).decode()


def colors_wanted(stream: TextIO) -> bool:
    """Colours on a terminal, or when FORCE_COLOR is set; never with NO_COLOR (no-color.org)."""
    if os.environ.get("NO_COLOR"):
        return False
    return bool(os.environ.get("FORCE_COLOR")) or _isatty(stream)


def formatter(process: str, fmt: str = "auto", stream: TextIO | None = None) -> logging.Formatter:
    """The formatter `fmt` names ("auto": console on a terminal, else JSON) for `stream`."""
    stream = stream or sys.stderr
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if fmt == "console" or (fmt == "auto" and _isatty(stream)):
        return ConsoleFormatter(process, colors=colors_wanted(stream))
    return JsonFormatter(process)


def configure(process: str, level: str | None = None, fmt: str = "auto") -> None:
    """Send log lines to stderr. Idempotent: replaces the root handlers."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(process, fmt, sys.stderr))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel((level or os.environ.get("OFFLOAD_LOG_LEVEL", "INFO")).upper())


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no such method, or closed
        return False
