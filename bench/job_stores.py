"""`python -m bench.job_stores`: job throughput on the SQLite store vs the PostgreSQL store.

The same compute (small table, so the store is what is measured, not the scan) runs N small
jobs submitted at once (each one item, one chunk), once per backend, in one run: jobs/s from
the first submit to the last SUCCEEDED, and the submit latency. PostgreSQL is a throwaway
local server (tests/postgres.py: initdb in a temp directory, fsync off as in the tests), so
the figure compares the stores' own costs, not a production database's disks. `make bench`
runs it too (the "Job stores" section of the report).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

from bench.designs import Table, offload


async def _run_jobs(target: str, count: int, timeout: float) -> dict:
    import grpc

    from offload.v1 import compute_pb2_grpc, jobs_pb2

    async with grpc.aio.insecure_channel(target) as channel:
        stub = compute_pb2_grpc.ComputeServiceStub(channel)
        started = time.perf_counter()
        submit_latency = []

        async def submit(i: int) -> str:
            t = time.perf_counter()
            spec = jobs_pb2.BatchSearchSpec(k=3, item_ids=[f"item-{i % 1000}"])
            job = await stub.SubmitJob(jobs_pb2.SubmitJobRequest(batch_search=spec), timeout=timeout)
            submit_latency.append(time.perf_counter() - t)
            return job.id

        ids = await asyncio.gather(*(submit(i) for i in range(count)))
        pending = set(ids)
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            page = await stub.ListJobs(jobs_pb2.ListJobsRequest(state=jobs_pb2.SUCCEEDED, page_size=500), timeout=timeout)
            pending -= {job.id for job in page.jobs}
            if pending:
                await asyncio.sleep(0.02)
        elapsed = time.perf_counter() - started
        if pending:
            raise RuntimeError(f"{len(pending)} of {count} jobs unfinished after {timeout:g} s")
        submit_latency.sort()
        return {
            "jobs": count,
            "jobs_per_s": count / elapsed,
            "submit_p50_ms": 1000 * submit_latency[len(submit_latency) // 2],
            "submit_p99_ms": 1000 * submit_latency[min(len(submit_latency) - 1, int(len(submit_latency) * 0.99))],
        }


def measure(logdir: Path, jobs: int = 200, log=print) -> dict:
    from tests.postgres import PostgresServer

    out: dict = {"jobs": jobs}
    server = PostgresServer()
    try:
        url = server.start()
        backends = {"sqlite": {}, "postgres": {"OFFLOAD_COMPUTE_JOBS_DATABASE_URL": url}}
        for name, env in backends.items():
            deployment = offload(Table(2000, 16), 1, 2, logdir, compute_env={"OFFLOAD_COMPUTE_JOBS_CONCURRENCY": "4", **env},
                                 variant=f"jobs on {name}")
            compute = deployment.groups["compute"]
            compute.start()
            try:
                compute.wait_ready(120)
                out[name] = asyncio.run(_run_jobs(deployment.grpc_target, jobs, 120.0))
                log(f"  job stores: {name}: {out[name]['jobs_per_s']:.0f} jobs/s, submit p50 "
                    f"{out[name]['submit_p50_ms']:.1f} ms")
            finally:
                compute.stop()
                deployment.stop()
    finally:
        server.stop()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.job_stores", description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="offload-job-stores-") as logdir:
        print(json.dumps(measure(Path(logdir), args.jobs), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
