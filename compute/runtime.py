"""What light operations receive: the live objects of this compute process."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from compute.pool import HealingPool
from compute.settings import ComputeSettings
from compute.table import EmbeddingTable
from offload.heartbeat import Heartbeat
from offload.tracing import Tracing


@dataclass
class Runtime:
    settings: ComputeSettings
    table: EmbeddingTable
    pool: HealingPool
    heartbeat: Heartbeat
    tracing: Tracing | None = None  # None: tracing off
    # Optional services added by feature modules (e.g. "jobs"), looked up by name.
    services: dict[str, Any] = field(default_factory=dict)
    started_at: float = field(default_factory=time.time)
