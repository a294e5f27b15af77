"""`python -m bench.swap`: a table hot swap (LoadTable) on a running offload, timed and watched.

One offload (gateway + compute) serves a synthetic table; LoadTable swaps in a .npy file of
the same shape (another seed, written beforehand, so read from the page cache as a file
refreshed by a nightly job would be), twice:
1. idle: the swap's own time, and how long until the old table's memory is released;
2. under a mixed closed-loop load through the gateway (GetItem and Search clients), whose p99
   per class is compared with the same load just before, on the same deployment.
Total PSS of every process (gateway, compute, its workers) is sampled through both swaps:
its peak, against the table's size, is what a swap costs in memory (two tables at once).
`make bench` runs it too (the "Table swap" section of the report).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import numpy as np

from bench import memory
from bench.designs import Deployment, Table, offload
from bench.runner import HEAVY, LIGHT, run_load
from offload.v1 import compute_pb2, compute_pb2_grpc

SAMPLE_SECONDS = 0.1


class PssSampler:
    """Total PSS of the deployment's processes, every SAMPLE_SECONDS, in a thread (new pool
    workers included: the process list is read again each time)."""

    def __init__(self, dep: Deployment) -> None:
        self._dep = dep
        self._stop = threading.Event()
        self.samples: list[tuple[float, int]] = []
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "PssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic(), memory.measure(self._dep.processes())["total_pss"]))
            self._stop.wait(SAMPLE_SECONDS)

    @property
    def peak(self) -> int:
        return max((pss for _, pss in self.samples), default=0)


def _stub(dep: Deployment) -> compute_pb2_grpc.ComputeServiceStub:
    return compute_pb2_grpc.ComputeServiceStub(grpc.insecure_channel(dep.grpc_target))


def _write_source(directory: Path, table: Table) -> Path:
    """The new table as a .npy file, a block at a time (never the whole table in this process)."""
    path = directory / "next.npy"
    rng = np.random.default_rng(table.seed + 1)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(table.rows, table.dim))
    for start in range(0, table.rows, 65536):
        out[start : start + 65536] = rng.standard_normal((min(65536, table.rows - start), table.dim), dtype=np.float32)
    out.flush()
    del out
    return path


def _swap(stub, path: Path) -> tuple[float, compute_pb2.LoadTableResponse]:
    started = time.perf_counter()
    reply = stub.LoadTable(compute_pb2.LoadTableRequest(file=compute_pb2.NpyTableSource(vectors_path=str(path))), timeout=600)
    return time.perf_counter() - started, reply


def _released(stub, dep: Deployment, table_bytes: int, timeout: float = 60.0) -> float | None:
    """Seconds until no old generation is retiring and shm holds one table again (None: not within `timeout`)."""
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        cache = stub.GetStats(compute_pb2.GetStatsRequest(), timeout=10).cache
        if not cache.retiring_generations and memory.shm_bytes(dep.shm_dir) < 1.5 * table_bytes:
            return time.perf_counter() - started
        time.sleep(0.02)
    return None


def _load_config(duration: float, warmup: float, light: int, heavy: int, timeout: float) -> dict:
    return {
        "mode": "closed", "warmup": warmup, "duration": duration, "drain": 5.0, "timeout": timeout, "seed": 7,
        "classes": [dict(LIGHT, connections=light), dict(HEAVY, connections=heavy)],
    }


def measure(table: Table, workers: int, pool_size: int, logdir: Path, log=print, *, window: float = 3.0,
            light_clients: int = 4, heavy_clients: int = 2, timeout: float = 30.0) -> dict:
    sources = Path(tempfile.mkdtemp(prefix="offload-bench-tables-"))
    dep = offload(table, workers, pool_size, logdir, compute_env={"OFFLOAD_COMPUTE_TABLE_LOAD_DIRS": str(sources)})
    log(f"  swap: starting {dep.label}, table {table.rows} x {table.dim}")
    dep.start(300.0)
    try:
        path = _write_source(sources, table)
        stub = _stub(dep)
        first = stub.GetStats(compute_pb2.GetStatsRequest(), timeout=10).cache
        table_bytes = first.bytes
        run_load(dep, _load_config(1.0, 0.3, light_clients, heavy_clients, timeout))  # every worker warm
        baseline = memory.measure(dep.processes())["total_pss"]

        log("  swap: idle")
        with PssSampler(dep) as idle_pss:
            idle_seconds, idle_reply = _swap(stub, path)
            idle_release = _released(stub, dep, table_bytes)
        log(f"  swap: idle {idle_seconds:.2f} s, old table released {idle_release} s later")

        log(f"  swap: mixed load before ({window:.1f} s)")
        before = run_load(dep, _load_config(window, 0.5, light_clients, heavy_clients, timeout))
        # The window during the swap lasts as long as the idle swap took, and starts with it:
        # under load the swap takes longer, so the whole window falls inside it.
        during_window = max(0.5, idle_seconds)
        outcome: dict = {}
        loader = threading.Thread(
            target=lambda: outcome.update(
                during=run_load(dep, _load_config(during_window, 0.5, light_clients, heavy_clients, timeout))
            )
        )
        log(f"  swap: under the same load ({during_window:.2f} s window)")
        loader.start()
        time.sleep(0.5)  # the load generator's warmup: its window opens as the swap starts
        with PssSampler(dep) as loaded_pss:
            loaded_seconds, loaded_reply = _swap(stub, path)
            loaded_release = _released(stub, dep, table_bytes)
        loader.join(during_window + 120)
        after = memory.measure(dep.processes())["total_pss"]
        during = outcome.get("during")
        if during is None:
            raise RuntimeError("the load during the swap did not finish")
        summary = {"before": _classes(before), "during": _classes(during)}
        return {
            "label": dep.label, "table_rows": table.rows, "table_dim": table.dim, "table_bytes": table_bytes,
            "generations": [first.generation, idle_reply.table.generation, loaded_reply.table.generation],
            "idle": {"swap_seconds": idle_seconds, "release_seconds": idle_release, "peak_pss": idle_pss.peak},
            "loaded": {"swap_seconds": loaded_seconds, "release_seconds": loaded_release, "peak_pss": loaded_pss.peak,
                       "window_seconds": during_window},
            "pss_before": baseline, "pss_after": after,
            "load": summary, "load_config": {"light_clients": light_clients, "heavy_clients": heavy_clients},
            "reps": {"before": before, "during": during},
        }
    finally:
        dep.stop()
        shutil.rmtree(sources, ignore_errors=True)


def _classes(result: dict) -> dict:
    """Per class: p50/p99 (ms), answered, failed (errors + timeouts + non-2xx)."""
    out = {}
    for name, c in result["classes"].items():
        out[name] = {
            "p50_ms": c["latency_ms"]["p50"], "p99_ms": c["latency_ms"]["p99"], "ok": c["ok"],
            "failed": c["errors"] + c["timeouts"] + c["other_status"] + c["rejected_429"],
            "throughput": c["throughput"],
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.swap", description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2**30 // (128 * 4), help="table rows (default: 1 GiB at dim 128)")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--window", type=float, default=3.0, help="seconds of load measured before the swap")
    args = parser.parse_args(argv)
    logdir = Path(tempfile.mkdtemp(prefix="offload-bench-swap-"))
    result = measure(Table(args.rows, args.dim), 2, 2, logdir, window=args.window)
    result.pop("reps")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
