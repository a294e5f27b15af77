"""Memory of a whole setup: total PSS over every process, plus per-process PSS/USS/RSS.

PSS (proportional set size) splits each shared page between the processes that map it, so the
sum over all processes counts the shared table once. Summed RSS counts it once per process: it
is reported for contrast only, never as the headline. Source: /proc/PID/smaps_rollup (kB).
"""

from __future__ import annotations

from pathlib import Path

import psutil

_FIELDS = {
    "Rss": "rss",
    "Pss": "pss",
    "Private_Clean": "private_clean",
    "Private_Dirty": "private_dirty",
    "Shared_Clean": "shared_clean",
    "Shared_Dirty": "shared_dirty",
    "Swap": "swap",
}


def smaps_rollup(pid: int) -> dict[str, int] | None:
    """Bytes per field for one process, or None if it is gone or unreadable."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    values: dict[str, int] = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        key = _FIELDS.get(name.strip())
        if key is not None:
            values[key] = int(rest.split()[0]) * 1024
    if "pss" not in values:
        return None
    values["uss"] = values.get("private_clean", 0) + values.get("private_dirty", 0)
    return values


def describe(proc: psutil.Process) -> str:
    try:
        cmd = proc.cmdline()
    except psutil.Error:
        return "?"
    text = " ".join(cmd)
    if "-m compute" in text:
        return "compute"
    if "-m gateway" in text:
        # gunicorn forks its workers from the master: same command line, the master is their parent.
        try:
            parent = proc.parent()
            return "gateway worker (forked)" if parent is not None and "-m gateway" in " ".join(parent.cmdline()) else "gateway master"
        except psutil.Error:
            return "gateway master"
    if "-m uvicorn" in text:
        return "uvicorn master"
    if "multiprocessing" in text or "forkserver" in text:
        if "forkserver" in text:
            return "forkserver"
        if "resource_tracker" in text:
            return "resource_tracker"
        return "worker (mp child)"
    return (cmd[-1] if cmd else "?")[-40:]


def measure(groups: dict[str, list[psutil.Process]]) -> dict:
    """Total and per-process memory over `groups` (name -> processes)."""
    processes = []
    seen: set[int] = set()
    for group, procs in groups.items():
        for proc in procs:
            if proc.pid in seen:
                continue
            seen.add(proc.pid)
            values = smaps_rollup(proc.pid)
            if values is None:
                continue
            processes.append({"group": group, "pid": proc.pid, "role": describe(proc), **values})
    return {
        "total_pss": sum(p["pss"] for p in processes),
        "total_uss": sum(p["uss"] for p in processes),
        "summed_rss": sum(p["rss"] for p in processes),
        "processes": len(processes),
        "per_process": processes,
    }


def shm_bytes(directory: Path | None) -> int:
    """Bytes held by files in a tmpfs directory (compute's segments)."""
    if directory is None or not directory.is_dir():
        return 0
    return sum(entry.stat().st_blocks * 512 for entry in directory.iterdir() if entry.is_file())
