"""Gateway settings: one object, built in the entry point (or the app factory) and passed down.

Every field is an environment variable `OFFLOAD_GATEWAY_<FIELD>` (or a line in `.env`). Lists are
JSON or comma-separated, dicts JSON or name=value pairs, e.g. `OFFLOAD_GATEWAY_ROUTE_TIMEOUTS=Search=10`.
Build it with `offload.config.load(GatewaySettings)`: mistakes come back one line each.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from offload.addresses import is_loopback
from offload.keys import parse_entry
from offload.config import entry_list, module_list, number_map

BUILTIN_PROTO_MODULES = ["offload.v1.compute_pb2"]


class GatewaySettings(BaseSettings):
    # An empty value (`OFFLOAD_GATEWAY_TLS_CA_FILE=`) means unset, as .env.example reads.
    model_config = SettingsConfigDict(env_prefix="OFFLOAD_GATEWAY_", env_file=".env", extra="ignore", env_ignore_empty=True)

    # -- HTTP serving ----------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="HTTP listen host")
    port: int = Field(8000, ge=0, le=65535, description="HTTP listen port")
    workers: int = Field(4, ge=1, description="Worker processes (uvicorn, forked by gunicorn after the app is loaded; each one is stateless)")
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1, description="Largest HTTP request body (413 beyond)")
    max_header_bytes: int = Field(16 * 1024, ge=1024, description="Most bytes of all request headers together (431 beyond)")
    max_headers: int = Field(100, ge=8, description="Most request headers (431 beyond)")
    max_url_bytes: int = Field(8 * 1024, ge=256, description="Longest path + query string (414 beyond)")
    cors_allow_origins: Annotated[list[str], NoDecode] = Field(
        [], description='Origins browsers may call from (CORS), e.g. https://app.example.com or *; empty: CORS off'
    )
    access_log: bool = Field(False, description="One JSON log line per request (costs ~100 us each)")
    graceful_shutdown_seconds: float = Field(10.0, gt=0, description="On SIGTERM, how long requests may finish")
    worker_timeout_seconds: float = Field(
        60.0, ge=2, description="A worker whose event loop has not ticked for this long is killed and replaced"
    )
    log_level: str = Field("INFO", description="Log level")
    log_format: Literal["auto", "console", "json"] = Field(
        "auto", description="Log lines: json (one object per line, for log shippers), console (aligned key=value, for people; coloured on a terminal), auto: console when stderr is a terminal, else json"
    )

    # -- the hop to compute ----------------------------------------------------------------
    compute_address: str = Field(
        "127.0.0.1:50051", description="gRPC target of compute: host:port, unix:/path.sock, dns:///name:port"
    )
    extra_proto_modules: Annotated[list[str], NoDecode] = Field(
        [], description="Your generated *_pb2 modules whose services get REST routes, on top of the built-in ones"
    )
    proto_modules: Annotated[list[str], NoDecode] = Field(
        BUILTIN_PROTO_MODULES,
        description="The built-in *_pb2 modules with REST routes (add yours to extra_proto_modules)",
    )
    default_timeout_seconds: float = Field(30.0, gt=0, description="Deadline of a unary call to compute")
    stream_timeout_seconds: float = Field(3600.0, gt=0, description="Deadline of a server-streaming call (SSE)")
    max_timeout_seconds: float = Field(3600.0, gt=0, description="Largest X-Request-Timeout (400 beyond); route timeouts are clamped to it")
    route_timeouts: Annotated[dict[str, float], NoDecode] = Field(
        {}, description='Per-RPC deadline, by method name or full name, e.g. {"Search": 10} or Search=10'
    )
    retry_max_attempts: int = Field(3, ge=1, le=5, description="gRPC retry attempts for GET routes on UNAVAILABLE")
    max_reconnect_backoff_ms: int = Field(
        1000, ge=100, description="Cap of the channel's reconnect backoff: how fast the gateway notices compute is back"
    )
    max_message_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="Largest gRPC message received from compute")
    batching: bool = Field(
        True, description="Send the calls compute answers on its loop (GetItem, GetStats...) in batches: one RPC per loop iteration"
    )
    batch_window_seconds: float = Field(
        0.0, ge=0, le=0.1, description="How long a call may wait for others to share its batch (0: same loop iteration only)"
    )
    batch_max_calls: int = Field(128, ge=1, le=4096, description="Most calls in one batch")
    batch_max_bytes: int = Field(1 << 20, ge=1024, description="Most request bytes in one batch (bigger calls go alone)")
    readiness_timeout_seconds: float = Field(1.0, gt=0, description="Deadline of the health check behind /readyz")
    sse_keepalive_seconds: float = Field(15.0, gt=0, description="SSE comment sent after this much silence")

    # -- WebSocket streams (gateway/websocket.py) -------------------------------------------
    ws_allowed_origins: Annotated[list[str], NoDecode] = Field(
        [], description="Browser origins allowed to open a WebSocket, e.g. https://app.example.com or *; same-origin and non-browser clients always are"
    )
    ws_ping_interval_seconds: float = Field(20.0, gt=0, description="WebSocket ping sent after this long; the peer's pong keeps the socket")
    ws_ping_timeout_seconds: float = Field(20.0, gt=0, description="A WebSocket whose pong is this late is closed (1011)")
    ws_send_timeout_seconds: float = Field(
        30.0, gt=0, description="A WebSocket reader that takes no message for this long is dropped (its buffer is bounded, never grown)"
    )
    ws_compression: bool = Field(False, description="permessage-deflate on WebSockets (less bandwidth, more CPU and ~300 KiB per socket)")

    # -- who may call (gateway/auth.py) ------------------------------------------------------
    auth: Literal["auto", "on", "off"] = Field(
        "auto", description="API keys required: auto = when listening beyond loopback; on; off (trusted networks only)"
    )
    api_keys: Annotated[list[str], NoDecode] = Field(
        [], description="API keys, hashed: key_id:sha256-hex:scope,scope (python -m gateway.auth new makes one); several: space-separated or JSON"
    )
    api_keys_file: Path | None = Field(None, description="More API key entries, one per line; re-read when it changes")
    auth_open_paths: Annotated[list[str], NoDecode] = Field(
        ["/readyz", "/metrics", "/docs", "/openapi.json"],
        description="Admin paths served without a key (/healthz always is); the others need the admin scope",
    )
    jwt_secret_file: Path | None = Field(None, description="Bearer JWTs signed HS256 with this shared key (32+ bytes)")
    jwt_jwks_file: Path | None = Field(None, description="Bearer JWTs signed with the keys of this JWKS file (RS256, ES256...)")
    jwt_audience: str = Field("", description="Required aud claim of JWTs (empty: not checked)")
    jwt_issuer: str = Field("", description="Required iss claim of JWTs (empty: not checked)")
    compute_api_key_file: Path | None = Field(
        None, description="The key this gateway presents to a compute that requires one (its scopes: dispatch and the routes')"
    )
    rate_limit: str = Field("", description="Per API key, e.g. 100/second or 5000/hour (the limits library); empty: none")
    rate_limit_storage_uri: str = Field(
        "memory://", description="Rate-limit counters: memory:// (per worker) or redis://host:6379 (shared)"
    )

    # -- TLS to compute (required for a non-loopback compute address) ----------------------
    tls_ca_file: Path | None = Field(None, description="CA bundle that signed compute's certificate; enables TLS")
    tls_cert_file: Path | None = Field(None, description="Client certificate (PEM) for mTLS")
    tls_key_file: Path | None = Field(None, description="Client private key (PEM) for mTLS")
    tls_server_name: str | None = Field(None, description="Override of the name checked in compute's certificate")
    insecure_remote: bool = Field(False, description="Allow plaintext gRPC to a non-loopback compute (not advised)")

    # -- heartbeat ------------------------------------------------------------------------
    heartbeat_interval: float = Field(0.05, gt=0, description="Loop heartbeat tick (seconds)")
    stall_threshold: float = Field(0.5, gt=0, description="Loop lag that counts as a stall (seconds)")
    asyncio_debug: bool = Field(
        False, description="asyncio debug mode: log every loop callback slower than slow_callback_seconds (try it first when the heartbeat reports stalls)"
    )
    slow_callback_seconds: float = Field(
        0.1, gt=0, description="With asyncio_debug: a callback running longer than this is logged"
    )

    _names = field_validator("extra_proto_modules", "proto_modules", "cors_allow_origins", "auth_open_paths", "ws_allowed_origins", mode="before")(
        module_list
    )
    _keys = field_validator("api_keys", mode="before")(entry_list)

    @property
    def auth_enabled(self) -> bool:
        return self.auth == "on" or (self.auth == "auto" and not is_loopback(f"{self.host}:0"))
    _timeouts = field_validator("route_timeouts", mode="before")(number_map)

    @property
    def routed_proto_modules(self) -> list[str]:
        return list(dict.fromkeys([*self.proto_modules, *self.extra_proto_modules]))

    @model_validator(mode="after")
    def _check(self) -> "GatewaySettings":
        if self.tls_ca_file is None and not self.insecure_remote and not is_loopback(self.compute_address):
            raise ValueError(
                f"refusing plaintext gRPC to non-loopback compute {self.compute_address!r}: "
                "set OFFLOAD_GATEWAY_TLS_CA_FILE (or OFFLOAD_GATEWAY_INSECURE_REMOTE=true)"
            )
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("mTLS needs both tls_cert_file and tls_key_file")
        if self.tls_cert_file is not None and self.tls_ca_file is None:
            raise ValueError("tls_cert_file needs tls_ca_file")
        if self.stall_threshold <= self.heartbeat_interval:
            raise ValueError("stall_threshold must be larger than heartbeat_interval")
        if self.default_timeout_seconds > self.max_timeout_seconds:
            raise ValueError("default_timeout_seconds exceeds max_timeout_seconds")
        if self.jwt_secret_file is not None and self.jwt_jwks_file is not None:
            raise ValueError("set jwt_secret_file or jwt_jwks_file, not both")
        if self.jwt_jwks_file is not None and not self.jwt_audience:
            raise ValueError("jwt_jwks_file needs jwt_audience: an identity provider signs tokens for other services too")
        has_jwt = self.jwt_secret_file is not None or self.jwt_jwks_file is not None
        if self.auth_enabled and not self.api_keys and self.api_keys_file is None and not has_jwt:
            raise ValueError(
                f"refusing to serve on {self.host!r} without API keys: set OFFLOAD_GATEWAY_API_KEYS or "
                "OFFLOAD_GATEWAY_API_KEYS_FILE (python -m gateway.auth new makes a key), or OFFLOAD_GATEWAY_AUTH=off"
            )
        for entry in self.api_keys:
            parse_entry(entry)  # its ValueError says what is wrong, never echoing the hash
        if self.rate_limit and not self.auth_enabled:
            raise ValueError("rate_limit counts per API key: it needs authentication (OFFLOAD_GATEWAY_AUTH=on, and keys)")
        if self.rate_limit:
            from limits import parse

            try:
                parse(self.rate_limit)
            except ValueError:
                raise ValueError(f"rate_limit {self.rate_limit!r}: expected e.g. 100/second or 5000/hour") from None
        return self

    def route_timeout(self, method_name: str, full_name: str, streaming: bool) -> float:
        """The default deadline of one RPC, clamped to the maximum."""
        value = self.route_timeouts.get(full_name, self.route_timeouts.get(method_name))
        if value is None:
            value = self.stream_timeout_seconds if streaming else self.default_timeout_seconds
        return min(value, self.max_timeout_seconds)
