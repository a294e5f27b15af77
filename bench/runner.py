"""Running the load generator against a deployment, with server CPU sampled over the same window."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from typing import Any

from bench.designs import Deployment
from bench.procs import ROOT, base_env, cpu_delta, cpu_seconds

LIGHT = {"name": "light", "kind": "get_item"}
HEAVY = {"name": "heavy", "kind": "search"}


def loadgen_command(config: dict) -> list[str]:
    return [sys.executable, "-m", "bench.loadgen", json.dumps(config, separators=(",", ":"))]


PROTOCOLS = ("http", "grpc", "grpc-batched")  # grpc*: straight to compute (offload deployments only)


def run_load(deployment: Deployment, config: dict, *, protocol: str = "http") -> dict:
    """One load generator process; returns its RESULT plus server CPU per process group.

    protocol: "http" (the deployment's HTTP port), "grpc" (compute, plain unary calls) or
    "grpc-batched" (compute, through offload.client.ComputeChannel)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}")
    config = dict(config)
    config.setdefault("rows", deployment.table.rows)
    config.setdefault("dim", deployment.table.dim)
    config.setdefault("host", "127.0.0.1")
    config.setdefault("port", deployment.port)
    config["protocol"] = protocol
    if protocol != "http":
        if deployment.grpc_target is None:
            raise ValueError(f"{deployment.design} has no gRPC target")
        config["grpc_target"] = deployment.grpc_target
    bound = float(config.get("warmup", 0.5)) + float(config["duration"]) + float(config.get("drain", 2.0)) + 30.0
    before = after = None
    result = None
    proc = subprocess.Popen(
        loadgen_command(config), cwd=ROOT, env=base_env({}), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("EVENT start"):
                before = cpu_seconds(deployment.groups)
            elif line.startswith("EVENT end"):
                after = cpu_seconds(deployment.groups)
            elif line.startswith("RESULT "):
                result = json.loads(line[7:])
        proc.wait(bound)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if result is None:
        stderr = proc.stderr.read() if proc.stderr else ""
        raise RuntimeError(f"load generator failed ({proc.returncode}): {stderr[-2000:]}")
    if proc.stderr:
        proc.stderr.close()
    server_cpu = cpu_delta(before, after) if before and after else {}
    ok_total = sum(c["ok"] + c["rejected_429"] + c["other_status"] for c in result["classes"].values())
    result["server_cpu_seconds"] = server_cpu
    result["server_cpu_percent"] = {g: 100.0 * s / result["duration"] for g, s in server_cpu.items()}
    result["cpu_us_per_request"] = {
        **{g: (1e6 * s / ok_total if ok_total else None) for g, s in server_cpu.items()},
        "loadgen": 1e6 * result["client_cpu_seconds"] / ok_total if ok_total else None,
    }
    result["answered"] = ok_total
    result["command"] = " ".join(loadgen_command(config)[:3]) + " '<config>'"
    return result


def repeat(deployment: Deployment, config: dict, reps: int, *, protocol: str = "http") -> list[dict]:
    return [run_load(deployment, config, protocol=protocol) for _ in range(reps)]


# -- summaries over repetitions -----------------------------------------------------------------


def spread(values: list[float | None]) -> dict[str, float | None]:
    """min/median/max of repetitions (None values, e.g. no samples, are skipped)."""
    present = [v for v in values if v is not None]
    if not present:
        return {"min": None, "median": None, "max": None, "n": 0}
    return {"min": min(present), "median": statistics.median(present), "max": max(present), "n": len(present)}


def pick(result: dict, path: str) -> Any:
    value: Any = result
    for part in path.split("."):
        if value is None:
            return None
        value = value.get(part) if isinstance(value, dict) else None
    return value


def summarise(reps: list[dict], paths: list[str]) -> dict[str, dict]:
    return {path: spread([pick(r, path) for r in reps]) for path in paths}


CLASS_METRICS = [
    "throughput", "ok", "sent", "errors", "timeouts", "unfinished", "rejected_429", "other_status",
    "latency_ms.p50", "latency_ms.p99", "latency_ms.max", "reject_latency_ms.p50", "reject_latency_ms.p99",
    "reject_latency_ms.max",
]


def summarise_classes(reps: list[dict]) -> dict[str, dict]:
    names = reps[0]["classes"].keys() if reps else []
    out = {}
    for name in names:
        out[name] = summarise([r["classes"][name] for r in reps], CLASS_METRICS)
    out["_cpu"] = summarise(
        reps,
        ["client_cpu_percent"]
        + [f"cpu_us_per_request.{g}" for g in reps[0]["cpu_us_per_request"]]
        + [f"server_cpu_percent.{g}" for g in reps[0]["server_cpu_percent"]],
    ) if reps else {}
    return out
