"""PSS per process, for /metrics: what each process really costs when pages are shared.

RSS counts the shared table (and the pages forked workers share) once per process, so it
overstates a design whose point is one copy. PSS (proportional set size) splits each shared
page between the processes mapping it; summed over processes it is the machine's real use.
Read at scrape time from /proc/<pid>/smaps_rollup (Linux 4.14+; one read, no page walk in
Python). Never imports grpc: pool-side code may use it.
"""

from __future__ import annotations

import os
from typing import Callable, Iterator

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector


def pss_bytes(pid: int) -> int | None:
    """The process's PSS in bytes; None if it is gone or the kernel does not say."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as rollup:
            for line in rollup:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1]) * 1024  # the kernel writes kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def children(pid: int) -> list[int]:
    """The pids whose parent is `pid` (from /proc; no psutil in production)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat:
                # pid (comm) state ppid ...: comm may hold spaces and parentheses; split after it.
                ppid = int(stat.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid:
            found.append(int(entry))
    return found


def is_resource_tracker(pid: int) -> bool:
    """Whether `pid` is a multiprocessing resource tracker (a helper, not one of our processes)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return b"multiprocessing.resource_tracker" in cmdline.read()
    except OSError:
        return False


class PssCollector(Collector):
    """`offload_process_pss_bytes{process, pid}` for the processes `processes()` names (pid -> role)."""

    def __init__(self, processes: Callable[[], dict[int, str]]) -> None:
        self._processes = processes

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "offload_process_pss_bytes", "Proportional set size of each offload process (shared pages split)",
            labels=["process", "pid"],
        )
        for pid, role in sorted(self._processes().items()):
            value = pss_bytes(pid)
            if value is not None:
                family.add_metric([role, str(pid)], value)
        yield family
