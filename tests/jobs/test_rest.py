"""Jobs end to end over REST: real compute + a real 2-worker gateway, no jobs-specific gateway code."""

from __future__ import annotations

import json
from typing import Iterator

import httpx
import numpy as np
import pytest

from tests.conftest import ComputeLauncher
from tests.gateway.conftest import GatewayLauncher
from tests.jobs.conftest import SHARED_SETTINGS
from tests.jobs.helpers import assert_matches, reference


@pytest.fixture(scope="module")
def http(tmp_path_factory) -> Iterator[httpx.Client]:
    workdir = tmp_path_factory.mktemp("rest")
    computes, gateways = ComputeLauncher(workdir), GatewayLauncher(workdir)
    try:
        compute = computes(**SHARED_SETTINGS)
        gateway = gateways(compute.address)
        with gateway.client(timeout=30) as client:
            yield client
    finally:
        gateways.close()
        computes.close()


def sse_events(response: httpx.Response) -> list[tuple[str | None, str | None, dict]]:
    """(id, event, data) for each Server-Sent Event of a finished stream."""
    events, fields = [], {}
    for line in response.iter_lines():
        if not line:
            if "data" in fields:
                events.append((fields.get("id"), fields.get("event"), json.loads(fields["data"])))
            fields = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")
    return events


def test_submit_202_location_sse_and_result(http, table):
    rng = np.random.default_rng(11)
    queries = rng.standard_normal((20, 16)).astype(np.float32)
    submit = http.post(
        "/v1/jobs",
        json={"idempotencyKey": "rest-1", "batchSearch": {"k": 3, "vectors": [{"values": q.tolist()} for q in queries]}},
    )
    assert submit.status_code == 202, submit.text
    job = submit.json()
    assert submit.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["state"] in ("QUEUED", "RUNNING") and job["progress"]["total"] == "20"

    with http.stream("GET", f"/v1/jobs/{job['id']}/events") as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    assert events and all(event is None for _, event, _ in events)
    assert [int(event_id) for event_id, _, _ in events] == [int(data["sequence"]) for _, _, data in events]
    assert events[-1][2]["job"]["state"] == "SUCCEEDED" and events[-1][2]["job"]["progress"]["done"] == "20"

    # A reconnecting client sends Last-Event-ID and gets only what came after it.
    with http.stream("GET", f"/v1/jobs/{job['id']}/events", headers={"Last-Event-ID": events[-2][0]}) as response:
        assert [event_id for event_id, _, _ in sse_events(response)] == [events[-1][0]]

    page = http.get(f"/v1/jobs/{job['id']}", params={"resultOffset": 0, "resultLimit": 20}).json()
    results = [[(hit["id"], hit["score"]) for hit in entry["hits"]] for entry in page["result"]["batchSearch"]["results"]]
    assert_matches(results, reference(table, queries, 3))
    # Same idempotency key: the same job, again 202 with the same Location.
    again = http.post(
        "/v1/jobs",
        json={"idempotencyKey": "rest-1", "batchSearch": {"k": 3, "vectors": [{"values": q.tolist()} for q in queries]}},
    )
    assert again.status_code == 202 and again.json()["id"] == job["id"]
    listed = http.get("/v1/jobs", params={"state": "SUCCEEDED", "pageSize": 10}).json()
    assert job["id"] in [j["id"] for j in listed["jobs"]]
    cancel = http.post(f"/v1/jobs/{job['id']}:cancel")
    assert cancel.status_code == 400 and cancel.json()["error"]["status"] == "FAILED_PRECONDITION"


@pytest.mark.parametrize(
    "path",
    [
        "/v1/jobs/..%2F..%2Fetc%2Fpasswd",
        "/v1/jobs/%2e%2e",
        "/v1/jobs/" + "x" * 10_000,
        "/v1/jobs/nope:cancel",
        "/v1/jobs/AAAAAAAAAAAAAAAAAAAAAAAA/events",
        "/v1/jobs/%00",
    ],
)
def test_hostile_ids_over_rest_are_4xx(http, path):
    method = "POST" if path.endswith(":cancel") else "GET"
    response = http.request(method, path)
    assert response.status_code in (400, 404, 414), response.text
    if response.status_code != 414:
        assert response.json()["error"]["status"] in ("NOT_FOUND", "INVALID_ARGUMENT")
        assert "passwd" not in response.text


def test_submit_semantic_errors_are_400(http):
    response = http.post("/v1/jobs", json={"batchSearch": {"k": 3, "itemIds": ["item-1", "no-such-item"]}})
    assert response.status_code == 400
    assert response.json()["error"]["status"] == "INVALID_ARGUMENT" and "no-such-item" not in response.text
