"""One copy of the table: pool workers map the owner's pages, they never copy them.

Measured from /proc/PID/smaps_rollup: USS = Private_Clean + Private_Dirty (what the process
alone pays), PSS (shared pages divided among the processes mapping them: their sum is the
real total).
"""

from __future__ import annotations

import concurrent.futures
from pathlib import Path

import numpy as np
import psutil

from offload.v1 import compute_pb2, compute_pb2_grpc, search_pb2
from tests.conftest import wait_until

MB = 1024 * 1024
# Interpreter + numpy (+ grpc in compute) per process, none of it the table.
ALLOWANCE_PER_PROCESS = 40 * MB


def smaps(pid: int) -> dict[str, int]:
    """smaps_rollup fields in bytes."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, value, *_ = line.split()
        fields[name.rstrip(":")] = int(value) * 1024
    fields["USS"] = fields["Private_Clean"] + fields["Private_Dirty"]
    return fields


def test_workers_share_the_table_instead_of_copying_it(compute_factory):
    rows, dim = 409_600, 128  # 200 MiB of vectors
    compute = compute_factory(rows=rows, dim=dim, pool_size=2, max_inflight=8)
    table_bytes = compute_pb2_grpc.ComputeServiceStub(compute.channel()).GetStats(
        compute_pb2.GetStatsRequest(), timeout=5
    ).cache.bytes
    assert table_bytes >= rows * dim * 4

    # Searches touch every page of the table; run enough of them that both workers scan.
    stub = compute_pb2_grpc.ComputeServiceStub(compute.channel())
    rng = np.random.default_rng(3)
    workers = compute.worker_pids()
    assert len(workers) == 2

    def search(_):
        query = rng.standard_normal(dim).tolist()
        return stub.Search(search_pb2.SearchRequest(vector=query, k=10), timeout=30)

    def both_scanned() -> bool:
        with concurrent.futures.ThreadPoolExecutor(4) as threads:
            assert all(len(reply.hits) == 10 for reply in threads.map(search, range(4)))
        return all(smaps(pid)["Rss"] > 0.9 * table_bytes for pid in workers)

    wait_until(both_scanned, 60, 0, "both workers to have scanned the whole table")

    processes = [psutil.Process(compute.pid), *psutil.Process(compute.pid).children(recursive=True)]
    figures = {}
    for process in processes:
        role = "worker" if process.pid in workers else ("compute" if process.pid == compute.pid else "helper")
        figures[process.pid] = (role, smaps(process.pid))
    ready = next(r for r in compute.log_records() if r.get("msg") == "compute ready")
    total_pss = sum(f["Pss"] for _, f in figures.values())
    print(f"\n[figure] table {table_bytes / MB:.1f} MiB ({rows} x {dim}), start-up {ready['startup_seconds']:.2f} s")
    for pid, (role, f) in figures.items():
        print(
            f"[figure]   {role:8} pid {pid}: RSS {f['Rss'] / MB:6.1f} MiB  PSS {f['Pss'] / MB:6.1f} MiB  "
            f"USS {f['USS'] / MB:6.1f} MiB"
        )
    print(f"[figure]   total PSS {total_pss / MB:.1f} MiB = {total_pss / table_bytes:.2f}x the table")

    for pid in workers:
        assert figures[pid][1]["USS"] < 0.25 * table_bytes, f"worker {pid} holds a private copy: {figures[pid]}"
    assert total_pss < 1.3 * table_bytes + ALLOWANCE_PER_PROCESS * len(processes), figures
