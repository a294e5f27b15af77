"""Job states: the proto's JobState enum is their one definition.

The store keeps them as their names (the SQL CHECK is built from this list), the Job message
carries the enum, and nothing else spells them.
"""

from __future__ import annotations

from offload.v1 import jobs_pb2

STATES = tuple(name for name in jobs_pb2.JobState.keys() if name != "JOB_STATE_UNSPECIFIED")
QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = STATES  # fails at import if the proto changes them
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})
ACTIVE = (QUEUED, RUNNING)
