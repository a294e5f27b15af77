"""Compute settings: one object, built in the entry point and passed down.

Every field is an environment variable `OFFLOAD_COMPUTE_<FIELD>` (or a line in `.env`). Build
it with `offload.config.load(ComputeSettings)`: mistakes come back one line each.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from compute.jobs.webhook_policy import parse_allow_entry
from compute.jobs.webhook_signing import parse_secret
from offload.addresses import is_loopback
from offload.config import entry_list, module_list
from offload.keys import parse_entry

BUILTIN_OPERATION_MODULES = ["compute.operations", "compute.jobs.operations"]
BUILTIN_JOB_TYPE_MODULES = ["compute.jobs.batch_search"]

# A list of names: JSON or comma-separated (offload.config.module_list), never decoded by
# pydantic-settings itself (its error would not name the variable).
Names = Annotated[list[str], NoDecode]


class ComputeSettings(BaseSettings):
    # An empty value (`OFFLOAD_COMPUTE_TLS_CERT_FILE=`) means unset, as .env.example reads.
    model_config = SettingsConfigDict(env_prefix="OFFLOAD_COMPUTE_", env_file=".env", extra="ignore", env_ignore_empty=True)

    # -- serving ---------------------------------------------------------------------------
    address: str = Field("127.0.0.1:50051", description="gRPC listen address: host:port or unix:/path.sock")
    tls_cert_file: Path | None = Field(None, description="Server certificate (PEM); enables TLS")
    tls_key_file: Path | None = Field(None, description="Server private key (PEM)")
    tls_client_ca_file: Path | None = Field(None, description="CA for client certificates; enables mTLS")
    health_address: str | None = Field(
        None, description="Also serve grpc.health.v1 alone, without TLS, here (host:port): for Kubernetes' native gRPC probes"
    )
    metrics_host: str = Field("127.0.0.1", description="Prometheus /metrics listen host")
    metrics_port: int = Field(9101, ge=-1, le=65535, description="Prometheus /metrics port (0 = any free port, -1 = off)")
    max_message_bytes: int = Field(4 * 1024 * 1024, description="Largest gRPC message accepted or sent")
    batch_max_calls: int = Field(
        256, ge=1, description="Most calls one Dispatch RPC (a batch from the gateway or offload.client) may carry"
    )
    drain_grace_seconds: float = Field(10.0, description="On SIGTERM, how long in-flight calls may finish")
    extra_operation_modules: Names = Field(
        [], description="Your modules of @light/@heavy functions, served on top of the built-in ones"
    )
    operation_modules: Names = Field(
        BUILTIN_OPERATION_MODULES,
        description="The built-in operation modules (replacing this list drops them; add yours to extra_operation_modules)",
    )
    unserved_methods: Names = Field(
        [],
        description="RPCs (package.Service.Method) knowingly left without an operation; any other one stops start-up",
    )
    log_level: str = Field("INFO", description="Log level for compute and its pool workers")
    log_format: Literal["auto", "console", "json"] = Field(
        "auto", description="Log lines: json (one object per line, for log shippers), console (aligned key=value, for people; coloured on a terminal), auto: console when stderr is a terminal, else json"
    )
    api_keys: Annotated[list[str], NoDecode] = Field(
        [], description="Keys direct gRPC callers must present (key_id:sha256-hex:scopes); empty: none required"
    )
    api_keys_file: Path | None = Field(None, description="More key entries, one per line; re-read when it changes")

    # -- the embedding table ---------------------------------------------------------------
    rows: int = Field(100_000, ge=1, description="Synthetic table: number of vectors")
    dim: int = Field(128, ge=1, le=65536, description="Synthetic table: vector dimension")
    seed: int = Field(42, description="Synthetic table: random seed (same seed, same table)")
    vectors_path: Path | None = Field(None, description="Your own table: a 2-D float .npy file (rows x dim)")
    ids_path: Path | None = Field(None, description="Ids for vectors_path: UTF-8 text, one id per line")
    shm_dir: Path = Field(Path("/dev/shm"), description="Where shared-memory segments live")
    table_load_dirs: Names = Field(
        ["var/tables"],
        description="Directories LoadTable may read .npy and ids files from (vectors_path's own directory too)",
    )
    table_state_path: Path | None = Field(
        None,
        description="Where compute records the table it last switched to, served again after a restart (default: next to jobs_db_path, <name>.table.json)",
    )
    table_watch: bool = Field(
        False, description="Load the table again (a hot swap) whenever its .npy or ids file changes"
    )

    # -- the pool ---------------------------------------------------------------------------
    pool_size: int = Field(max(1, os.cpu_count() or 1), ge=1, description="Pool worker processes")
    blas_threads: int = Field(1, ge=1, description="BLAS threads per pool worker")
    worker_nice: int = Field(
        19, ge=0, le=19, description="Niceness added to pool workers (19: the serving loops get the CPU first)"
    )
    max_inflight: int = Field(16, ge=1, description="Heavy calls running + queued; beyond: RESOURCE_EXHAUSTED")
    pool_max_batch: int = Field(
        64, ge=1, description="Most waiting calls of one batchable heavy operation (e.g. Search) run as one pool task"
    )
    pool_scan_segments: int = Field(
        2, ge=1, description="Segments a batched scan (Search) is cut into: calls join at the next one, workers share them"
    )
    pool_max_batch_delay_seconds: float = Field(
        0.0, ge=0, description="How long a free worker waits for more calls to join a batch (0: it goes at once)"
    )
    pool_jobs_yield_seconds: float = Field(
        1.0, ge=0, description="While interactive heavy calls arrived this recently, job chunks leave them one worker"
    )
    max_k: int = Field(1000, ge=1, le=1000, description="Largest k for Search (at most the protos' bound, 1000)")
    search_chunk_rows: int = Field(32768, ge=256, description="Rows scanned between cancellation checks")
    rebuild_backoff_seconds: float = Field(0.2, gt=0, description="First delay before re-rebuilding a crashing pool")
    rebuild_backoff_max_seconds: float = Field(30.0, gt=0, description="Cap of that delay (doubles per crash)")
    rebuild_reset_seconds: float = Field(60.0, gt=0, description="Crash-free time after which backoff resets")

    # -- jobs ---------------------------------------------------------------------------------
    jobs_database_url: SecretStr | None = Field(
        None, description="PostgreSQL job store shared by compute replicas (postgresql://user:pass@host/db); unset: SQLite at jobs_db_path"
    )
    jobs_database_pool_size: int = Field(8, ge=1, description="Connections of this compute to the PostgreSQL job store (one more listens)")
    jobs_lease_seconds: float = Field(
        30.0, ge=1, description="A running job's claim lasts this long unrenewed: a dead replica's jobs are requeued after it"
    )
    jobs_db_path: Path = Field(Path("var/jobs.sqlite3"), description="SQLite job store (WAL); its directory is created")
    jobs_db_max_bytes: int = Field(1 << 30, ge=1 << 20, description="Size cap of the job store; when reached, SubmitJob answers UNAVAILABLE")
    jobs_db_synchronous: Literal["NORMAL", "FULL"] = Field(
        "FULL", description="SQLite synchronous mode: FULL survives power loss, NORMAL only process crashes (faster)"
    )
    extra_job_type_modules: Names = Field([], description="Your modules of @job_type planners, on top of the built-in ones")
    job_type_modules: Names = Field(
        BUILTIN_JOB_TYPE_MODULES, description="The built-in job-type modules (add yours to extra_job_type_modules)"
    )
    jobs_concurrency: int = Field(1, ge=1, description="Jobs running at once")
    jobs_chunks_in_flight: int | None = Field(
        None, ge=1, description="Chunks of one job in the pool at once (default: pool_size; interactive calls still go first)"
    )
    jobs_max_queued: int = Field(10_000, ge=1, description="Queued jobs beyond which SubmitJob answers RESOURCE_EXHAUSTED")
    jobs_max_attempts: int = Field(3, ge=1, description="Attempts per job (worker crash, compute restart) before it fails")
    jobs_backoff_base_seconds: float = Field(1.0, gt=0, description="Retry delay ceiling for the first retry (doubles per attempt, full jitter)")
    jobs_backoff_max_seconds: float = Field(60.0, gt=0, description="Largest retry delay ceiling")
    jobs_ttl_seconds: float = Field(86_400.0, gt=0, description="How long a finished job and its result are kept")
    jobs_sweep_interval_seconds: float = Field(60.0, gt=0, description="How often expired jobs are deleted")
    jobs_chunk_queries: int = Field(256, ge=1, description="Batch search: queries per pool call (progress and cancel granularity)")
    jobs_max_queries: int = Field(100_000, ge=1, description="Batch search: most queries in one job")
    jobs_result_page_default: int = Field(100, ge=1, description="GetJob result entries when result_limit is 0")
    jobs_result_page_max: int = Field(1000, ge=1, description="Most GetJob result entries per page")

    # -- webhooks (job callbacks) -------------------------------------------------------------
    webhook_secrets: Annotated[list[SecretStr], NoDecode] = Field(
        [], description="Standard Webhooks signing secrets (whsec_<base64>), JSON list or separated by spaces; every one signs (rotation). Empty: webhooks are off"
    )
    webhook_allowlist: Names = Field(
        [], description="Webhook destinations allowed even when private or loopback: networks (10.1.0.0/16, 127.0.0.1) and host names (hooks.internal, *.corp.example)"
    )
    webhook_allow_public: bool = Field(True, description="Webhooks may go to any public (globally routable) address")
    webhook_allow_http: bool = Field(False, description="Webhook URLs may be plain http (default: https only)")
    webhook_max_attempts: int = Field(10, ge=1, description="Attempts per webhook delivery before it gives up")
    webhook_backoff_base_seconds: float = Field(2.0, gt=0, description="Retry delay ceiling after the first failed attempt (doubles per attempt, full jitter)")
    webhook_backoff_max_seconds: float = Field(3600.0, gt=0, description="Largest retry delay ceiling")
    webhook_timeout_seconds: float = Field(10.0, gt=0, description="Whole-attempt timeout of a webhook POST (resolve, connect, send, read)")
    webhook_concurrency: int = Field(8, ge=1, description="Webhook POSTs in flight at once (the outbound client's connection limit)")

    # -- heartbeat ------------------------------------------------------------------------
    heartbeat_interval: float = Field(0.05, gt=0, description="Loop heartbeat tick (seconds)")
    stall_threshold: float = Field(0.5, gt=0, description="Loop lag that counts as a stall (seconds)")
    asyncio_debug: bool = Field(
        False, description="asyncio debug mode: log every loop callback slower than slow_callback_seconds (try it first when the heartbeat reports stalls)"
    )
    slow_callback_seconds: float = Field(
        0.1, gt=0, description="With asyncio_debug: a callback running longer than this is logged"
    )

    _names = field_validator(
        "extra_operation_modules", "operation_modules", "unserved_methods", "extra_job_type_modules", "job_type_modules",
        "table_load_dirs", mode="before",
    )(module_list)

    _keys = field_validator("api_keys", "webhook_secrets", mode="before")(entry_list)
    _webhook_allowlist = field_validator("webhook_allowlist", mode="before")(module_list)

    @property
    def served_operation_modules(self) -> list[str]:
        return list(dict.fromkeys([*self.operation_modules, *self.extra_operation_modules]))

    @property
    def effective_table_state_path(self) -> Path:
        return self.table_state_path or self.jobs_db_path.with_suffix(".table.json")

    @property
    def served_job_type_modules(self) -> list[str]:
        return list(dict.fromkeys([*self.job_type_modules, *self.extra_job_type_modules]))

    @model_validator(mode="after")
    def _check(self) -> "ComputeSettings":
        if not is_loopback(self.address) and self.tls_cert_file is None:
            raise ValueError(
                f"refusing to listen on non-loopback address {self.address!r} without TLS: "
                "set OFFLOAD_COMPUTE_TLS_CERT_FILE and OFFLOAD_COMPUTE_TLS_KEY_FILE"
            )
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("TLS needs both tls_cert_file and tls_key_file")
        if self.ids_path is not None and self.vectors_path is None:
            raise ValueError("ids_path needs vectors_path")
        if self.jobs_backoff_max_seconds < self.jobs_backoff_base_seconds:
            raise ValueError("jobs_backoff_max_seconds must be at least jobs_backoff_base_seconds")
        if self.jobs_result_page_max < self.jobs_result_page_default:
            raise ValueError("jobs_result_page_max must be at least jobs_result_page_default")
        if self.stall_threshold <= self.heartbeat_interval:
            raise ValueError("stall_threshold must be larger than heartbeat_interval")
        for entry in self.api_keys:
            parse_entry(entry)
        for secret in self.webhook_secrets:
            parse_secret(secret.get_secret_value())
        for entry in self.webhook_allowlist:
            parse_allow_entry(entry)
        if self.webhook_backoff_max_seconds < self.webhook_backoff_base_seconds:
            raise ValueError("webhook_backoff_max_seconds must be at least webhook_backoff_base_seconds")
        return self
