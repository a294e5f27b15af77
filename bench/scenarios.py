"""The scenarios of issue 5, each a function over a running deployment that fills `results`."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bench import designs, kernel, memory
from bench.designs import Deployment, Table
from bench.procs import ROOT, base_env
from bench.runner import HEAVY, LIGHT, repeat, spread, summarise_classes


@dataclass
class Profile:
    name: str
    load_table: Table
    workers: int = 2  # gateway / uvicorn workers of the standard configuration
    pool_size: int = 2  # offload's pool
    executor_pool: int = 1  # per uvicorn worker, naive-executor
    reps: int = 2
    warmup: float = 0.5
    duration: float = 2.0
    drain: float = 2.0
    timeout: float = 5.0
    connections: int = 100
    heavy_fraction: float = 0.05
    # Hop cost (GetItem, closed loop): each row at each of these concurrencies, short windows.
    hop_levels: list[int] = field(default_factory=lambda: [1, 64])
    hop_warmup: float = 0.3
    hop_duration: float = 1.5
    hop_drain: float = 1.0  # closed loop: only a bound on the calls still in flight at the end
    # Mixed open loop: offered req/s (all classes). None: derived from the calibration (Search
    # work ~half a core, 50..400 req/s) -- which makes the rate depend on the table size.
    open_rate: float | None = None
    concurrency: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    concurrency_duration: float = 1.5
    search_clients: int = 16  # the concurrency of issue 11's throughput target (and of the light-latency check)
    inproc_queries: int = 30
    memory_table: Table | None = None
    memory_sweep: list[tuple[str, int, int]] = field(default_factory=list)  # (design, workers, pool)
    max_private_copies: int = 6
    start_timeout: float = 180.0
    jobs_queries: int = 512  # batch throughput: N queries per job (and as direct Search calls)
    jobs_reps: int | None = None  # repetitions of the batch throughput measure (None: reps)
    jobs_fairness_seconds: float = 2.0  # each Search latency window of the fairness check
    jobs_fairness_factor: int = 4  # the big job of the fairness check: factor x N queries
    stream_messages: int = 20_000  # server-streaming messages/s through one gateway worker (bench/streams.py)
    stream_reps: int = 3
    store_jobs: int = 200  # small jobs submitted at once, per job store backend (bench/job_stores.py)
    swap_table: Table = field(default_factory=lambda: Table(2**30 // (128 * 4), 128))  # swapped by LoadTable (bench/swap.py)
    swap_window: float = 3.0  # seconds of load measured before the swap


@dataclass
class Bench:
    profile: Profile
    logdir: Path
    results: dict
    log: callable = print

    def base(self, **overrides) -> dict:
        config = {
            "warmup": self.profile.warmup,
            "duration": self.profile.duration,
            "drain": self.profile.drain,
            "timeout": self.profile.timeout,
            "seed": 7,
        }
        config.update(overrides)
        return config


# -- calibration in-process ---------------------------------------------------------------------


def calibrate(bench: Bench) -> dict:
    """In-process numpy Search on the same table (the 1.0x reference), the machine's Search
    limit (bench/kernel.py) and the kernel's rate per block size, and memory bandwidth."""
    from compute.search import top_k
    from compute.table import normalised_query, synthetic_arrays

    table = bench.profile.load_table
    vectors, ids = synthetic_arrays(table.rows, table.dim, table.seed)
    rng = np.random.default_rng(7)
    queries = rng.standard_normal((bench.profile.inproc_queries, table.dim), dtype=np.float32).tolist()
    top_k(vectors, ids, normalised_query(queries[0], table.dim), 10)  # warm
    times = []
    for query in queries:
        started = time.perf_counter()
        top_k(vectors, ids, normalised_query(query, table.dim), 10)
        times.append(time.perf_counter() - started)
    search_limit = kernel.limit(vectors, bench.profile.pool_size)
    kernel_rates = kernel.kernel_rates(vectors, ids)
    del vectors, ids
    gc.collect()
    latency = np.asarray(times) * 1000
    size = 512 * 2**20
    buffer = np.ones(size // 8)
    target = np.empty_like(buffer)
    read, copy = [], []
    for _ in range(3):
        started = time.perf_counter()
        buffer.sum()
        read.append(size / (time.perf_counter() - started) / 1e9)
        started = time.perf_counter()
        np.copyto(target, buffer)
        copy.append(2 * size / (time.perf_counter() - started) / 1e9)  # bytes read + written
    del buffer, target
    gc.collect()
    p50 = float(np.percentile(latency, 50))
    result = {
        "table_vector_bytes": table.vector_bytes,
        "queries": len(times),
        "inproc_search_ms": {"p50": p50, "p99": float(np.percentile(latency, 99)), "min": float(latency.min())},
        "inproc_scan_gb_per_s": table.vector_bytes / (p50 / 1000) / 1e9,
        "search_limit": search_limit,
        "kernel_rates": kernel_rates,
        "memory_read_gb_per_s": spread(read),
        "memory_copy_gb_per_s": spread(copy),
        "blas_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
    }
    bench.results["calibration"] = result
    return result


def open_rate(bench: Bench) -> float:
    """Offered rate of the open-loop mixed load: the profile's, else Search work ~half a core, 50..400 req/s."""
    if bench.profile.open_rate is not None:
        return float(bench.profile.open_rate)
    search_s = bench.results["calibration"]["inproc_search_ms"]["p50"] / 1000
    return float(min(400.0, max(50.0, 0.5 / (bench.profile.heavy_fraction * search_s))))


def overload_rates(bench: Bench) -> tuple[float, float]:
    """(heavy, light) offered rates: heavy at ~2x what all cores could scan, light at 100/s."""
    search_s = bench.results["calibration"]["inproc_search_ms"]["p50"] / 1000
    return float(min(1500.0, 2 * (os.cpu_count() or 1) / search_s)), 100.0


# -- scenarios on one deployment ----------------------------------------------------------------


def _store(bench: Bench, scenario: str, key: str, reps: list[dict], extra: dict | None = None) -> None:
    entry = {"reps": reps, "summary": summarise_classes(reps)}
    if extra:
        entry.update(extra)
    bench.results.setdefault(scenario, {})[key] = entry


def mixed(bench: Bench, dep: Deployment) -> None:
    p = bench.profile
    classes = [dict(LIGHT, weight=1 - p.heavy_fraction), dict(HEAVY, weight=p.heavy_fraction)]
    bench.log(f"  mixed closed-loop, {p.connections} connections")
    reps = repeat(dep, bench.base(mode="closed", connections=p.connections, classes=classes), p.reps)
    _store(bench, "mixed_closed", dep.design, reps, {"label": dep.label})
    rate = open_rate(bench)
    bench.log(f"  mixed open-loop, {rate:.0f} req/s offered")
    reps = repeat(dep, bench.base(mode="open", rate=rate, connections=p.connections, classes=classes), p.reps)
    _store(bench, "mixed_open", dep.design, reps, {"label": dep.label, "rate": rate})


def overload(bench: Bench, dep: Deployment) -> None:
    heavy_rate, light_rate = overload_rates(bench)
    total = heavy_rate + light_rate
    classes = [dict(LIGHT, weight=light_rate / total), dict(HEAVY, weight=heavy_rate / total)]
    bench.log(f"  overload: {heavy_rate:.0f} Search/s + {light_rate:.0f} GetItem/s offered")
    config = bench.base(mode="open", rate=total, connections=256, classes=classes)
    reps = repeat(dep, config, max(1, bench.profile.reps - 1))
    _store(bench, "overload", dep.design, reps, {"label": dep.label, "heavy_rate": heavy_rate, "light_rate": light_rate})


# The rows of the hop table: role -> (row name, request kind, protocol, the process trees on the
# request's path, whose CPU is the row's server CPU). Every row is a GetItem (or hello) round trip.
HOP_ROWS = {
    "forwarded": ("GetItem via gateway (HTTP, batched to compute)", "get_item", "http", ("gateway", "compute")),
    "forwarded-traced": ("GetItem via gateway, tracing on (OTLP/HTTP to a local sink)", "get_item", "http", ("gateway", "compute")),
    "direct-plain": ("GetItem direct gRPC (plain unary)", "get_item", "grpc", ("compute",)),
    "direct-batched": ("GetItem direct gRPC (coalescing client)", "get_item", "grpc-batched", ("compute",)),
    "inline": ("GetItem in-process FastAPI (naive-inline)", "get_item", "http", ("app",)),
    "hello": ("FastAPI hello-world (HTTP)", "hello", "http", ("app",)),
}


def hop(bench: Bench, dep: Deployment, role: str) -> None:
    """One row of the hop table: closed loop at each of `hop_levels` concurrent clients."""
    p = bench.profile
    name, kind, protocol, path_groups = HOP_ROWS[role]
    levels = {}
    for level in p.hop_levels:
        bench.log(f"  hop: {name}, c={level}")
        config = bench.base(
            mode="closed", connections=level, warmup=p.hop_warmup, duration=p.hop_duration, drain=p.hop_drain,
            classes=[{"name": "light", "kind": kind}],
        )
        reps = repeat(dep, config, p.reps, protocol=protocol)
        levels[str(level)] = {"reps": reps, "summary": summarise_classes(reps)}
    bench.results.setdefault("hop", {})[name] = {
        "role": role, "label": dep.label, "design": dep.design, "workers": dep.workers, "protocol": protocol,
        "path_groups": list(path_groups), "levels": levels,
    }


def search_concurrency(bench: Bench, dep: Deployment, grpc: bool = False, levels: list[int] | None = None) -> None:
    p = bench.profile
    key = dep.design + (f", {dep.variant}" if dep.variant else "") + (" (direct gRPC)" if grpc else "")
    levels = levels or sorted(set(p.concurrency) | ({p.search_clients} if grpc else set()))
    out = {}
    for level in levels:
        bench.log(f"  search: {key}, concurrency {level}")
        config = bench.base(
            mode="closed", connections=level, duration=p.concurrency_duration, classes=[{"name": "heavy", "kind": "search"}]
        )
        reps = repeat(dep, config, p.reps if level == 1 else 1, protocol="grpc" if grpc else "http")
        out[str(level)] = {"reps": reps, "summary": summarise_classes(reps)}
    bench.results.setdefault("search_concurrency", {})[key] = {"label": dep.label, "levels": out}


def light_during_searches(bench: Bench, dep: Deployment) -> None:
    """GetItem latency through the gateway (1 client, closed loop) alone, then while
    `search_clients` Search clients keep the pool saturated."""
    p = bench.profile
    key = dep.design + (f", {dep.variant}" if dep.variant else "")
    light = {"name": "light", "kind": "get_item", "connections": 1}
    heavy = {"name": "heavy", "kind": "search", "connections": p.search_clients}
    out = {}
    for name, classes in (("alone", [light]), ("searches", [light, heavy])):
        bench.log(f"  light latency: {key}, {name}")
        config = bench.base(mode="closed", duration=p.concurrency_duration, classes=classes)
        reps = repeat(dep, config, p.reps)
        out[name] = {"reps": reps, "summary": summarise_classes(reps)}
    bench.results.setdefault("light_during_searches", {})[key] = {"label": dep.label, "search_clients": p.search_clients, **out}


def jobs_reps(p: Profile) -> int:
    return p.reps if p.jobs_reps is None else p.jobs_reps


def jobs(bench: Bench, dep: Deployment) -> None:
    """Batch job vs direct Search throughput, and Search latency while a big job runs (own process)."""
    p = bench.profile
    config = {
        "grpc_target": dep.grpc_target, "dim": dep.table.dim, "queries": p.jobs_queries, "k": 10,
        "concurrency": max(1, dep.pool_size), "reps": jobs_reps(p), "timeout": max(p.timeout, 10.0),
        # Per wait (a job, the N direct calls): ~10x the single-core scan time of N queries, at least 2 min.
        "job_timeout": max(120.0, 10 * p.jobs_queries * bench.results["calibration"]["inproc_search_ms"]["p50"] / 1000),
        "poll": 0.02, "fairness_seconds": p.jobs_fairness_seconds, "fairness_factor": p.jobs_fairness_factor, "seed": 7,
    }
    bench.log(f"  jobs: {p.jobs_queries} queries x {jobs_reps(p)} reps, fairness {p.jobs_fairness_factor}x in {p.jobs_fairness_seconds} s windows")
    argv = [sys.executable, "-m", "bench.jobs", json.dumps(config, separators=(",", ":"))]
    # Bound: every rep (job + direct) and the big job each within job_timeout, plus the windows.
    bound = config["job_timeout"] * (2 * jobs_reps(p) + 1) + 2 * p.jobs_fairness_seconds + 60.0
    proc = subprocess.run(argv, cwd=ROOT, env=base_env({}), capture_output=True, text=True, timeout=bound)
    result = next((json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")), None)
    if proc.returncode != 0 or result is None:
        raise RuntimeError(f"jobs scenario failed ({proc.returncode}): {proc.stderr[-2000:]}")
    result.update(
        design=dep.design, label=dep.label, pool_size=dep.pool_size, command=" ".join(argv[:3]) + " '<config>'",
        config=config, summary={key: spread([r[key] for r in result["reps"]]) for key in ("job_qps", "direct_qps", "ratio")},
    )
    bench.results["jobs"] = result


def memory_snapshot(dep: Deployment) -> dict:
    measured = memory.measure(dep.processes())
    measured.update(
        design=dep.design,
        label=dep.label,
        workers=dep.workers,
        pool_size=dep.pool_size,
        table_bytes=dep.table.vector_bytes,
        shm_bytes=memory.shm_bytes(dep.shm_dir),
    )
    return measured


def standard_memory(bench: Bench, dep: Deployment) -> None:
    bench.results.setdefault("memory", {}).setdefault("standard", {})[dep.design] = memory_snapshot(dep)


# -- memory sweep ---------------------------------------------------------------------------------


def _touch(bench: Bench, dep: Deployment) -> None:
    """A short mixed load so every worker has served requests (and mapped what it uses)."""
    spread_over = max(2, dep.workers * max(1, dep.pool_size) * 2)
    config = bench.base(
        mode="closed", connections=spread_over, warmup=0.2, duration=1.0, drain=5.0, timeout=30.0,
        classes=[dict(LIGHT, weight=0.5), dict(HEAVY, weight=0.5)],
    )
    repeat(dep, config, 1)


def memory_sweep(bench: Bench) -> None:
    p = bench.profile
    if p.memory_table is None or not p.memory_sweep:
        return
    table = p.memory_table
    rows = bench.results.setdefault("memory", {}).setdefault("sweep", [])
    skipped = bench.results["memory"].setdefault("skipped", [])
    computes: dict[int, Deployment] = {}
    try:
        for design, workers, pool in p.memory_sweep:
            copies = workers * (1 + pool) if design == "naive-executor" else workers
            if design != "offload" and copies > p.max_private_copies:
                skipped.append(
                    {"design": design, "workers": workers, "pool_size": pool, "copies": copies,
                     "reason": f"{copies} private copies of {table.vector_bytes / 2**30:.2f} GiB exceed the cap of {p.max_private_copies}"}
                )
                continue
            bench.log(f"  memory: {design} workers={workers} pool={pool} table={table.vector_bytes / 2**20:.0f} MiB")
            if design == "offload":
                base = computes.get(pool)
                if base is None:
                    for old in computes.values():
                        old.stop()
                    computes.clear()
                    dep = designs.offload(table, workers, pool, bench.logdir).start(p.start_timeout)
                    computes[pool] = dep
                else:
                    dep = designs.offload(table, workers, pool, bench.logdir, compute=base.groups["compute"])
                    dep.start(p.start_timeout)
            else:
                base = None
                mode = design.removeprefix("naive-")
                dep = designs.naive(mode, table, workers, pool, bench.logdir).start(p.start_timeout)
            try:
                _touch(bench, dep)
                snapshot = memory_snapshot(dep)
                if base is not None:
                    snapshot = memory.measure({"gateway": dep.groups["gateway"].processes(), "compute": base.groups["compute"].processes()})
                    snapshot.update(design=design, label=dep.label, workers=workers, pool_size=pool,
                                    table_bytes=table.vector_bytes, shm_bytes=memory.shm_bytes(base.shm_dir))
                snapshot["startup_seconds"] = dep.startup_seconds
                rows.append(snapshot)
                bench.log(f"    total PSS {snapshot['total_pss'] / 2**20:.0f} MiB over {snapshot['processes']} processes")
            finally:
                if computes.get(pool) is not dep:
                    dep.stop()  # the base offload deployment (compute + first gateway) is stopped below
            if design == "offload" and computes.get(pool) is dep:
                # Keep compute, drop this first gateway so the next gateway sizes are measured alone.
                dep.services[-1].stop()
    finally:
        for dep in computes.values():
            dep.stop()


# -- the plan -------------------------------------------------------------------------------------


def plan(p: Profile) -> dict:
    """What the load runs of one `python -m bench` cost, from the profile alone (mirrors the order
    in bench/__main__.py): per scenario, the number of load generator runs, the sum of their
    measured-plus-warmup windows, and the sum of their bounds (warmup + duration + drain; a closed
    loop only spends its drain on requests still in flight at the end). Not counted: start-up of
    the designs, calibration, the jobs scenario, and ~1 s of interpreter start per run."""
    rows: dict[str, tuple[int, float, float]] = {}

    def add(scenario: str, runs: int, warmup: float, duration: float, drain: float) -> None:
        n, window, bound = rows.get(scenario, (0, 0.0, 0.0))
        rows[scenario] = (n + runs, window + runs * (warmup + duration), bound + runs * (warmup + duration + drain))

    designs_with_http = 3  # offload, naive-inline, naive-executor
    add("hop", len(HOP_ROWS) * len(p.hop_levels) * p.reps, p.hop_warmup, p.hop_duration, p.hop_drain)
    per_design = sum(p.reps if level == 1 else 1 for level in p.concurrency)
    grpc_levels = set(p.concurrency) | {p.search_clients}
    # REST for the three designs, direct gRPC for offload, and offload with batching off at c=1 and search_clients.
    search_runs = designs_with_http * per_design + sum(p.reps if level == 1 else 1 for level in grpc_levels) + p.reps + 1
    add("search_concurrency", search_runs, p.warmup, p.concurrency_duration, p.drain)
    add("light_during_searches", 2 * 2 * p.reps, p.warmup, p.concurrency_duration, p.drain)  # 2 offload variants x alone/loaded
    add("mixed_closed", designs_with_http * p.reps, p.warmup, p.duration, p.drain)
    add("mixed_open", designs_with_http * p.reps, p.warmup, p.duration, p.drain)
    add("overload", designs_with_http * max(1, p.reps - 1), p.warmup, p.duration, p.drain)
    swept = 0
    for design, workers, pool in p.memory_sweep if p.memory_table is not None else []:
        copies = workers * (1 + pool) if design == "naive-executor" else workers
        swept += design == "offload" or copies <= p.max_private_copies
    add("memory_sweep_touch", swept, 0.2, 1.0, 5.0)
    out = {k: {"runs": n, "window_seconds": round(w, 1), "bound_seconds": round(b, 1)} for k, (n, w, b) in rows.items()}
    out["total"] = {
        "runs": sum(r["runs"] for r in out.values()),
        "window_seconds": round(sum(r["window_seconds"] for r in out.values()), 1),
        "bound_seconds": round(sum(r["bound_seconds"] for r in out.values()), 1),
    }
    # The jobs scenario is not windowed: it lasts as long as its Search work (each repetition: N
    # queries as jobs, then as Search calls at pool-size concurrency) plus two fairness windows.
    out["jobs"] = {
        "reps": jobs_reps(p), "queries_per_rep": p.jobs_queries, "direct_search_calls": jobs_reps(p) * p.jobs_queries,
        "fairness_window_seconds": 2 * p.jobs_fairness_seconds,
    }
    return out
