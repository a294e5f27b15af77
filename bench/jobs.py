"""`python -m bench.jobs '<config json>'`: the jobs scenario, in its own process (like the load generator).

Direct gRPC to compute (offload design only):

1. Batch throughput: N random queries (k) as one SubmitJob polled with GetJob every `poll`
   seconds until SUCCEEDED, vs the same N queries as Search calls with `concurrency` in flight.
2. Fairness: sequential Search latency with no job running, then while a big batch job
   (`fairness_factor` x N queries, split into several jobs if one would exceed the gRPC message
   cap) runs; whatever of it is left when the window ends is cancelled.

Every wait is bounded (`timeout` per call, `job_timeout` per job); jobs still unfinished at the
end are cancelled (they are ours). Prints `RESULT <json>` on stdout.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid

import numpy as np

MESSAGE_CAP = 3 * 2**20  # per SubmitJob, below compute's 4 MiB default max_message_bytes


def _percentiles(latencies_s: list[float]) -> dict:
    if not latencies_s:
        return {"p50": None, "p99": None, "max": None, "n": 0}
    ms = np.asarray(latencies_s) * 1000
    return {"p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99)), "max": float(ms.max()), "n": len(ms)}


async def measure(config: dict) -> dict:
    import grpc

    from offload.v1 import compute_pb2_grpc, jobs_pb2, search_pb2

    n, k, dim = int(config["queries"]), int(config.get("k", 10)), int(config["dim"])
    concurrency = max(1, int(config["concurrency"]))
    timeout = float(config.get("timeout", 10.0))
    job_timeout = float(config.get("job_timeout", 120.0))
    poll = float(config.get("poll", 0.02))
    window = float(config.get("fairness_seconds", 2.0))
    factor = int(config.get("fairness_factor", 4))
    run_id = uuid.uuid4().hex[:12]
    terminal = {jobs_pb2.SUCCEEDED, jobs_pb2.FAILED, jobs_pb2.CANCELLED}
    rng = np.random.default_rng(int(config.get("seed", 7)))
    queries = rng.standard_normal((n, dim), dtype=np.float32).tolist()
    per_job = max(1, MESSAGE_CAP // (4 * dim + 8))
    opts = [("grpc.max_send_message_length", 8 * 2**20), ("grpc.max_receive_message_length", 8 * 2**20)]
    submitted: list[str] = []
    finished: set[str] = set()

    async with grpc.aio.insecure_channel(config["grpc_target"], options=opts) as channel:
        stub = compute_pb2_grpc.ComputeServiceStub(channel)
        search_requests = [search_pb2.SearchRequest(vector=q, k=k) for q in queries]

        async def submit(key: str, vectors: list[list[float]]) -> str:
            spec = jobs_pb2.BatchSearchSpec(k=k, vectors=[jobs_pb2.Vector(values=v) for v in vectors])
            job = await stub.SubmitJob(jobs_pb2.SubmitJobRequest(idempotency_key=key, batch_search=spec), timeout=timeout)
            submitted.append(job.id)
            return job.id

        async def get(job_id: str):
            job = await stub.GetJob(jobs_pb2.GetJobRequest(id=job_id, result_limit=1), timeout=timeout)
            if job.state in terminal:
                finished.add(job_id)
            return job

        async def wait_done(job_id: str, deadline: float):
            while True:
                job = await get(job_id)
                if job.state in terminal:
                    return job
                if time.monotonic() > deadline:
                    raise TimeoutError(f"job {job_id} not finished after {job_timeout:.0f} s (state {job.state})")
                await asyncio.sleep(poll)

        async def search_once(request) -> float:
            started = time.perf_counter()
            await stub.Search(request, timeout=timeout)
            return time.perf_counter() - started

        try:
            for request in search_requests[: min(4, n)]:  # warm the channel and the pool
                await search_once(request)

            # -- 1. batch throughput ------------------------------------------------------------
            reps = []
            for rep in range(int(config.get("reps", 1))):
                started = time.perf_counter()
                job_ids = [await submit(f"bench-{run_id}-tp{rep}-{i}", queries[i : i + per_job]) for i in range(0, n, per_job)]
                deadline = time.monotonic() + job_timeout
                jobs = [await wait_done(job_id, deadline) for job_id in job_ids]
                job_seconds = time.perf_counter() - started
                bad = [j for j in jobs if j.state != jobs_pb2.SUCCEEDED]
                if bad:
                    raise RuntimeError(f"job {bad[0].id} ended {jobs_pb2.JobState.Name(bad[0].state)}: {bad[0].error.message}")
                results = sum(j.result_count for j in jobs)
                if results != n:
                    raise RuntimeError(f"jobs returned {results} results for {n} queries")

                next_index = 0
                errors = 0

                async def worker() -> None:
                    nonlocal next_index, errors
                    while next_index < n:
                        request = search_requests[next_index]
                        next_index += 1
                        try:
                            await search_once(request)
                        except grpc.aio.AioRpcError:
                            errors += 1

                started = time.perf_counter()
                await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(concurrency))), job_timeout)
                direct_seconds = time.perf_counter() - started
                job_qps, direct_qps = n / job_seconds, n / direct_seconds
                reps.append({
                    "job_seconds": job_seconds, "job_qps": job_qps, "jobs_submitted": len(job_ids),
                    "direct_seconds": direct_seconds, "direct_qps": direct_qps, "direct_errors": errors,
                    "ratio": job_qps / direct_qps,
                })

            # -- 2. fairness --------------------------------------------------------------------
            async def sequential(until: float, busy=None) -> list[float]:
                out, i = [], 0
                while time.monotonic() < until and (busy is None or busy()):
                    latency = await search_once(search_requests[i % n])
                    if busy is None or busy():
                        out.append(latency)
                    i += 1
                return out

            idle = await sequential(time.monotonic() + window)
            big = [queries[i % n] for i in range(factor * n)]
            big_ids = [await submit(f"bench-{run_id}-big-{i}", big[i : i + per_job]) for i in range(0, len(big), per_job)]
            states: dict[str, int] = {}

            async def watch() -> None:
                while len(finished & set(big_ids)) < len(big_ids):
                    for job_id in big_ids:
                        if job_id not in finished:
                            states[job_id] = (await get(job_id)).state
                    await asyncio.sleep(poll)

            watcher = asyncio.create_task(watch())
            job_started = time.perf_counter()
            try:
                busy_samples = await sequential(time.monotonic() + window, busy=lambda: not watcher.done())
            finally:
                watcher.cancel()
            if watcher.done() and not watcher.cancelled() and watcher.exception():
                raise watcher.exception()
            big_seconds = time.perf_counter() - job_started
            unfinished = [job_id for job_id in big_ids if job_id not in finished]
            for job_id in unfinished:  # the window is over: cancel the rest of our big job
                await stub.CancelJob(jobs_pb2.CancelJobRequest(id=job_id), timeout=timeout)
            deadline = time.monotonic() + job_timeout
            for job_id in big_ids:
                states[job_id] = (await wait_done(job_id, deadline)).state
            fairness = {
                "big_job_queries": len(big), "jobs_submitted": len(big_ids), "window_seconds": window,
                "big_job_seconds": big_seconds if not unfinished else None, "big_job_cancelled_after_window": bool(unfinished),
                "big_job_states": sorted({jobs_pb2.JobState.Name(s) for s in states.values()}),
                "idle_ms": _percentiles(idle), "busy_ms": _percentiles(busy_samples),
            }
            for q in ("p50", "p99"):
                a, b = fairness["busy_ms"][q], fairness["idle_ms"][q]
                fairness[f"{q}_ratio"] = a / b if a is not None and b else None
        finally:
            for job_id in submitted:  # ours: never leave a job running behind us
                if job_id not in finished:
                    try:
                        await stub.CancelJob(jobs_pb2.CancelJobRequest(id=job_id), timeout=timeout)
                    except grpc.aio.AioRpcError:
                        pass

    return {"queries": n, "k": k, "concurrency": concurrency, "queries_per_job_max": per_job, "reps": reps, "fairness": fairness}


def main(argv: list[str]) -> int:
    config = json.loads(argv[0])
    result = asyncio.run(measure(config))
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
