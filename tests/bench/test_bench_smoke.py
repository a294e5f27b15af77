"""`python -m bench --smoke` runs end to end and writes a sane report (no timing assertions)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DESIGNS = ("offload", "naive-inline", "naive-executor")
HOP_ROLES = {"forwarded", "forwarded-traced", "direct-plain", "direct-batched", "inline", "hello"}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("bench-smoke")
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        # A guard against a hang, not a measure: ~50 s on a quiet machine, and CI on a loaded one
        # once took over 110 s (its 6 errors were this timeout, not a broken bench).
        timeout=300,
    )
    return out, proc


@pytest.mark.timeout(330)
def test_smoke_run_succeeds(smoke_run) -> None:
    out, proc = smoke_run
    assert proc.returncode == 0, f"bench failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    results = json.loads((out / "results.json").read_text())
    assert results["errors"] == []


def test_results_cover_every_design_and_scenario(smoke_run) -> None:
    out, _ = smoke_run
    results = json.loads((out / "results.json").read_text())
    for scenario in ("mixed_closed", "mixed_open", "overload"):
        assert set(DESIGNS) <= set(results[scenario]), scenario
        for design in DESIGNS:
            summary = results[scenario][design]["summary"]
            light = summary["light"]
            assert light["ok"]["median"] > 0, (scenario, design)
            assert light["latency_ms.p50"]["median"] > 0
            assert light["latency_ms.p50"]["median"] <= light["latency_ms.p99"]["median"] <= light["latency_ms.max"]["median"]
            assert results[scenario][design]["reps"][0]["client_cpu_seconds"] >= 0
    # No light request of offload failed in the mixed loads.
    for scenario in ("mixed_closed", "mixed_open"):
        light = results[scenario]["offload"]["summary"]["light"]
        assert light["errors"]["median"] == 0 and light["timeouts"]["median"] == 0
    assert results["calibration"]["inproc_search_ms"]["p50"] > 0
    assert results["calibration"]["memory_read_gb_per_s"]["median"] > 0


def test_hop_table_rows_and_levels(smoke_run) -> None:
    out, _ = smoke_run
    results = json.loads((out / "results.json").read_text())
    levels = [str(level) for level in results["profile"]["hop_levels"]]
    assert len(levels) == 2
    rows = {row["role"]: row for row in results["hop"].values()}
    assert set(rows) == HOP_ROLES  # the three offload rows, naive-inline and hello
    assert {rows[r]["protocol"] for r in ("forwarded", "direct-plain", "direct-batched")} == {"http", "grpc", "grpc-batched"}
    assert {rows[r]["design"] for r in ("forwarded", "direct-plain", "direct-batched")} == {"offload"}
    assert rows["inline"]["design"] == "naive-inline" and rows["hello"]["design"] == "fastapi-hello"
    for role, row in rows.items():
        assert sorted(row["levels"], key=int) == levels, role
        for level in levels:
            entry = row["levels"][level]
            assert len(entry["reps"]) == results["profile"]["reps"]
            light = entry["summary"]["light"]
            assert light["ok"]["median"] > 0 and light["errors"]["median"] == 0, (role, level)
            assert entry["reps"][0]["config"]["connections"] == int(level)
            for group in row["path_groups"] + ["loadgen"]:
                assert entry["summary"]["_cpu"][f"cpu_us_per_request.{group}"]["median"] > 0, (role, level, group)
    # The coalescing client really batched: the policy was known and GetItem went through Dispatch.
    for level in levels:
        transport = rows["direct-batched"]["levels"][level]["reps"][0]["transport"]
        assert "/offload.v1.ComputeService/GetItem" in transport["batched_methods"]
        assert transport["batched_calls"] > 0 and transport["calls_per_dispatch"] >= 1
    assert rows["direct-plain"]["levels"][levels[0]]["reps"][0]["transport"] == {}


def test_memory_is_pss_over_all_processes(smoke_run) -> None:
    out, _ = smoke_run
    standard = json.loads((out / "results.json").read_text())["memory"]["standard"]
    offload = standard["offload"]
    roles = {p["group"] for p in offload["per_process"]}
    assert roles == {"gateway", "compute"}
    # 2 gateway workers + master, compute + forkserver + 2 pool workers at least.
    assert offload["processes"] >= 6
    assert offload["total_pss"] == sum(p["pss"] for p in offload["per_process"])
    assert offload["total_pss"] <= offload["summed_rss"]
    executor = standard["naive-executor"]
    assert executor["processes"] >= 5  # master + 2 workers + 2 executor processes


def test_report_and_charts_written(smoke_run) -> None:
    out, _ = smoke_run
    report = (out / "report.md").read_text()
    for heading in ("## Targets (issue 5)", "## Targets (the hop)", "## Machine", "## Mixed load, open loop", "## Hop cost", "## Memory", "## Search", "## Jobs"):
        assert heading in report
    assert "| job / direct |" in report and "not implemented" not in report
    assert "met**" in report or "missed**" in report
    targets = json.loads((out / "results.json").read_text())["targets"]
    hop = [t for t in targets if t["section"] == "the hop"]
    assert len(hop) == 5 and all(t["met"] is not None for t in hop), hop
    assert len([t for t in targets if t["section"] == "issue 5"]) == 6
    section = report.split("## Targets (the hop)", 1)[1].split("\n## ", 1)[0]
    assert sum(line.startswith("|") for line in section.splitlines()) == 2 + len(hop)  # header, rule, targets
    table = report.split("## Hop cost", 1)[1].split("\n## ", 1)[0]
    for name in json.loads((out / "results.json").read_text())["hop"]:
        assert f"| {name} |" in table
    assert "c=1 req/s (× inline)" in table
    for chart in ("latency.png", "memory_pss.png", "search_concurrency.png", "hop_cpu.png"):
        data = (out / chart).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, chart


def test_jobs_scenario(smoke_run) -> None:
    out, _ = smoke_run
    jobs = json.loads((out / "results.json").read_text())["jobs"]
    assert "skipped" not in jobs, jobs.get("skipped")
    assert jobs["design"] == "offload" and jobs["queries"] > 0
    profile = json.loads((out / "results.json").read_text())["profile"]
    assert len(jobs["reps"]) == (profile["jobs_reps"] or profile["reps"])
    for rep in jobs["reps"]:
        assert rep["job_qps"] > 0 and rep["direct_qps"] > 0 and rep["direct_errors"] == 0
        assert rep["ratio"] == rep["job_qps"] / rep["direct_qps"]
    assert jobs["summary"]["ratio"]["median"] > 0
    fairness = jobs["fairness"]
    assert fairness["big_job_queries"] == 4 * jobs["queries"]
    assert set(fairness["big_job_states"]) <= {"SUCCEEDED", "CANCELLED"}  # cancelled if still running after the window
    assert fairness["idle_ms"]["n"] > 0 and fairness["idle_ms"]["p50"] <= fairness["idle_ms"]["p99"]


def test_reply_shapes_probe_runs():
    """The probe behind the README's unary-vs-streamed figures runs and reports every shape."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    out = subprocess.run([sys.executable, "-m", "bench.reply_shapes", "--calls", "50", "--reps", "1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    for shape in ("unary reply", "server-streamed reply", "bidi stream"):
        assert f"| {shape} |" in out.stdout


def test_streams_measured(smoke_run) -> None:
    """Server-streaming messages/s through one gateway worker: WebSocket, SSE, direct gRPC."""
    out, _ = smoke_run
    streams = json.loads((out / "results.json").read_text())["streams"]
    for transport in ("websocket", "sse", "grpc-direct"):
        assert streams[transport]["messages_per_s"] > 0, transport
    assert "## Streams (one gateway worker)" in (out / "report.md").read_text()


def test_job_stores_measured(smoke_run) -> None:
    """Small jobs/s on SQLite and on a real PostgreSQL, in the same run."""
    out, _ = smoke_run
    stores = json.loads((out / "results.json").read_text())["job_stores"]
    assert stores["sqlite"]["jobs_per_s"] > 0 and stores["postgres"]["jobs_per_s"] > 0
    assert "## Job stores (SQLite vs PostgreSQL)" in (out / "report.md").read_text()
