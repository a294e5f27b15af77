"""The Grafana dashboard queries only metrics that exist: every metric name in its PromQL is in a
real /metrics scrape of a real gateway and compute, after a few calls."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterator

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ROOT, ComputeLauncher, wait_until
from tests.gateway.conftest import GatewayLauncher

DASHBOARD = ROOT / "deploy/grafana/offload.json"
SCRAPE_CONFIG = ROOT / "deploy/prometheus/prometheus.yml"

# PromQL words that are not metric names: functions (followed by "("), aggregation modifiers,
# keywords. Label names only appear inside {...} or by/without (...), which are removed first.
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset"}


def metric_names(expr: str) -> set[str]:
    """Metric names referenced by one PromQL expression."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range selectors ([5m], [$__rate_interval])
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)  # label lists
    names = set()
    for match in re.finditer(r"(?<![\w$.])([a-zA-Z_:][\w:]*)\s*(\()?", text):
        word, call = match.group(1), match.group(2)
        if call is None and word not in _KEYWORDS and not re.fullmatch(r"\d+(\.\d+)?|e\d+", word):
            names.add(word)
    return names


def dashboard_exprs() -> list[str]:
    def panels(items: list[dict]) -> Iterator[dict]:
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))

    document = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in panels(document["panels"]) for target in panel.get("targets", [])]


def sample_names(text: str) -> set[str]:
    """Names of the samples in an exposition: `x_bucket`, `x_count`, `x_sum`, `y_total`... as PromQL sees them."""
    return {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}


def test_the_expression_parser():
    assert metric_names('histogram_quantile(0.99, sum by (rpc, le) (rate(a_b_bucket{x="1"}[$__rate_interval])))') == {"a_b_bucket"}
    assert metric_names('sum(rate(x_sum[5m])) / sum(rate(x_count[5m])) and on (job) up{job="y"}') == {"x_sum", "x_count", "up"}


def test_every_dashboard_metric_exists_in_real_scrapes(tmp_path):
    exprs = dashboard_exprs()
    assert len(exprs) >= 15
    wanted = set().union(*map(metric_names, exprs))
    assert {"offload_gateway_requests_total", "offload_process_pss_bytes", "offload_compute_jobs"} <= wanted

    computes, gateways = ComputeLauncher(tmp_path), GatewayLauncher(tmp_path)
    try:
        compute = computes(pool_size=2)
        gateway = gateways(compute.address, workers=2)
        with gateway.client() as client:
            assert client.get("/v1/items/item-1").status_code == 200
            assert client.get("/v1/items/no-such-item").status_code == 404
            assert client.get("/v1/stats").status_code == 200
            assert client.post("/v1/search", json={"vector": [1.0] * 16, "k": 3}).status_code == 200
            job = client.post("/v1/jobs", json={"batchSearch": {"k": 2, "itemIds": ["item-1", "item-2"]}})
            assert job.status_code == 202, job.text
            job_id = job.json()["id"]
            wait_until(lambda: client.get(f"/v1/jobs/{job_id}").json()["state"] == "SUCCEEDED", 30, 0.1, "the job to finish")
            gateway_scrape = client.get("/metrics").text
        compute_scrape = compute.metrics_text()
    finally:
        gateways.close()
        computes.close()

    scraped = sample_names(gateway_scrape) | sample_names(compute_scrape)
    missing = sorted(wanted - scraped)
    assert not missing, f"the dashboard queries metrics no scrape has: {missing}"
    # The memory panel has every process: gateway workers and compute's pool workers.
    pss = [line for line in (gateway_scrape + compute_scrape).splitlines() if line.startswith("offload_process_pss_bytes{")]
    roles = [re.search(r'process="([^"]+)"', line).group(1) for line in pss]
    assert roles.count("gateway") == 2 and roles.count("compute-worker") == 2 and "compute" in roles
    assert 'offload_compute_jobs{state="SUCCEEDED"} 1.0' in compute_scrape


def test_the_scrape_example_matches_the_dashboard():
    jobs = {job["job_name"]: job for job in yaml.safe_load(SCRAPE_CONFIG.read_text())["scrape_configs"]}
    constants = {v["name"]: v["query"] for v in json.loads(DASHBOARD.read_text())["templating"]["list"] if v["type"] == "constant"}
    assert set(jobs) == {constants["gateway_job"], constants["compute_job"]}
    assert jobs["offload-compute"]["static_configs"][0]["targets"] == ["127.0.0.1:9101"]  # compute's default metrics port
