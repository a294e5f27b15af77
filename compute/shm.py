"""Numpy arrays in shared memory, as mmap'd files in a directory (default /dev/shm).

Only compute creates and unlinks segments; pool workers attach read-only by path. Plain
files + mmap instead of multiprocessing.shared_memory: nothing registers with the resource
tracker, so no process but the owner can ever unlink a segment (cpython#82300), and the
same code maps a snapshot directory on disk.

Segment names embed the owner's pid, so segments left by a crashed run are recognised and
swept at start-up. The POSIX semaphores multiprocessing creates for the pool's queues are named
the same way (`name_semaphores`), so the sweep recognises those too.
"""

from __future__ import annotations

import logging
import mmap
import multiprocessing.process
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger("compute.shm")

PREFIX = "offload"
# glibc keeps a named POSIX semaphore `/name` as the file /dev/shm/sem.name, whatever shm_dir is.
SEMAPHORE_DIR = Path("/dev/shm")
_NAME_RE = re.compile(rf"^(?:sem\.)?{PREFIX}-(\d+)-")


@dataclass(frozen=True, slots=True)
class ArraySpec:
    """Everything a process needs to attach: picklable, tiny."""

    path: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def segment_path(directory: Path, name: str) -> Path:
    return directory / f"{PREFIX}-{os.getpid()}-{name}"


def create(directory: Path, name: str, dtype: np.dtype | str, shape: tuple[int, ...]) -> tuple[np.ndarray, ArraySpec]:
    """Create a zero-filled writable array backed by a new segment. The caller owns it.

    The segment's bytes are reserved now (posix_fallocate): when the filesystem is full this
    raises OSError(ENOSPC) and leaves nothing behind. A segment only truncated to size would
    be accepted, and the process killed by SIGBUS at the first write to a page tmpfs cannot
    provide.
    """
    spec = ArraySpec(str(segment_path(directory, name)), np.dtype(dtype).str, tuple(int(s) for s in shape))
    fd = os.open(spec.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        if spec.nbytes:
            os.posix_fallocate(fd, 0, spec.nbytes)
        array = _map(fd, spec, writable=True)
    except BaseException:
        os.close(fd)
        unlink(spec)
        raise
    os.close(fd)  # the mapping keeps the memory; the fd is not needed
    return array, spec


def free_bytes(directory: Path) -> int:
    """Bytes an unprivileged process may still create in `directory`'s filesystem."""
    stats = os.statvfs(directory)
    return stats.f_bavail * stats.f_frsize


def attach(spec: ArraySpec, *, writable: bool = False) -> np.ndarray:
    """Map an existing segment; read-only unless asked (only the owner writes)."""
    fd = os.open(spec.path, os.O_RDWR if writable else os.O_RDONLY)
    try:
        return _map(fd, spec, writable=writable)
    finally:
        os.close(fd)


def _map(fd: int, spec: ArraySpec, *, writable: bool) -> np.ndarray:
    if spec.nbytes == 0:
        return np.empty(spec.shape, dtype=spec.dtype)
    prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
    buffer = mmap.mmap(fd, spec.nbytes, flags=mmap.MAP_SHARED, prot=prot)
    return np.frombuffer(buffer, dtype=spec.dtype).reshape(spec.shape)


def unlink(spec: ArraySpec) -> None:
    """Idempotent."""
    try:
        os.unlink(spec.path)
    except FileNotFoundError:
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def name_semaphores() -> None:
    """Name the semaphores multiprocessing creates from now on in this process after it:
    /dev/shm/sem.offload-<pid>-mp-<random> instead of sem.mp-<random>.

    Each ProcessPoolExecutor makes five (its call queue's two locks and bounded semaphore, its
    result queue's two locks). Under forkserver they must stay named while workers open them, and
    only their finalizers or the resource tracker unlink them: a compute SIGKILLed together with
    its tracker (a process-group kill) leaves them behind, as anonymous `sem.mp-*` files nobody
    could tell from another program's. With our prefix and pid in the name, `sweep_stale` removes
    them at the next start-up, and never anyone else's. `semprefix` is multiprocessing's own
    setting for this (private, unchanged since Python 3.4); without it the names stay default.
    """
    config = getattr(multiprocessing.process.current_process(), "_config", None)
    if isinstance(config, dict) and "semprefix" in config:
        config["semprefix"] = f"/{PREFIX}-{os.getpid()}-mp"


def sweep_stale(directory: Path) -> list[str]:
    """Remove segments and semaphores whose owner process is gone (a crashed or SIGKILLed run)."""
    removed = []
    if not directory.is_dir():
        return removed
    for entry in directory.iterdir():
        match = _NAME_RE.match(entry.name)
        if match and int(match.group(1)) != os.getpid() and not _alive(int(match.group(1))):
            try:
                entry.unlink()
                removed.append(entry.name)
            except FileNotFoundError:
                pass
    if removed:
        log.warning("removed stale shared-memory segments", extra={"segments": removed})
    return removed
