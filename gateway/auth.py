"""Who may call what: API keys, scopes declared on the RPCs, and per-key rate limits.

- **Keys** are configured hashed, never in clear: each entry is `key_id:sha256-hex:scope,scope`
  (`python -m gateway.auth new KEY_ID SCOPE...` makes a key and its entry). Entries come from
  `OFFLOAD_GATEWAY_API_KEYS` and from `OFFLOAD_GATEWAY_API_KEYS_FILE` (one per line, `#`
  comments). The file is re-read when it changes (checked at most once a second), so keys are
  added and revoked without a restart.
- **Bearer JWTs** (optional, pyjwt): HS256 against a shared key file, or RS256/ES256/EdDSA
  against a JWKS file (re-read when it changes). `exp` and `sub` are required, `aud`/`iss` are
  checked when set; scopes come from `scope` (space-separated) or `scp`; the principal is
  `jwt:<sub>`.
- **Credentials**: `Authorization: Bearer <key or JWT>` or `X-API-Key: <key>`. Missing or
  invalid: 401 with `WWW-Authenticate`. Valid but without the route's scopes: 403.
- **Scopes** are declared on each RPC (`option (offload.v1.auth) = {scopes: ["search"]}`); an RPC
  without the option needs only a valid key. Admin routes need `admin` unless open.
- **Rate limits** (the `limits` library, sliding-window counter) count per key. With the default
  `memory://` storage each gateway worker counts for itself, so the limit a key sees is up to
  workers × the setting; a `redis://` storage URI shares the counters between workers and
  gateways.
- The key's id (never the key) is the call's principal: on the gateway's log lines and, in
  metadata, on compute's (which audit-logs job submits and cancels).
"""

from __future__ import annotations

import logging
import secrets
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from gateway.errors import ApiError
from offload.keys import RELOAD_CHECK_SECONDS, ApiKey, KeyRing, digest_of, parse_entry  # noqa: F401  (KeyRing, parse_entry: re-exported)

log = logging.getLogger("gateway.auth")

ADMIN_SCOPE = "admin"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a verified JWT names."""

    key_id: str  # "jwt:<sub>"
    scopes: frozenset[str]


class JwtVerifier:
    """Bearer JWTs, with pyjwt: a shared HS256 key, or the public keys of a JWKS file."""

    ASYMMETRIC = ["RS256", "RS384", "RS512", "PS256", "ES256", "ES384", "EdDSA"]

    def __init__(self, secret_file: Path | None, jwks_file: Path | None, audience: str, issuer: str) -> None:
        self._secret_file, self._jwks_file = secret_file, jwks_file
        self._audience, self._issuer = audience or None, issuer or None
        self._checked = 0.0
        self._mtimes: tuple = ()
        self._load()

    def verify(self, token: str) -> Principal:
        import jwt

        now = time.monotonic()
        if now - self._checked >= RELOAD_CHECK_SECONDS:
            self._checked = now
            mtimes = self._file_mtimes()
            if mtimes != self._mtimes:
                try:
                    self._load()
                except (OSError, ValueError, jwt.PyJWTError) as exc:  # keep the keys we had
                    self._mtimes = mtimes
                    log.error("JWT keys not reloaded", extra={"problem": str(exc)})
        try:
            key, algorithms = self._key_for(token)
            claims = jwt.decode(
                token, key, algorithms=algorithms, audience=self._audience, issuer=self._issuer, leeway=30,
                options={"require": ["exp", "sub"], "verify_aud": self._audience is not None},
            )
        except jwt.ExpiredSignatureError:
            raise unauthenticated("the token has expired") from None
        except (jwt.InvalidAudienceError, jwt.InvalidIssuerError):
            raise unauthenticated("the token is not for this service") from None
        except (jwt.PyJWTError, KeyError, ValueError, TypeError):
            raise unauthenticated("the token is not valid") from None
        return Principal(f"jwt:{quote(str(claims['sub']), safe='@._-|+')[:128]}", _claimed_scopes(claims))

    def _key_for(self, token: str) -> tuple[Any, list[str]]:
        import jwt

        if self._secret is not None:
            return self._secret, ["HS256"]
        kid = jwt.get_unverified_header(token).get("kid")
        candidates = [k for k in self._jwks.keys if kid is None or k.key_id == kid]
        if not candidates:
            raise KeyError(kid)
        key = candidates[0]
        # The key's own algorithm when the JWKS names one (never an HMAC one: those keys are public).
        if key.algorithm_name and not key.algorithm_name.startswith("HS"):
            return key.key, [key.algorithm_name]
        return key.key, self.ASYMMETRIC

    def _file_mtimes(self) -> tuple:
        return tuple(p.stat().st_mtime_ns if p is not None and p.exists() else None for p in (self._secret_file, self._jwks_file))

    def _load(self) -> None:
        """Read and check both files, then swap: a bad or half-written file never takes effect."""
        import jwt

        mtimes = self._file_mtimes()
        secret = self._secret_file.read_bytes().strip() if self._secret_file is not None else None
        if secret is not None and len(secret) < 32:
            raise ValueError(f"{self._secret_file}: an HS256 key needs at least 32 bytes")
        jwks = jwt.PyJWKSet.from_json(self._jwks_file.read_text()) if self._jwks_file is not None else None
        self._secret, self._jwks, self._mtimes = secret, jwks, mtimes


def _claimed_scopes(claims: dict) -> frozenset[str]:
    """OAuth's `scope` (space-separated) or `scp` (a list, or space-separated as some issuers do)."""
    found: set[str] = set()
    for value in (claims.get("scope"), claims.get("scp")):
        if isinstance(value, str):
            found.update(value.split())
        elif isinstance(value, list):
            found.update(str(v) for v in value)
    return frozenset(found)


