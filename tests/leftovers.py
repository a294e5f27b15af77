"""What this test session leaves in /dev/shm: it must be nothing (checked at session end).

The machine may be shared with other programs and other test sessions, so only entries that
are provably this session's count: they are new since the session started, and either a
directory a fixture made (`record_dir`) or named after a process this session started
(`record_pids`; compute names its segments and semaphores `[sem.]offload-<pid>-...`).
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Iterable

SHM = Path("/dev/shm")
_OWNER_RE = re.compile(r"^(?:sem\.)?offload-(\d+)-")

_before: set[str] = set()
_pids: set[int] = set()
_dirs: set[str] = set()


def snapshot() -> None:
    """At session start: entries already there are never this session's."""
    _before.clear()
    _before.update(_names())


def record_pids(pids: Iterable[int]) -> None:
    """Processes this session started (compute, or a tree holding one)."""
    _pids.update(pids)


def record_dir(path: Path) -> None:
    """A directory a fixture made under /dev/shm."""
    if path.parent == SHM:
        _dirs.add(path.name)


def ours() -> list[str]:
    """This session's entries still in /dev/shm, sorted."""
    found = []
    for name in _names() - _before:
        owner = _OWNER_RE.match(name)
        if name in _dirs or (owner and int(owner.group(1)) in _pids):
            found.append(name)
    return sorted(found)


def wait_gone(timeout: float = 10.0) -> list[str]:
    """`ours()`, after giving resource trackers of processes just stopped the time to unlink
    what they clean up (they do it once the last process holding their pipe has exited)."""
    deadline = time.monotonic() + timeout
    while (left := ours()) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def _names() -> set[str]:
    try:
        return {entry.name for entry in SHM.iterdir()}
    except OSError:
        return set()
