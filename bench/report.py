"""report.md, the targets of issue 5 and of the hop (met/missed), and PNG charts (matplotlib, Agg)."""

from __future__ import annotations

import dataclasses
import os
import platform
import subprocess
from pathlib import Path

DESIGNS = ["offload", "naive-inline", "naive-executor"]
GIB = 2**30
MIB = 2**20


# -- machine and profile --------------------------------------------------------------------------


def machine() -> dict:
    import numpy

    cpu_model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_total = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_total = int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).resolve().parents[1]).stdout.strip()
    except OSError:
        commit = "?"
    import grpc
    import uvicorn

    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model,
        "memory_bytes": mem_total,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "grpcio": grpc.__version__,
        "uvicorn": uvicorn.__version__,
        "git_commit": commit,
    }


def profile_dict(profile) -> dict:
    return dataclasses.asdict(profile)


# -- helpers -------------------------------------------------------------------------------------


def med(summary: dict | None, path: str) -> float | None:
    if not summary:
        return None
    entry = summary.get(path)
    return entry["median"] if entry else None


def fmt(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def fmt_spread(summary: dict | None, path: str, digits: int = 1) -> str:
    if not summary or path not in summary or summary[path]["median"] is None:
        return "-"
    entry = summary[path]
    if entry["n"] > 1 and entry["min"] != entry["max"]:
        return f"{fmt(entry['median'], digits)} [{fmt(entry['min'], digits)}–{fmt(entry['max'], digits)}]"
    return fmt(entry["median"], digits)


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def _light_bad(summary: dict) -> float | None:
    light = summary.get("light") if summary else None
    if not light:
        return None
    return sum((med(light, k) or 0) for k in ("errors", "timeouts", "unfinished", "other_status"))


# -- the hop table -------------------------------------------------------------------------------


def hop_levels(results: dict) -> list[str]:
    """The concurrency levels of the hop table, ascending, as the keys of each row's `levels`."""
    levels = results.get("profile", {}).get("hop_levels")
    if not levels:
        levels = sorted({int(level) for row in results.get("hop", {}).values() for level in row.get("levels", {})})
    return [str(level) for level in sorted(levels)]


def hop_row(results: dict, role: str) -> dict | None:
    """The hop row of a role (forwarded, direct-plain, direct-batched, inline, hello)."""
    return next((row for row in results.get("hop", {}).values() if row.get("role") == role), None)


def hop_cell(row: dict | None, level: str) -> dict | None:
    """One row at one level: req/s, p50/p99 (summaries) and CPU µs per request on the request's
    path (the sum over its process trees, per repetition, then min/median/max), per tree, loadgen."""
    entry = row and row.get("levels", {}).get(level)
    if not entry or not entry.get("reps"):
        return None
    from bench.runner import spread

    reps, groups = entry["reps"], row["path_groups"]

    def per_rep(group: str) -> list:
        return [r["cpu_us_per_request"].get(group) for r in reps]

    path = [sum(v[g] for g in groups) if all(v.get(g) is not None for g in groups) else None
            for v in (r["cpu_us_per_request"] for r in reps)]
    batching = [r.get("transport", {}).get("calls_per_dispatch") for r in reps]
    return {
        "light": entry["summary"]["light"],
        "cpu_path": spread(path),
        "cpu_groups": {g: spread(per_rep(g)) for g in groups},
        "cpu_loadgen": spread(per_rep("loadgen")),
        "calls_per_dispatch": spread(batching),
    }


def _cell_value(cell: dict | None, what: str) -> float | None:
    if cell is None:
        return None
    if what == "cpu":
        return cell["cpu_path"]["median"]
    return med(cell["light"], what)


# -- targets -------------------------------------------------------------------------------------


def _status(value: float | None, ok: bool) -> bool | None:
    return None if value is None else ok


def hop_targets(results: dict) -> list[dict]:
    """The targets of the hop issue, each from this run's figures."""
    out = []
    levels = hop_levels(results)
    lo, hi = (levels[0], levels[-1]) if levels else ("1", "64")
    fwd, inline = hop_row(results, "forwarded"), hop_row(results, "inline")
    fwd_hi, inl_hi = hop_cell(fwd, hi), hop_cell(inline, hi)
    f_rps, i_rps = _cell_value(fwd_hi, "throughput"), _cell_value(inl_hi, "throughput")
    r = ratio(f_rps, i_rps)
    out.append({
        "section": "the hop",
        "target": f"Forwarded GetItem req/s >= 1.1x in-process FastAPI GetItem (naive-inline, "
                  f"{inline.get('workers', '?') if inline else '?'} workers), c={hi}",
        "value": f"{fmt(r, 2)}x ({fmt(f_rps, 0)} vs {fmt(i_rps, 0)} req/s)",
        "met": _status(r, r is not None and r >= 1.1),
    })
    cpu = _cell_value(fwd_hi, "cpu")
    parts = " + ".join(f"{g} {fmt(c['median'], 0)}" for g, c in (fwd_hi or {}).get("cpu_groups", {}).items())
    out.append({
        "section": "the hop",
        "target": f"Total CPU per forwarded GetItem (gateway + compute) <= 200 µs, c={hi}",
        "value": f"{fmt(cpu, 0)} µs ({parts})" if cpu is not None else "not measured",
        "met": _status(cpu, cpu is not None and cpu <= 200.0),
    })
    p50 = _cell_value(hop_cell(fwd, lo), "latency_ms.p50")
    out.append({
        "section": "the hop",
        "target": f"Forwarded GetItem p50 <= 1.0 ms, c={lo}",
        "value": f"{fmt(p50, 3)} ms",
        "met": _status(p50, p50 is not None and p50 <= 1.0),
    })
    open_ = results.get("mixed_open", {})
    off_p99 = med(open_.get("offload", {}).get("summary", {}).get("light"), "latency_ms.p99")
    exe_p99 = med(open_.get("naive-executor", {}).get("summary", {}).get("light"), "latency_ms.p99")
    rate = open_.get("offload", {}).get("rate")
    out.append({
        "section": "the hop",
        "target": f"Mixed open loop ({fmt(rate, 0)} req/s offered): light p99 <= 3 ms, and <= naive-executor's",
        "value": f"{fmt(off_p99, 2)} ms (naive-executor {fmt(exe_p99, 2)} ms)",
        "met": _status(off_p99, off_p99 is not None and exe_p99 is not None and off_p99 <= 3.0 and off_p99 <= exe_p99),
    })
    closed = results.get("mixed_closed", {})
    off_tp = med(closed.get("offload", {}).get("summary", {}).get("light"), "throughput")
    exe_tp = med(closed.get("naive-executor", {}).get("summary", {}).get("light"), "throughput")
    r = ratio(off_tp, exe_tp)
    out.append({
        "section": "the hop",
        "target": "Mixed closed loop: offload light throughput >= naive-executor's",
        "value": f"{fmt(off_tp, 0)} vs {fmt(exe_tp, 0)} req/s ({fmt(r, 2)}x)",
        "met": _status(r, r is not None and r >= 1.0),
    })
    return out


def targets(results: dict) -> list[dict]:
    """Issue 5's targets, the hop's, then Search batching's; each {section, target, value, met (None: not measured)}."""
    out = issue5_targets(results)
    for t in out:
        t.setdefault("section", "issue 5")
    return out + hop_targets(results) + search_targets(results) + operations_targets(results) + swap_targets(results)


def swap_targets(results: dict) -> list[dict]:
    """The table hot swap: its time, the tail latency during it, and its memory peak (bench/swap.py)."""
    swap = results.get("swap")
    if not swap:
        return []
    size = f"{swap['table_bytes'] / MIB:,.0f} MiB table"
    idle, loaded = swap["idle"], swap["loaded"]
    out = [{
        "section": "table swap",
        "target": f"Swap time (LoadTable of a .npy, {size}): idle; under mixed load",
        "value": f"{fmt(idle['swap_seconds'], 2)} s; {fmt(loaded['swap_seconds'], 2)} s (old table's memory released "
                 f"{fmt(idle['release_seconds'], 2)} s / {fmt(loaded['release_seconds'], 2)} s after the switch)",
        "met": None,
    }]
    before, during = swap["load"]["before"], swap["load"]["during"]
    failed = sum(c["failed"] for c in during.values())
    for name, what in (("light", "GetItem"), ("heavy", "Search")):
        b, d = before[name]["p99_ms"], during[name]["p99_ms"]
        out.append({
            "section": "table swap",
            "target": f"{what} p99 during the swap vs before it (same closed-loop load through the gateway)",
            "value": f"{fmt(d, 1)} ms vs {fmt(b, 1)} ms ({fmt(ratio(d, b), 2)}×)",
            "met": None,
        })
    out.append({
        "section": "table swap",
        "target": "No failed request during the swap",
        "value": f"{failed} failed of {sum(c['ok'] for c in during.values()) + failed}",
        "met": failed == 0,
    })
    peak = max(idle["peak_pss"], loaded["peak_pss"])
    out.append({
        "section": "table swap",
        "target": "Peak total PSS during the swap (expected: about one table more than before it)",
        "value": f"{peak / GIB:.2f} GiB vs {swap['pss_before'] / GIB:.2f} GiB before ({(peak - swap['pss_before']) / swap['table_bytes']:.2f} "
                 f"tables more); {swap['pss_after'] / GIB:.2f} GiB after",
        "met": None,
    })
    return out


def _search_summary(results: dict, key: str, level: int | str) -> dict | None:
    entry = results.get("search_concurrency", {}).get(key, {}).get("levels", {}).get(str(level), {})
    return (entry.get("summary") or {}).get("heavy")


def operations_targets(results: dict) -> list[dict]:
    """The operations issue: what tracing costs on the hop, and the memory of the standard setup."""
    out = []
    levels = hop_levels(results)
    hi = levels[-1] if levels else "64"
    off, on = hop_cell(hop_row(results, "forwarded"), hi), hop_cell(hop_row(results, "forwarded-traced"), hi)
    cpu_off, cpu_on = _cell_value(off, "cpu"), _cell_value(on, "cpu")
    extra = None if cpu_off is None or cpu_on is None else cpu_on - cpu_off
    out.append({
        "section": "operations",
        "target": f"Tracing: CPU per forwarded GetItem with every span exported (on) vs off, c={hi} "
                  "(off imports no SDK: tests/test_tracing.py)",
        "value": "not measured" if extra is None else
                 f"on {fmt(cpu_on, 0)} µs vs off {fmt(cpu_off, 0)} µs: {extra:+.0f} µs per request ({fmt(ratio(cpu_on, cpu_off), 2)}×)",
        "met": None,
    })
    rows = [r for r in results.get("memory", {}).get("sweep", [])
            if r.get("design") == "offload" and r.get("workers") == 4 and r.get("pool_size") == 2]
    if rows:
        row = rows[0]
        pss = row["total_pss"] / GIB
        out.append({
            "section": "operations",
            "target": f"Total PSS <= 1.2 GiB: {row['table_bytes'] / GIB:.1f} GiB table, 4 gateway workers, pool 2",
            "value": f"{pss:.3f} GiB (shared memory {row['shm_bytes'] / MIB:,.0f} MiB of it)",
            "met": _status(pss, pss <= 1.2),
        })
    return out


def search_targets(results: dict) -> list[dict]:
    """Issue 11: Search at the machine's limit, measured against that limit in the same run."""
    cal, prof = results.get("calibration", {}), results.get("profile", {})
    limit = (cal.get("search_limit") or {}).get("queries_per_s")
    clients = prof.get("search_clients", 16)
    out = []

    def row(target: str, value: str, met: bool | None) -> None:
        out.append({"section": "Search batching", "target": target, "value": value, "met": met})

    qps = med(_search_summary(results, "offload (direct gRPC)", clients), "throughput")
    off = med(_search_summary(results, "offload, batching off (direct gRPC)", clients), "throughput")
    r = ratio(qps, limit)
    row(f"Search/s at concurrency {clients} (direct gRPC) >= 70% of the limit",
        f"{fmt(100 * r if r else None, 0)}% ({fmt(qps, 0)} vs limit {fmt(limit, 0)} queries/s; batching off: {fmt(off, 0)})",
        _status(r, r is not None and r >= 0.7))
    jobs = results.get("jobs", {})
    job_qps = med(jobs.get("summary"), "job_qps") if jobs.get("summary") else None
    r = ratio(job_qps, limit)
    row("Batch-job queries/s >= 70% of the limit", f"{fmt(100 * r if r else None, 0)}% ({fmt(job_qps, 0)} queries/s)",
        _status(r, r is not None and r >= 0.7))
    inproc = cal.get("inproc_search_ms", {}).get("p50")
    rest = med(_search_summary(results, "offload", 1), "latency_ms.p50")
    grpc = med(_search_summary(results, "offload (direct gRPC)", 1), "latency_ms.p50")
    r_rest, r_grpc = ratio(rest, inproc), ratio(grpc, inproc)
    row("Single Search p50 <= 1.1x in-process numpy (REST and direct gRPC)",
        f"REST {fmt(r_rest, 2)}x ({fmt(rest, 2)} ms), gRPC {fmt(r_grpc, 2)}x ({fmt(grpc, 2)} ms), in-process {fmt(inproc, 2)} ms",
        _status(r_rest and r_grpc, r_rest is not None and r_grpc is not None and max(r_rest, r_grpc) <= 1.1))
    light = results.get("light_during_searches", {})
    on = med(((light.get("offload") or {}).get("searches") or {}).get("summary", {}).get("light"), "latency_ms.p99")
    off_p99 = med(((light.get("offload, batching off") or {}).get("searches") or {}).get("summary", {}).get("light"), "latency_ms.p99")
    r = ratio(on, off_p99)
    row(f"Light latency does not regress with the pool saturated by batched Searches (GetItem p99 during {clients} Search "
        "clients, batching on / off; <= 1.1x allows for noise)",
        f"{fmt(r, 2)}x ({fmt(on, 2)} vs {fmt(off_p99, 2)} ms)", _status(r, r is not None and r <= 1.1))
    fairness = jobs.get("fairness") or {}
    p99 = fairness.get("p99_ratio")
    row("Interactive Search p99 while a big job runs <= 1.2x its value with no job",
        f"{fmt(p99, 2)}x", _status(p99, p99 is not None and p99 <= 1.2))
    return out


def issue5_targets(results: dict) -> list[dict]:
    out = []
    open_ = results.get("mixed_open", {})
    off = open_.get("offload", {}).get("summary")
    inl = open_.get("naive-inline", {}).get("summary")
    off_p99 = med(off and off.get("light"), "latency_ms.p99")
    inl_p99 = med(inl and inl.get("light"), "latency_ms.p99")
    out.append({
        "target": "Light p99 under mixed load (open loop) <= 10 ms",
        "value": f"{fmt(off_p99, 2)} ms",
        "met": off_p99 is not None and off_p99 <= 10.0,
    })
    r = ratio(inl_p99, off_p99)
    out.append({
        "target": "Light p99 at least 100x better than naive-inline (open loop)",
        "value": f"{fmt(r, 1)}x (naive-inline {fmt(inl_p99, 1)} ms)",
        "met": r is not None and r >= 100,
    })
    bad = _light_bad(off) if off else None
    closed = results.get("mixed_closed", {}).get("offload", {}).get("summary")
    bad_closed = _light_bad(closed) if closed else None
    out.append({
        "target": "0 errors on light requests (mixed load, open and closed loop)",
        "value": f"open {fmt(bad, 0)}, closed {fmt(bad_closed, 0)} (errors+timeouts+unfinished+non-2xx)",
        "met": bad == 0 and bad_closed == 0,
    })
    over = results.get("overload", {}).get("offload", {}).get("summary")
    heavy_max = med(over and over.get("heavy"), "latency_ms.max")
    reject_p99 = med(over and over.get("heavy"), "reject_latency_ms.p99")
    deadline_ms = 30_000.0  # gateway default_timeout_seconds, unchanged by the bench
    out.append({
        "target": "Overload: admitted heavy requests finish within their deadline; excess rejected fast",
        "value": f"admitted max {fmt(heavy_max, 0)} ms (deadline {deadline_ms:,.0f} ms); 429 p99 {fmt(reject_p99, 1)} ms",
        "met": heavy_max is not None and heavy_max <= deadline_ms and reject_p99 is not None and reject_p99 < 100,
    })
    sweep = results.get("memory", {}).get("sweep", [])
    target_row = next((r for r in sweep if r["design"] == "offload" and r["workers"] == 4 and r["pool_size"] == 2), None)
    inline4 = next((r for r in sweep if r["design"] == "naive-inline" and r["workers"] == 4), None)
    if target_row:
        table = target_row["table_bytes"]
        exact = abs(table - GIB) < 0.01 * GIB
        pss = target_row["total_pss"] if exact else target_row["total_pss"] - table + GIB
        vs = ratio(inline4["total_pss"], target_row["total_pss"]) if inline4 else None
        out.append({
            "target": "Total PSS, 4 gateway workers + 2 pool workers + 1 GB table <= 1.3 GB",
            "value": (f"{pss / 2**30:.2f} GiB" + ("" if exact else f" (extrapolated from a {table / MIB:.0f} MiB table: "
                      f"measured {target_row['total_pss'] / MIB:.0f} MiB)"))
            + (f"; naive-inline 4w uses {fmt(vs, 1)}x more" if vs else ""),
            "met": pss <= 1.3 * 2**30,
        })
    else:
        out.append({"target": "Total PSS, 4 gateway workers + 2 pool workers + 1 GB table <= 1.3 GB",
                    "value": "not measured in this profile", "met": None})
    search = results.get("search_concurrency", {}).get("offload", {}).get("levels", {}).get("1", {}).get("summary")
    single = med(search and search.get("heavy"), "latency_ms.p50")
    inproc = results.get("calibration", {}).get("inproc_search_ms", {}).get("p50")
    r = ratio(single, inproc)
    out.append({
        "target": "Single-query Search within 1.3x of in-process numpy (p50)",
        "value": f"{fmt(r, 2)}x ({fmt(single, 2)} ms vs {fmt(inproc, 2)} ms)",
        "met": r is not None and r <= 1.3,
    })
    return out


# -- charts --------------------------------------------------------------------------------------


def charts(results: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        made.append(name)

    # 1. latency percentiles per design, mixed load (closed and open) and overload
    scenarios = [(k, t) for k, t in (("mixed_closed", "mixed, closed loop"), ("mixed_open", "mixed, open loop"),
                                     ("overload", "overload (open loop)")) if results.get(k)]
    if scenarios:
        fig, axes = plt.subplots(1, len(scenarios), figsize=(5.2 * len(scenarios), 4.2), squeeze=False)
        metrics = [("light", "latency_ms.p50", "light p50"), ("light", "latency_ms.p99", "light p99"),
                   ("heavy", "latency_ms.p50", "heavy p50"), ("heavy", "latency_ms.p99", "heavy p99")]
        for ax, (key, title) in zip(axes[0], scenarios):
            data = results[key]
            names = [d for d in DESIGNS if d in data]
            width = 0.8 / len(metrics)
            for i, (cls, path, label) in enumerate(metrics):
                values = [med(data[d]["summary"].get(cls), path) or 0 for d in names]
                ax.bar([x + i * width for x in range(len(names))], values, width, label=label)
            ax.set_xticks([x + 0.4 - width / 2 for x in range(len(names))], names, fontsize=8)
            ax.set_yscale("log")
            ax.set_ylabel("ms (log)")
            ax.set_title(title)
            ax.grid(axis="y", alpha=0.3)
        axes[0][0].legend(fontsize=8)
        save(fig, "latency.png")

    # 2. PSS per design vs workers
    sweep = results.get("memory", {}).get("sweep", [])
    standard = results.get("memory", {}).get("standard", {})
    points = list(sweep) + [v for v in standard.values()]
    if points:
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        series: dict[str, dict[int, float]] = {}
        for row in points:
            table_mib = row["table_bytes"] / MIB
            if row["design"] == "offload":
                name = f"offload pool {row['pool_size']}"
            elif row["design"] == "naive-executor":
                name = f"naive-executor pool {row['pool_size']}/worker"
            else:
                name = row["design"]
            name += f" ({table_mib:.0f} MiB table)"
            series.setdefault(name, {})[row["workers"]] = row["total_pss"] / MIB
        for name, values in sorted(series.items()):
            xs = sorted(values)
            ax.plot(xs, [values[x] for x in xs], marker="o", label=name)
        ax.set_xlabel("HTTP workers (gateway / uvicorn)")
        ax.set_ylabel("total PSS, MiB")
        ax.set_xticks([1, 2, 4])
        ax.set_title("Memory: total PSS of all processes")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        save(fig, "memory_pss.png")

    # 3. Search throughput and p99 vs concurrency
    conc = {k: v for k, v in results.get("search_concurrency", {}).items() if "gRPC" not in k}
    if conc:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
        for name, entry in conc.items():
            levels = sorted(entry["levels"], key=int)
            xs = [int(x) for x in levels]
            a1.plot(xs, [med(entry["levels"][x]["summary"]["heavy"], "throughput") or 0 for x in levels], marker="o", label=name)
            a2.plot(xs, [med(entry["levels"][x]["summary"]["heavy"], "latency_ms.p99") or 0 for x in levels], marker="o", label=name)
        a1.set_title("Search throughput (2xx/s)")
        a2.set_title("Search p99 of answered (ms)")
        for ax in (a1, a2):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("concurrent clients")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        save(fig, "search_concurrency.png")

    # 4. hop cost: CPU us per request per process tree on the request's path, one panel per level
    hop = results.get("hop", {})
    levels = hop_levels(results)
    if hop and levels:
        fig, axes = plt.subplots(1, len(levels), figsize=(6 * len(levels), 4.2), squeeze=False)
        names = list(hop)
        groups = ["gateway", "compute", "app", "loadgen"]
        for ax, level in zip(axes[0], levels):
            cells = [hop_cell(hop[n], level) for n in names]
            bottom = [0.0] * len(names)
            for group in groups:
                values = []
                for cell in cells:
                    if cell is None:
                        values.append(0.0)
                    elif group == "loadgen":
                        values.append(cell["cpu_loadgen"]["median"] or 0.0)
                    else:
                        values.append((cell["cpu_groups"].get(group) or {}).get("median") or 0.0)
                if any(values):
                    ax.bar(range(len(names)), values, bottom=bottom, label=group)
                    bottom = [b + v for b, v in zip(bottom, values)]
            ax.set_xticks(range(len(names)), [n.replace(" (", "\n(") for n in names], fontsize=6)
            ax.set_ylabel("CPU µs per request")
            ax.set_title(f"Hop cost at c={level}: CPU per request, by process tree", fontsize=9)
            ax.legend(fontsize=7)
            ax.grid(axis="y", alpha=0.3)
        save(fig, "hop_cpu.png")
    return made


# -- markdown -------------------------------------------------------------------------------------


def _class_table(data: dict, title_extra: str = "") -> list[str]:
    lines = [
        "| design | class | 2xx/s | p50 ms | p99 ms | max ms | 429 | 429 p99 ms | errors | timeouts | unfinished |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for design in DESIGNS:
        if design not in data:
            continue
        summary = data[design]["summary"]
        for cls in ("light", "heavy"):
            s = summary.get(cls)
            if not s:
                continue
            lines.append(
                f"| {data[design]['label']} | {cls} | {fmt_spread(s, 'throughput')} | {fmt_spread(s, 'latency_ms.p50', 2)} | "
                f"{fmt_spread(s, 'latency_ms.p99', 2)} | {fmt_spread(s, 'latency_ms.max')} | {fmt(med(s, 'rejected_429'), 0)} | "
                f"{fmt_spread(s, 'reject_latency_ms.p99', 2)} | {fmt(med(s, 'errors'), 0)} | {fmt(med(s, 'timeouts'), 0)} | "
                f"{fmt(med(s, 'unfinished'), 0)} |"
            )
    cpu = [f"{d}: {fmt(med(data[d]['summary']['_cpu'], 'client_cpu_percent'), 0)}%" for d in DESIGNS if d in data]
    lines.append("")
    lines.append(f"Load generator CPU (of one core) during the window: {', '.join(cpu)}.{title_extra}")
    return lines


def _ratio_line(data: dict, cls: str, path: str, what: str) -> str:
    off = med(data.get("offload", {}).get("summary", {}).get(cls), path)
    parts = []
    for design in ("naive-inline", "naive-executor"):
        other = med(data.get(design, {}).get("summary", {}).get(cls), path)
        r = ratio(other, off)
        if r is not None:
            parts.append(f"{design} / offload = **{r:.1f}x**")
    return f"{what}: " + ", ".join(parts) if parts else ""


def _light_during_section(data: dict) -> list[str]:
    if not data:
        return []
    clients = next(iter(data.values()))["search_clients"]
    L = ["## Light calls while Searches saturate the pool", ""]
    L.append(f"Through the gateway, closed loop: 1 GetItem client alone, then the same with {clients} Search clients. "
             "Batching off = the same offload with OFFLOAD_COMPUTE_POOL_MAX_BATCH=1.")
    L.append("")
    L.append("| design | load | GetItem p50 ms | GetItem p99 ms | GetItem/s | Search/s |")
    L.append("|---|---|---|---|---|---|")
    for key, entry in data.items():
        for load in ("alone", "searches"):
            summary = entry[load]["summary"]
            heavy = summary.get("heavy")
            L.append(f"| {entry['label']} | {load} | {fmt_spread(summary['light'], 'latency_ms.p50', 2)} | "
                     f"{fmt_spread(summary['light'], 'latency_ms.p99', 2)} | {fmt_spread(summary['light'], 'throughput', 0)} | "
                     f"{fmt_spread(heavy, 'throughput', 0) if heavy else '-'} |")
    L.append("")
    return L


def _jobs_section(jobs: dict) -> list[str]:
    L = ["## Jobs", ""]
    if "skipped" in jobs or not jobs.get("reps"):
        L += [str(jobs.get("skipped", "jobs scenario did not run")), ""]
        return L
    s, f = jobs["summary"], jobs["fairness"]
    L.append(f"{jobs['label']}, direct gRPC to compute. {jobs['queries']} random queries, k={jobs['k']}: one batch_search "
             f"job (SubmitJob, GetJob polled every {1000 * jobs['config']['poll']:.0f} ms until SUCCEEDED) vs the same "
             f"queries as Search calls, {jobs['concurrency']} in flight (= pool size). Fairness: sequential Search for "
             f"up to {fmt(f['window_seconds'])} s with no job, then while a {f['big_job_queries']}-query job runs "
             f"({f['jobs_submitted']} SubmitJob).")
    L.append("")
    L.append("| measure | value |")
    L.append("|---|---|")
    L.append(f"| batch job, queries/s | {fmt_spread(s, 'job_qps')} |")
    L.append(f"| direct Search, queries/s | {fmt_spread(s, 'direct_qps')} |")
    L.append(f"| job / direct | **{fmt_spread(s, 'ratio', 2)}** |")
    idle, busy = f["idle_ms"], f["busy_ms"]
    L.append(f"| Search p50 / p99 ms, no job (n={idle['n']}) | {fmt(idle['p50'], 2)} / {fmt(idle['p99'], 2)} |")
    L.append(f"| Search p50 / p99 ms, big job running (n={busy['n']}) | {fmt(busy['p50'], 2)} / {fmt(busy['p99'], 2)} |")
    L.append(f"| Search p50 / p99 ratio (job running / none) | **{fmt(f.get('p50_ratio'), 2)} / {fmt(f.get('p99_ratio'), 2)}** |")
    L.append("")
    r, p99 = med(s, "ratio"), f.get("p99_ratio")
    L.append(f"A batch job reaches {fmt(r, 2)}x the query throughput of direct Search calls at pool-size concurrency "
             "(a job scans the table once per chunk of queries, with one chunk per pool worker while no interactive "
             "call arrives). "
             f"While the big job ran, interactive Search p99 was {fmt(p99, 2)}x its value with no job"
             + (" (few samples: the job finished quickly)." if busy["n"] < 20 else ".")
             + (" The big job was still running when the window ended and was cancelled."
                if f.get("big_job_cancelled_after_window") else ""))
    L.append("")
    return L


def _hop_section(results: dict) -> list[str]:
    hop = results.get("hop")
    levels = hop_levels(results)
    if not hop or not levels:
        return []
    prof = results["profile"]
    inline = hop_row(results, "inline")
    L = ["## Hop cost (GetItem, closed loop)", ""]
    L.append(f"Each row at {' and '.join('c=' + lv for lv in levels)} concurrent clients (connections, or calls in flight "
             f"on one gRPC channel), {fmt(prof.get('hop_duration'))} s windows after {fmt(prof.get('hop_warmup'))} s warm-up, "
             f"{prof['reps']} repetition(s); medians, req/s as median [min–max]. CPU µs per request measured with psutil "
             "over the window for each process tree on the request's path (gateway = uvicorn master + workers; compute = "
             "compute + forkserver + pool; app = a baseline's whole tree), summed per repetition; loadgen = the load "
             "generator itself (one process, one core at most: at high concurrency it may be what limits a row). "
             "(× inline) = the row / naive-inline at the same level, for req/s and for CPU.")
    L.append("")
    head = "| path |"
    rule = "|---|"
    for level in levels:
        head += f" c={level} req/s (× inline) | p50 ms | p99 ms | CPU µs/req on the path (× inline) | loadgen µs/req |"
        rule += "---|---|---|---|---|"
    L += [head, rule]
    short = {"gateway": "gw", "compute": "compute", "app": "app"}
    for name, row in hop.items():
        line = f"| {name} |"
        for level in levels:
            cell, base = hop_cell(row, level), hop_cell(inline, level)
            if cell is None:
                line += " - | - | - | - | - |"
                continue
            s = cell["light"]
            rps_ratio = ratio(_cell_value(cell, "throughput"), _cell_value(base, "throughput"))
            cpu_ratio = ratio(_cell_value(cell, "cpu"), _cell_value(base, "cpu"))
            groups = cell["cpu_groups"]
            cpu = fmt(cell["cpu_path"]["median"], 0)
            if len(groups) > 1:
                cpu = " + ".join(fmt(g["median"], 0) for g in groups.values()) + f" = {cpu}"
            cpu = f"{cpu} ({'/'.join(short.get(g, g) for g in groups)})"
            line += (f" {fmt_spread(s, 'throughput')} ({fmt(rps_ratio, 2)}×) | {fmt(med(s, 'latency_ms.p50'), 3)} | "
                     f"{fmt(med(s, 'latency_ms.p99'), 2)} | {cpu} ({fmt(cpu_ratio, 2)}×) | "
                     f"{fmt(cell['cpu_loadgen']['median'], 0)} |")
        L.append(line)
    L.append("")
    batched = hop_row(results, "direct-batched")
    if batched:
        per = [f"c={lv}: {fmt((hop_cell(batched, lv) or {}).get('calls_per_dispatch', {}).get('median'), 1)}" for lv in levels]
        L.append(f"Coalescing client, GetItem calls per `Dispatch` RPC in the window: {', '.join(per)}. "
                 "Direct gRPC rows: the gateway is up but idle (not counted).")
        L.append("")
    return L


def _job_stores_section(stores: dict | None) -> list[str]:
    if not stores:
        return []
    L = ["## Job stores (SQLite vs PostgreSQL)", ""]
    L.append(f"{stores['jobs']} one-query jobs submitted at once to one compute (pool 2, 4 jobs at a time), per "
             "backend: jobs/s from the first submit to the last SUCCEEDED. PostgreSQL is a local throwaway server "
             "(fsync off), so this compares the stores' own costs (bench/job_stores.py).")
    L.append("")
    L.append("| store | jobs/s | submit p50 ms | submit p99 ms |")
    L.append("|---|---|---|---|")
    for name in ("sqlite", "postgres"):
        row = stores.get(name)
        if row:
            L.append(f"| {name} | {fmt(row['jobs_per_s'], 0)} | {fmt(row['submit_p50_ms'], 1)} | {fmt(row['submit_p99_ms'], 1)} |")
    L.append("")
    return L


def _swap_section(swap: dict | None) -> list[str]:
    if not swap:
        return []
    L = ["## Table swap (LoadTable while serving)", ""]
    config = swap["load_config"]
    L.append(f"{swap['label']}, a {swap['table_rows']:,} x {swap['table_dim']} table ({swap['table_bytes'] / MIB:,.0f} MiB in "
             f"shared memory, ids included) replaced by a .npy of the same shape, twice: idle, then under a closed loop of "
             f"{config['light_clients']} GetItem and {config['heavy_clients']} Search clients through the gateway, whose "
             f"window opens with the swap and lasts as long as the idle swap took (bench/swap.py).")
    L.append("")
    L.append("| | idle | under load |")
    L.append("|---|---|---|")
    idle, loaded = swap["idle"], swap["loaded"]
    L.append(f"| LoadTable, s | {fmt(idle['swap_seconds'], 2)} | {fmt(loaded['swap_seconds'], 2)} |")
    L.append(f"| old table released after, s | {fmt(idle['release_seconds'], 2)} | {fmt(loaded['release_seconds'], 2)} |")
    L.append(f"| peak total PSS, GiB | {idle['peak_pss'] / GIB:.2f} | {loaded['peak_pss'] / GIB:.2f} |")
    L.append("")
    L.append("| class | p50 / p99 ms before | p50 / p99 ms during | answered during | failed during |")
    L.append("|---|---|---|---|---|")
    for name in ("light", "heavy"):
        b, d = swap["load"]["before"][name], swap["load"]["during"][name]
        L.append(f"| {name} | {fmt(b['p50_ms'], 1)} / {fmt(b['p99_ms'], 1)} | {fmt(d['p50_ms'], 1)} / {fmt(d['p99_ms'], 1)} "
                 f"| {d['ok']} | {d['failed']} |")
    L.append("")
    return L


def _streams_section(streams: dict | None) -> list[str]:
    if not streams:
        return []
    L = ["## Streams (one gateway worker)", ""]
    L.append(f"One reader of a {streams['messages']:,}-message server stream (`Ticks`, {streams['pad_bytes']} B of "
             "padding per message, about a JobEvent), median of the repetitions (bench/streams.py).")
    L.append("")
    L.append("| transport | messages/s | [all reps] | gateway CPU µs / message |")
    L.append("|---|---|---|---|")
    for name in ("websocket", "sse", "grpc-direct"):
        row = streams.get(name)
        if row:
            L.append(f"| {name} | {row['messages_per_s']:,.0f} | {row['all']} | {fmt(row['gateway_cpu_us_per_message'], 1)} |")
    L.append("")
    return L


def markdown(results: dict, chart_files: list[str]) -> str:
    meta, prof, cal = results["meta"], results["profile"], results.get("calibration", {})
    table = prof["load_table"]
    L: list[str] = []
    L.append(f"# offload benchmark — profile `{prof['name']}`")
    L.append("")
    plan = results.get("plan", {}).get("total")
    L.append(f"Command: `{meta.get('command')}` (git {meta.get('git_commit')}); wall time {results.get('wall_seconds')} s"
             + (f" ({plan['runs']} load runs, {fmt(plan['window_seconds'], 0)} s of warm-up + measured windows)." if plan else "."))
    L.append("All figures come from this one run on this machine; compare designs by the ratios, not the absolute times. "
             "Cells show median [min–max] over repetitions.")
    L.append("")
    for section in ("issue 5", "the hop", "Search batching", "operations", "table swap"):
        rows = [t for t in results.get("targets", []) if t.get("section", "issue 5") == section]
        if not rows:
            continue
        L.append(f"## Targets ({section})")
        L.append("")
        L.append("| target | measured | status |")
        L.append("|---|---|---|")
        for t in rows:
            status = "n/a" if t["met"] is None else ("**met**" if t["met"] else "**missed**")
            L.append(f"| {t['target']} | {t['value']} | {status} |")
        L.append("")
    if results.get("errors"):
        L.append("**Errors during the run:** " + "; ".join(f"{e['design']}: {e['error'][:200]}" for e in results["errors"]))
        L.append("")
    L.append("## Machine")
    L.append("")
    L.append(f"- {meta['nproc']} CPUs ({meta['cpu_model']}), {meta['memory_bytes'] / GIB:.1f} GiB RAM, Linux {meta['kernel']}")
    L.append(f"- Python {meta['python']}, numpy {meta['numpy']}, grpcio {meta['grpcio']}, uvicorn {meta['uvicorn']}")
    if cal:
        L.append(f"- Memory bandwidth (numpy, 1 thread, 512 MiB): read {fmt(cal['memory_read_gb_per_s']['median'])} GB/s, "
                 f"copy {fmt(cal['memory_copy_gb_per_s']['median'])} GB/s")
    L.append(f"- Load table: {table['rows']:,} x {table['dim']} float32 = {table['rows'] * table['dim'] * 4 / MIB:.0f} MiB; "
             f"standard configuration: {prof['workers']} HTTP workers everywhere, offload pool {prof['pool_size']}, "
             f"naive-executor pool {prof['executor_pool']} per worker; BLAS 1 thread per process in every design.")
    L.append("")
    for key, title, note in (
        ("mixed_closed", "Mixed load, closed loop",
         f"{prof['connections']} connections, {100 * (1 - prof['heavy_fraction']):.0f}% GetItem (light) / "
         f"{100 * prof['heavy_fraction']:.0f}% Search (heavy). Closed loop saturates the server, so latency here is "
         "mostly connections / throughput."),
        ("mixed_open", "Mixed load, open loop (fixed offered rate)",
         "Same mix at a fixed rate below capacity; latency from the scheduled send time (queueing counted)."),
        ("overload", "Overload: heavy requests offered above capacity", "Open loop, up to 256 connections."),
    ):
        data = results.get(key)
        if not data:
            continue
        L.append(f"## {title}")
        L.append("")
        any_entry = next(iter(data.values()))
        if "rate" in any_entry:
            how = "profile `open_rate`" if prof.get("open_rate") is not None else "derived from the calibration"
            note += f" Offered: {any_entry['rate']:.0f} req/s ({how})."
        if "heavy_rate" in any_entry:
            note += f" Offered: {any_entry['heavy_rate']:.0f} Search/s + {any_entry['light_rate']:.0f} GetItem/s."
        L.append(note)
        L.append("")
        L.extend(_class_table(data))
        L.append("")
        for cls, what in (("light", "Light p99"), ("heavy", "Heavy p99")):
            line = _ratio_line(data, cls, "latency_ms.p99", what)
            if line:
                L.append(f"- {line}")
        L.append("")
    L.extend(_hop_section(results))
    conc = results.get("search_concurrency")
    if conc:
        L.append("## Search")
        L.append("")
        inproc = cal.get("inproc_search_ms", {}).get("p50")
        L.append(f"In-process numpy (same `top_k`, same table, 1 BLAS thread): p50 {fmt(inproc, 2)} ms = "
                 f"{fmt(cal.get('inproc_scan_gb_per_s'), 2)} GB/s scanned, vs measured memory read bandwidth "
                 f"{fmt(cal.get('memory_read_gb_per_s', {}).get('median'), 2)} GB/s.")
        L.append("")
        limit = cal.get("search_limit")
        if limit:
            L.append(f"The limit: a matrix product of the table against a {limit['block']}-query block, 1 BLAS thread, "
                     f"{limit['processes']} processes at once (one per pool worker): **{fmt(limit['queries_per_s'], 0)} "
                     f"queries/s** ({', '.join(fmt(r, 0) for r in limit['per_process'])} per process).")
            L.append("")
        rates = cal.get("kernel_rates")
        if rates:
            L.append("The kernel against the bare product, one process, per block of queries (queries/s):")
            L.append("")
            L.append("| block | matrix product | top_k_batch | fraction |")
            L.append("|---|---|---|---|")
            for block, r in rates.items():
                L.append(f"| {block} | {fmt(r['matmul_qps'], 0)} | {fmt(r['top_k_batch_qps'], 0)} | {fmt(100 * r['fraction'], 0)}% |")
            L.append("")
        L.append("| design | concurrency | Search/s | p50 ms | p99 ms | 429 | p50 / in-process | scan GB/s (p50) |")
        L.append("|---|---|---|---|---|---|---|---|")
        for name, entry in conc.items():
            for level in sorted(entry["levels"], key=int):
                s = entry["levels"][level]["summary"]["heavy"]
                p50 = med(s, "latency_ms.p50")
                gbs = (table["rows"] * table["dim"] * 4 / (p50 / 1000) / 1e9) if p50 and level == "1" else None
                L.append(f"| {name} | {level} | {fmt_spread(s, 'throughput')} | {fmt_spread(s, 'latency_ms.p50', 2)} | "
                         f"{fmt_spread(s, 'latency_ms.p99', 2)} | {fmt(med(s, 'rejected_429'), 0)} | "
                         f"{fmt(ratio(p50, inproc), 2) if level == '1' else '-'} | {fmt(gbs, 2)} |")
        L.append("")
    mem = results.get("memory", {})
    if mem.get("standard") or mem.get("sweep"):
        L.append("## Memory (total PSS over every process of the setup)")
        L.append("")
        L.append("| setup | table MiB | processes | total PSS MiB | total USS MiB | summed RSS MiB (double counts) | PSS / table |")
        L.append("|---|---|---|---|---|---|---|")
        for row in list(mem.get("sweep", [])) + list(mem.get("standard", {}).values()):
            L.append(f"| {row['label']} | {row['table_bytes'] / MIB:.0f} | {row['processes']} | {row['total_pss'] / MIB:,.0f} | "
                     f"{row['total_uss'] / MIB:,.0f} | {row['summed_rss'] / MIB:,.0f} | {row['total_pss'] / row['table_bytes']:.2f} |")
        L.append("")
        for skip in mem.get("skipped", []):
            L.append(f"- Not run: {skip['design']} {skip['workers']}w x pool {skip['pool_size']}: {skip['reason']} "
                     f"(expected ≈ {skip['copies']} x table).")
        L.append("")
        std = mem.get("standard", {}).get("offload")
        if std:
            L.append("Per-process, offload standard configuration:")
            L.append("")
            L.append("| group | role | pid | PSS MiB | USS MiB | RSS MiB |")
            L.append("|---|---|---|---|---|---|")
            for p in std["per_process"]:
                L.append(f"| {p['group']} | {p['role']} | {p['pid']} | {p['pss'] / MIB:.1f} | {p['uss'] / MIB:.1f} | {p['rss'] / MIB:.1f} |")
            L.append("")
    L.extend(_light_during_section(results.get("light_during_searches", {})))
    L.extend(_jobs_section(results.get("jobs", {})))
    L.extend(_streams_section(results.get("streams")))
    L.extend(_job_stores_section(results.get("job_stores")))
    L.extend(_swap_section(results.get("swap")))
    if chart_files:
        L.append("## Charts")
        L.append("")
        for name in chart_files:
            L.append(f"![{name}]({name})")
        L.append("")
    L.append("## Exact commands")
    L.append("")
    L.append("```")
    for name, entry in results.get("designs", {}).items():
        for command in entry["commands"]:
            L.append(f"# {name}\n{command}")
    L.append("# load generator (config JSON in results.json, per repetition)")
    L.append("python -m bench.loadgen '<config>'")
    L.append("```")
    L.append("")
    return "\n".join(L)
