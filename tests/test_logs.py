"""Log lines for machines (JSON, never ANSI codes) and for people (key=value, coloured only when asked)."""

from __future__ import annotations

import io
import json
import logging

import pytest

from offload import context, logs

ESC = "\x1b"
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def uvicorn_like_record() -> logging.LogRecord:
    """What uvicorn logs at start-up: a plain message plus `color_message`, the same with ANSI codes."""
    return logging.getLogger("uvicorn.error").makeRecord(
        "uvicorn.error", logging.INFO, __file__, 1, "Uvicorn running on %s (Press CTRL+C to quit)",
        ("http://127.0.0.1:8000",), None,
        extra={"color_message": "Uvicorn running on \x1b[1m%s\x1b[0m (Press CTRL+C to quit)", "workers": 2},
    )


def record(msg: str, **extra) -> logging.LogRecord:
    return logging.getLogger("compute.pool").makeRecord("compute.pool", logging.WARNING, __file__, 1, msg, (), None, extra=extra)


@pytest.fixture
def request_context():
    token = context.bind(context.from_headers("req-42", TRACEPARENT))
    yield
    context.unbind(token)


def test_json_drops_color_message_and_never_carries_ansi_codes(request_context):
    line = logs.JsonFormatter("gateway").format(uvicorn_like_record())
    entry = json.loads(line)
    assert "color_message" not in entry
    assert entry["msg"] == "Uvicorn running on http://127.0.0.1:8000 (Press CTRL+C to quit)"
    assert entry["workers"] == 2 and entry["request_id"] == "req-42" and entry["process"] == "gateway"

    coloured = logs.JsonFormatter("gateway").format(record("\x1b[31mred\x1b[0m text", note="\x1b[1mbold\x1b[0m"))
    assert ESC not in coloured and "\\u001b" not in coloured
    assert json.loads(coloured)["msg"] == "red text" and json.loads(coloured)["note"] == "bold"


def test_console_is_aligned_key_value_pairs(request_context):
    formatter = logs.ConsoleFormatter("compute", colors=False)
    line = formatter.format(record("pool worker died", delay_seconds=0.0, crash_streak=1, where="a b", ids=["x", "y"]))
    assert ESC not in line
    head, _, pairs = line.partition("pool worker died")
    assert " warning " in head and "compute[" in head and "compute.pool" in head
    assert pairs.split() == ["request_id=req-42", f"traceparent={TRACEPARENT}", "delay_seconds=0.0", "crash_streak=1", 'where="a', 'b"', 'ids=["x","y"]']
    # Columns line up whatever the level and the logger.
    other = formatter.format(logging.getLogger("gateway").makeRecord("gateway", logging.INFO, __file__, 1, "ready", (), None))
    assert other.index("ready") == line.index("pool worker died")
    assert "color_message" not in formatter.format(uvicorn_like_record())


def test_console_puts_multi_line_values_below_the_line():
    line = logs.ConsoleFormatter("compute", colors=False).format(record("event loop stalled", stack="frame 1\nframe 2\n", stall_seconds=0.6))
    first, *rest = line.splitlines()
    assert first.rstrip().endswith("stall_seconds=0.6") and "frame" not in first
    assert rest == ["  stack:", "    frame 1", "    frame 2"]


def test_console_colours_only_when_asked():
    assert ESC in logs.ConsoleFormatter("compute", colors=True).format(record("x", k="v"))
    assert ESC not in logs.ConsoleFormatter("compute", colors=False).format(record("x", k="v"))


@pytest.mark.parametrize(
    "fmt, stream, env, expected, colours",
    [
        ("auto", io.StringIO(), {}, logs.JsonFormatter, False),  # a pipe or a file: for machines
        ("auto", Terminal(), {}, logs.ConsoleFormatter, True),  # a person at a terminal
        ("console", io.StringIO(), {}, logs.ConsoleFormatter, False),  # asked for, but not a terminal
        ("console", io.StringIO(), {"FORCE_COLOR": "1"}, logs.ConsoleFormatter, True),  # make dev in a terminal
        ("console", Terminal(), {"NO_COLOR": "1", "FORCE_COLOR": "1"}, logs.ConsoleFormatter, False),
        ("json", Terminal(), {"FORCE_COLOR": "1"}, logs.JsonFormatter, False),  # JSON: never colours
    ],
)
def test_the_format_follows_the_setting_and_the_stream(monkeypatch, fmt, stream, env, expected, colours):
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    monkeypatch.delenv("NO_COLOR", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    formatter = logs.formatter("compute", fmt, stream)
    assert type(formatter) is expected
    assert (ESC in formatter.format(record("x", k="v"))) is colours


def test_an_unknown_format_is_refused():
    with pytest.raises(ValueError, match="expected one of auto, console, json"):
        logs.formatter("compute", "pretty")