class Authenticator:
    """Per request: `principal(credential)` -> the key or a 401; `authorize(key, scopes)` -> 403."""

    def __init__(self, keys: KeyRing, jwt: JwtVerifier | None = None) -> None:
        self.keys = keys
        self.jwt = jwt

    def principal(self, credential: str | None) -> ApiKey | Principal:
        if not credential:
            raise unauthenticated("an API key is required: Authorization: Bearer <key> or X-API-Key: <key>")
        if self.jwt is not None and credential.count(".") == 2:
            return self.jwt.verify(credential)
        key = self.keys.lookup(credential)
        if key is None:
            raise unauthenticated("the API key is not valid")
        return key

    @staticmethod
    def authorize(key: ApiKey | Principal, scopes: frozenset[str]) -> None:
        missing = scopes - key.scopes
        if missing:
            raise ApiError(403, "PERMISSION_DENIED", f"this API key lacks the scope(s) {', '.join(sorted(missing))}")


def build_authenticator(settings: Any) -> Authenticator:
    """From GatewaySettings; raises ValueError/OSError on a bad keys, secret or JWKS file."""
    verifier = None
    if settings.jwt_secret_file is not None or settings.jwt_jwks_file is not None:
        verifier = JwtVerifier(settings.jwt_secret_file, settings.jwt_jwks_file, settings.jwt_audience, settings.jwt_issuer)
    return Authenticator(KeyRing(settings.api_keys, settings.api_keys_file), verifier)


def unauthenticated(message: str) -> ApiError:
    return ApiError(401, "UNAUTHENTICATED", message, [(b"www-authenticate", b'Bearer realm="offload"')])


def credential_of(authorization: str | None, api_key: str | None) -> str | None:
    if api_key:
        return api_key
    if authorization and authorization[:7].lower() == "bearer ":
        return authorization[7:].strip()
    return None


class RateLimiter:
    """Per key, with the `limits` library (async storage: memory per worker, or redis shared)."""

    def __init__(self, rate: str, storage_uri: str) -> None:
        from limits import parse
        from limits.aio.strategies import SlidingWindowCounterRateLimiter
        from limits.storage import storage_from_string

        self.item = parse(rate)
        uri = storage_uri if storage_uri.startswith("async+") else f"async+{storage_uri}"
        self._limiter = SlidingWindowCounterRateLimiter(storage_from_string(uri))

    async def check(self, key_id: str) -> None:
        if await self._limiter.hit(self.item, key_id):
            return
        stats = await self._limiter.get_window_stats(self.item, key_id)
        retry_after = max(1, int(stats.reset_time - time.time() + 0.999))
        raise ApiError(
            429, "RESOURCE_EXHAUSTED", f"rate limit of {self.item} per API key exceeded",
            [(b"retry-after", str(retry_after).encode())],
        )


def main(argv: list[str] | None = None) -> int:
    """`python -m gateway.auth new KEY_ID [SCOPE ...]`: a new random key and its entry."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2 or args[0] != "new":
        print("usage: python -m gateway.auth new KEY_ID [SCOPE ...]", file=sys.stderr)
        return 2
    key_id, scopes = args[1], args[2:]
    key = "ofk_" + secrets.token_urlsafe(32)
    entry = f"{key_id}:{digest_of(key).hex()}:{','.join(scopes)}"
    parse_entry(entry)
    print(f"key (give it to the client; it is not stored): {key}", file=sys.stderr)
    print(entry)
    return 0


if __name__ == "__main__":
    sys.exit(main())
