"""Loading a process's settings, and saying in one line what is wrong with them.

Both processes read `OFFLOAD_<PROCESS>_*` from the environment and from `.env` (pydantic-settings;
the environment wins). `OFFLOAD_ENV_FILE` names another file, or none when empty (the tests
use that, so a developer's own `.env` never leaks into them).

A mistake is reported as the variable's name, the value received, where it came from, and what
was expected, one line each, never a traceback: `ConfigError.lines`. The entry points print them
and exit 2. A name under the process's prefix that is not a setting (a typo) is a mistake when it
comes from the env file, and a warning when only the environment has it: orchestrators inject
such names themselves (Kubernetes' service links: a Service `offload-compute` gives every pod
OFFLOAD_COMPUTE_PORT=tcp://...).

List settings take JSON (`["a", "b"]`) or plain comma-separated names (`a,b`), and dict
settings JSON or `name=value` pairs: both survive shells and dotenv files unchanged.
"""

from __future__ import annotations

import difflib
import importlib
import json
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, TypeVar

from dotenv import dotenv_values
from pydantic import ValidationError
from pydantic_settings import BaseSettings, SettingsError

ENV_FILE_VARIABLE = "OFFLOAD_ENV_FILE"

SettingsT = TypeVar("SettingsT", bound=BaseSettings)


class ConfigError(Exception):
    """A configuration mistake: `lines` says what, one problem per line."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("\n".join(lines))
        self.lines = lines


def env_file() -> Path | None:
    """The dotenv file both processes read: `.env`, or `OFFLOAD_ENV_FILE` ("" = none)."""
    name = os.environ.get(ENV_FILE_VARIABLE, ".env")
    return Path(name) if name else None


def load(
    cls: type[SettingsT], warn: Callable[[str], None] = lambda line: print(line, file=sys.stderr), **overrides: Any
) -> SettingsT:
    """`cls()` from the environment and the env file; raises ConfigError with one line per mistake."""
    prefix = cls.model_config.get("env_prefix", "")
    path = env_file()
    from_file = {k: v for k, v in dotenv_values(path).items() if v is not None} if path and path.is_file() else {}
    sources = _Sources(prefix, from_file, path)
    lines = []
    for name in sources.names():
        if _field(name, prefix, cls) is None:
            (lines.append if name in sources.file else warn)(_unknown_line(name, sources, cls))
    try:
        settings = cls(_env_file=path if from_file else None, **overrides)
    except ValidationError as exc:
        lines += [_error_line(error, sources, prefix) for error in exc.errors()]
    except SettingsError as exc:  # a value pydantic-settings could not decode before validating it
        lines.append(f"{exc}{f': {exc.__cause__}' if exc.__cause__ else ''}")
    else:
        if not lines:
            return settings
    raise ConfigError(lines)


def import_modules(names: list[str], variable: str) -> list[ModuleType]:
    """Import each named module, or raise ConfigError naming the setting that listed it."""
    modules, lines = [], []
    for name in names:
        try:
            modules.append(importlib.import_module(name))
        except ImportError as exc:
            hint = " (is its directory on PYTHONPATH? is its code generated?)" if isinstance(exc, ModuleNotFoundError) else ""
            lines.append(f"{variable}: cannot import {name!r}: {exc}{hint}")
    if lines:
        raise ConfigError(lines)
    return modules


def module_list(value: Any) -> Any:
    """A before-validator: JSON list, or comma-separated names."""
    return _json_or_text(
        value, "[", 'expected a JSON list of strings such as ["a.b", "c.d"], or names separated by commas',
        lambda text: [part.strip() for part in text.split(",") if part.strip()],
    )


def entry_list(value: Any) -> Any:
    """A before-validator for entries that contain commas themselves: JSON list, or entries
    separated by whitespace (spaces, newlines)."""
    return _json_or_text(value, "[", "expected a JSON list of strings, or entries separated by spaces", str.split)


def number_map(value: Any) -> Any:
    """A before-validator: JSON object, or `name=value` pairs separated by commas."""
    return _json_or_text(
        value, "{", 'expected a JSON object such as {"Search": 10}, or pairs such as Search=10,GetItem=1', _pairs
    )


# -- pieces ------------------------------------------------------------------------------------


class _Sources:
    """Where each variable under the prefix came from (the environment wins, as in pydantic-settings)."""

    def __init__(self, prefix: str, from_file: dict[str, str], path: Path | None) -> None:
        self.prefix = prefix.upper()
        self.environ = {k.upper(): v for k, v in os.environ.items() if k.upper().startswith(self.prefix)}
        self.file = {k.upper(): v for k, v in from_file.items() if k.upper().startswith(self.prefix)}
        self.path = path

    def names(self) -> list[str]:
        return sorted({*self.environ, *self.file})

    def in_file(self, variable: str) -> bool:
        """The value in effect is the file's (the make targets export the file: same value in both)."""
        return variable in self.file and self.environ.get(variable, self.file[variable]) == self.file[variable]

    def describe(self, variable: str) -> str:
        if self.in_file(variable):
            return f"{variable}={self.file[variable]!r} (from {self.path})"
        if variable in self.environ:
            return f"{variable}={self.environ[variable]!r} (from the environment)"
        return f"{variable} (not set)"


def _field(variable: str, prefix: str, cls: type[BaseSettings]) -> str | None:
    name = variable[len(prefix) :].lower()
    return name if name in cls.model_fields else None


def _unknown_line(variable: str, sources: _Sources, cls: type[BaseSettings]) -> str:
    known = [f"{sources.prefix}{name.upper()}" for name in cls.model_fields]
    close = difflib.get_close_matches(variable, known, n=1)
    hint = f"; did you mean {close[0]}?" if close else ""
    return f"{sources.describe(variable)}: not a setting of this process{hint}"


def _error_line(error: Any, sources: _Sources, prefix: str) -> str:
    loc = error.get("loc") or ()
    message = error["msg"].removeprefix("Value error, ")
    if not loc:  # a check across several settings (the model validator)
        return message
    variable = f"{prefix}{str(loc[0]).upper()}".upper()
    where = "".join(f"[{part!r}]" for part in loc[1:])
    return f"{sources.describe(variable)}: {where + ': ' if where else ''}{message}"


def _json_or_text(value: Any, opener: str, expected: str, parse_text: Callable[[str], Any]) -> Any:
    """JSON when the (string) value starts with `opener`, else `parse_text(value)`; other types pass."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.startswith(opener):
        try:
            return json.loads(text)
        except ValueError:
            raise ValueError(expected) from None
    return parse_text(text)


def _pairs(text: str) -> dict[str, str]:
    pairs = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, number = part.partition("=")
        if not sep:
            raise ValueError(f'expected name=value pairs such as Search=10, got {part!r}')
        pairs[key.strip()] = number.strip()
    return pairs
