"""API keys, configured hashed: parsed, looked up, and re-read from their file when it changes.

Shared by the gateway (REST callers) and compute (direct gRPC callers). An entry is
`key_id:sha256-hex:scope,scope`; `python -m gateway.auth new KEY_ID SCOPE...` makes one.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("offload.keys")

_KEY_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
RELOAD_CHECK_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class ApiKey:
    key_id: str
    digest: bytes  # sha256 of the key
    scopes: frozenset[str]


def digest_of(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def parse_entry(entry: str) -> ApiKey:
    """`key_id:sha256-hex:scope,scope` -> ApiKey; ValueError saying what is wrong (never the hash)."""
    parts = entry.strip().split(":", 2)  # scopes may contain ':' ("jobs:write")
    if len(parts) != 3:
        raise ValueError("an API key entry is key_id:sha256-hex:scopes (scopes comma-separated, may be empty)")
    key_id, hex_digest, scopes = parts
    if not _KEY_ID.fullmatch(key_id):
        raise ValueError(f"API key id {key_id!r}: 1 to 64 ASCII letters, digits, '-', '_' or '.'")
    try:
        digest = bytes.fromhex(hex_digest)
    except ValueError:
        digest = b""
    if len(digest) != 32:
        raise ValueError(f"API key {key_id!r}: the hash must be 64 hex digits (sha256 of the key)")
    return ApiKey(key_id, digest, frozenset(s for s in scopes.split(",") if s))


class KeyRing:
    """The configured keys, by digest. `lookup(key)` re-reads the file when it changed."""

    def __init__(self, entries: list[str], path: Path | None) -> None:
        self._inline = [parse_entry(e) for e in entries]
        self._path = path
        self._mtime: float | None = None
        self._checked = 0.0
        self._by_digest: dict[bytes, ApiKey] = {}
        self._load()

    def __len__(self) -> int:
        return len(self._by_digest)

    def lookup(self, presented: str) -> ApiKey | None:
        now = time.monotonic()
        if self._path is not None and now - self._checked >= RELOAD_CHECK_SECONDS:
            self._checked = now
            self._reload_if_changed()
        digest = digest_of(presented)
        key = self._by_digest.get(digest)
        # The dict finds the candidate; compare_digest keeps the final comparison constant-time.
        return key if key is not None and hmac.compare_digest(key.digest, digest) else None

    def _reload_if_changed(self) -> None:
        try:
            mtime = self._path.stat().st_mtime_ns  # type: ignore[union-attr]
        except OSError:
            mtime = None
        if mtime != self._mtime:
            try:
                self._load()
                log.info("API keys reloaded", extra={"keys": len(self._by_digest)})
            except (ValueError, OSError) as exc:  # keep serving with the keys we had; retried next change
                self._mtime = mtime
                log.error("API keys file not reloaded", extra={"problem": str(exc)})

    def _load(self) -> None:
        """Parse everything first, then swap: a bad file never replaces good keys."""
        keys = list(self._inline)
        mtime = None
        if self._path is not None:
            # A missing file is a mistake, not "no keys" (an empty file revokes them all).
            mtime = self._path.stat().st_mtime_ns
            for number, line in enumerate(self._path.read_text().splitlines(), 1):
                text = line.split("#", 1)[0].strip()
                if text:
                    try:
                        keys.append(parse_entry(text))
                    except ValueError as exc:
                        raise ValueError(f"{self._path}:{number}: {exc}") from None
        ids = [k.key_id for k in keys]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ValueError(f"API key ids used twice: {duplicates}")
        self._by_digest = {k.digest: k for k in keys}
        self._mtime = mtime
