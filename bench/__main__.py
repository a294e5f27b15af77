"""`python -m bench [--quick | --smoke] [--out DIR]`: offload vs the naive designs, one run.

Order (one design up at a time, never more RAM than needed): calibration in-process, offload,
offload with the pool's batching off, naive-inline, naive-executor, a FastAPI hello-world,
then the memory sweep. Everything started
here is stopped here, by pid and process group, even on errors or Ctrl-C.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
import traceback
from pathlib import Path

from bench.procs import BLAS_ENV

os.environ.update(BLAS_ENV)  # before numpy: the in-process reference scans single-threaded too

from bench import designs, job_stores, report, scenarios, streams, swap  # noqa: E402
from bench.designs import Table  # noqa: E402
from bench.otlp_sink import OtlpSink  # noqa: E402
from bench.scenarios import Bench, Profile  # noqa: E402

GIB_ROWS_128 = 2**30 // (128 * 4)  # rows of a 1 GiB float32 table at dim 128


def profiles() -> dict[str, Profile]:
    return {
        "smoke": Profile(
            name="smoke", load_table=Table(20_000, 32), reps=1, warmup=0.2, duration=0.6, drain=0.5, timeout=3.0,
            concurrency=[1], concurrency_duration=0.6, inproc_queries=10, start_timeout=60.0,
            jobs_queries=64, jobs_fairness_seconds=0.5, search_clients=4,
            hop_levels=[1, 4], hop_warmup=0.1, hop_duration=0.4, open_rate=200.0,
            stream_messages=500, stream_reps=1, store_jobs=20, swap_table=Table(20_000, 32), swap_window=0.5,
        ),
        "quick": Profile(
            name="quick", load_table=Table(524_288, 128), reps=2, warmup=0.3, duration=1.2, drain=1.5, timeout=5.0,
            concurrency=[1, 2, 8, 16], concurrency_duration=1.0, inproc_queries=20,
            memory_table=Table(524_288, 128),
            memory_sweep=[("offload", 4, 2), ("naive-inline", 4, 0)],
            jobs_queries=512, jobs_fairness_seconds=1.5,
            hop_levels=[1, 64], hop_warmup=0.3, hop_duration=1.2, open_rate=400.0,
            swap_table=Table(524_288, 128), swap_window=2.0,
        ),
        "full": Profile(
            name="full", load_table=Table(1_048_576, 128), reps=3, warmup=0.5, duration=4.0, drain=3.0, timeout=10.0,
            concurrency=[1, 2, 4, 8, 16, 32], concurrency_duration=3.0, inproc_queries=50,
            memory_table=Table(GIB_ROWS_128, 128),
            memory_sweep=[
                ("offload", 1, 1), ("offload", 2, 1), ("offload", 4, 1),
                ("offload", 1, 2), ("offload", 2, 2), ("offload", 4, 2),
                ("naive-inline", 1, 0), ("naive-inline", 2, 0), ("naive-inline", 4, 0),
                ("naive-executor", 1, 1), ("naive-executor", 1, 2), ("naive-executor", 2, 1),
                ("naive-executor", 2, 2), ("naive-executor", 4, 1), ("naive-executor", 4, 2),
            ],
            max_private_copies=6, jobs_queries=512, jobs_reps=2, jobs_fairness_seconds=3.0,
            hop_levels=[1, 64], hop_warmup=0.5, hop_duration=2.0, open_rate=400.0,
            swap_table=Table(GIB_ROWS_128, 128), swap_window=3.0,
        ),
    }


def jobs_available() -> str | None:
    """None when compute has jobs to measure, else why the scenario is skipped."""
    if not (Path(__file__).resolve().parents[1] / "compute" / "jobs").is_dir():
        return "compute/jobs/ does not exist yet (jobs issue not landed): scenario skipped"
    return None


def run(profile: Profile, out: Path, argv: list[str]) -> dict:
    logdir = out / "logs"
    logdir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    results: dict = {"meta": report.machine(), "profile": report.profile_dict(profile), "errors": []}
    results["plan"] = scenarios.plan(profile)
    results["meta"]["command"] = " ".join(["python -m bench", *argv])
    results["designs"] = {}

    def log(message: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {message}", flush=True)

    bench = Bench(profile, logdir, results, log)
    log(f"profile {profile.name}: table {profile.load_table.rows} x {profile.load_table.dim}; out {out}; "
        f"{results['plan']['total']['runs']} load runs, {results['plan']['total']['window_seconds']:.0f} s of windows "
        f"(bound {results['plan']['total']['bound_seconds']:.0f} s)")
    calibration = scenarios.calibrate(bench)
    log(f"in-process Search p50 {calibration['inproc_search_ms']['p50']:.2f} ms; "
        f"memory read {calibration['memory_read_gb_per_s']['median']:.1f} GB/s")

    table = profile.load_table
    plans = [
        ("offload", lambda: designs.offload(table, profile.workers, profile.pool_size, logdir)),
        ("offload-batching-off", lambda: designs.offload(
            table, profile.workers, profile.pool_size, logdir, compute_env={"OFFLOAD_COMPUTE_POOL_MAX_BATCH": "1"},
            variant="batching off")),
        ("naive-inline", lambda: designs.naive("inline", table, profile.workers, 0, logdir)),
        ("naive-executor", lambda: designs.naive("executor", table, profile.workers, profile.executor_pool, logdir)),
        ("offload-tracing", lambda: designs.offload(
            table, profile.workers, profile.pool_size, logdir, compute_env=tracing_env, gateway_env=tracing_env,
            variant="tracing on")),
        ("fastapi-hello", lambda: designs.hello(profile.workers, logdir)),
    ]
    # Tracing on (every span exported over OTLP/HTTP to a sink in this process): its cost on the hop.
    sink = OtlpSink().start()
    tracing_env = {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": sink.endpoint}
    for name, make in plans:
        dep = make()
        log(f"starting {dep.label}")
        try:
            dep.start(profile.start_timeout)
            results["designs"][name] = {
                "label": dep.label, "workers": dep.workers, "pool_size": dep.pool_size,
                "startup_seconds": dep.startup_seconds, "commands": dep.commands(),
            }
            if name == "fastapi-hello":
                scenarios.hop(bench, dep, "hello")
                continue
            if name == "offload-tracing":
                scenarios.hop(bench, dep, "forwarded-traced")
                results["tracing_exports"] = sink.exports
                continue
            if name == "offload-batching-off":
                # The same offload with the pool's dynamic batching off: the before/after of issue 11.
                scenarios.search_concurrency(bench, dep, grpc=True, levels=[1, profile.search_clients])
                scenarios.light_during_searches(bench, dep)
                continue
            if name == "offload":
                scenarios.hop(bench, dep, "forwarded")
                scenarios.hop(bench, dep, "direct-plain")
                scenarios.hop(bench, dep, "direct-batched")
                scenarios.search_concurrency(bench, dep, grpc=True)
                scenarios.light_during_searches(bench, dep)
            elif name == "naive-inline":
                scenarios.hop(bench, dep, "inline")
            scenarios.search_concurrency(bench, dep)
            scenarios.mixed(bench, dep)
            scenarios.standard_memory(bench, dep)
            if name == "offload":
                skipped = jobs_available()
                if skipped:
                    results["jobs"] = {"skipped": skipped}
                else:
                    scenarios.jobs(bench, dep)
            scenarios.overload(bench, dep)  # last: the baselines are left with a backlog
        except Exception as exc:  # keep going: one broken design must not hide the others
            log(f"ERROR in {name}: {exc}")
            results["errors"].append({"design": name, "error": str(exc), "traceback": traceback.format_exc()[-4000:]})
        finally:
            dep.stop()
    sink.stop()
    try:
        log("streams: server-streaming messages/s through one gateway worker")
        results["streams"] = streams.measure(logdir, profile.stream_messages, profile.stream_reps, log)
    except Exception as exc:
        log(f"ERROR in streams: {exc}")
        results["errors"].append({"design": "streams", "error": str(exc), "traceback": traceback.format_exc()[-4000:]})
    try:
        log("job stores: small jobs/s on SQLite vs PostgreSQL")
        results["job_stores"] = job_stores.measure(logdir, profile.store_jobs, log)
    except Exception as exc:
        log(f"ERROR in job stores: {exc}")
        results["errors"].append({"design": "job-stores", "error": str(exc), "traceback": traceback.format_exc()[-4000:]})
    try:
        log(f"table swap: LoadTable of a {profile.swap_table.rows} x {profile.swap_table.dim} table while serving")
        results["swap"] = swap.measure(profile.swap_table, profile.workers, profile.pool_size, logdir, log,
                                       window=profile.swap_window)
    except Exception as exc:
        log(f"ERROR in table swap: {exc}")
        results["errors"].append({"design": "table-swap", "error": str(exc), "traceback": traceback.format_exc()[-4000:]})
    try:
        scenarios.memory_sweep(bench)
    except Exception as exc:
        log(f"ERROR in memory sweep: {exc}")
        results["errors"].append({"design": "memory-sweep", "error": str(exc), "traceback": traceback.format_exc()[-4000:]})
    results.setdefault("jobs", {"skipped": "offload design did not run: see errors"})
    results["wall_seconds"] = round(time.monotonic() - started, 1)
    results["targets"] = report.targets(results)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    charts = report.charts(results, out)
    (out / "report.md").write_text(report.markdown(results, charts))
    log(f"done in {results['wall_seconds']} s: {out / 'report.md'}")
    return results


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small table, short runs (~2 min)")
    size.add_argument("--smoke", action="store_true", help="tiny table, a few seconds per design (tests)")
    parser.add_argument("--out", type=Path, help="results directory (default bench/results/<UTC timestamp>)")
    args = parser.parse_args(argv)
    name = "smoke" if args.smoke else "quick" if args.quick else "full"
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = args.out or Path(__file__).resolve().parent / "results" / stamp
    out.mkdir(parents=True, exist_ok=True)
    results = run(profiles()[name], out, argv)
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
