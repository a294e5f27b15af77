"""What operations receive: the live objects of this compute process.

Compute keeps one live `Runtime`, whose `table` is replaced when a new table is swapped in
(compute/tables.py). A unary call gets a `snapshot()` taken at the switch: the same objects,
with the table of the generation that served the call when it started, for the whole call
(its validation, its pool work and its merge see one table). A streaming operation, which may
run for hours, gets the live one: holding an old table that long would keep its memory.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from compute.pool import HealingPool
from compute.settings import ComputeSettings
from compute.table import EmbeddingTable
from offload.heartbeat import Heartbeat
from offload.tracing import Tracing

if TYPE_CHECKING:
    from compute.tables import TableManager


@dataclass
class Runtime:
    settings: ComputeSettings
    table: EmbeddingTable
    pool: HealingPool
    heartbeat: Heartbeat
    tracing: Tracing | None = None  # None: tracing off
    tables: TableManager | None = None  # loads and swaps the table (None: a runtime built by hand, in tests)
    # Optional services added by feature modules (e.g. "jobs"), looked up by name.
    services: dict[str, Any] = field(default_factory=dict)
    started_at: float = field(default_factory=time.time)

    def snapshot(self) -> "Runtime":
        """The same objects, with the table of this moment (the live runtime's changes)."""
        return dataclasses.replace(self)
