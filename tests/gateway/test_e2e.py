"""End to end: real compute + a real 2-worker `python -m gateway`, every route over HTTP."""

from __future__ import annotations

import time

import httpx
import pytest
from google.rpc import code_pb2

from tests.conftest import wait_until


def test_get_item(http):
    response = http.get("/v1/items/item-1")
    assert response.status_code == 200
    body = response.json()
    assert body["id"] == "item-1" and len(body["vector"]) == 16
    assert abs(sum(v * v for v in body["vector"]) - 1.0) < 1e-4


def test_get_item_unknown_is_404(http):
    response = http.get("/v1/items/no-such-item")
    assert response.status_code == 404
    assert response.json()["error"]["status"] == "NOT_FOUND"


def test_search(http):
    item = http.get("/v1/items/item-7").json()
    response = http.post("/v1/search", json={"vector": item["vector"], "k": 3})
    assert response.status_code == 200
    hits = response.json()["hits"]
    assert len(hits) == 3 and hits[0]["id"] == "item-7" and abs(hits[0]["score"] - 1.0) < 1e-4
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)


def test_search_semantic_errors_come_from_compute(http):
    response = http.post("/v1/search", json={"vector": [1.0, 2.0], "k": 3})
    assert response.status_code == 400
    assert response.json()["error"]["status"] == "INVALID_ARGUMENT"


def test_get_stats(http):
    response = http.get("/v1/stats")
    assert response.status_code == 200
    stats = response.json()
    assert stats["cache"]["rows"] == "2000" and stats["cache"]["dim"] == 16  # int64 as a string
    assert isinstance(stats["pool"]["healthy"], bool) and "maxInflight" in stats["pool"]


def test_jobs_routes_are_served(http):
    """Every jobs RPC has its REST route (details in tests/jobs/test_rest.py)."""
    submit = http.post("/v1/jobs", json={"batchSearch": {"k": 1, "itemIds": ["item-1"]}})
    assert submit.status_code == 202, submit.text
    job_id = submit.json()["id"]
    assert submit.headers["location"] == f"/v1/jobs/{job_id}"
    assert http.get(f"/v1/jobs/{job_id}").status_code == 200
    # The one-item job may finish before the cancel: then FAILED_PRECONDITION (400).
    cancel = http.post(f"/v1/jobs/{job_id}:cancel")
    assert cancel.status_code in (200, 400), cancel.text
    for method, path in [("GET", "/v1/jobs"), ("GET", "/v1/jobs/none"), ("POST", "/v1/jobs/none:cancel")]:
        assert http.request(method, path).status_code in (200, 404)


def test_echo_transcodes_path_query_and_named_body(http):
    """Echo is in a test proto: its route exists with no gateway change (the extension model)."""
    payload = {"text": "héllo", "tags": ["a", "b"], "counts": {"x": 2}, "when": "2024-05-06T07:08:09.5Z", "blob": "AAEC"}
    response = http.post(
        "/v1/testing/echo/some%2Fname",
        params=[("big", "-9223372036854775808"), ("color", "RED"), ("numbers", "3"), ("numbers", "4"), ("flag", "true"), ("ratio", "0.25")],
        json=payload,
    )
    assert response.status_code == 200, response.text
    assert response.json() == {
        "name": "some/name",
        "big": "-9223372036854775808",
        "color": "RED",
        "numbers": [3, 4],
        "payload": payload | {"when": "2024-05-06T07:08:09.500Z"},
        "flag": True,
        "ratio": 0.25,
    }


EXPECTED = {
    "CANCELLED": 499, "UNKNOWN": 500, "INVALID_ARGUMENT": 400, "DEADLINE_EXCEEDED": 504, "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409, "PERMISSION_DENIED": 403, "UNAUTHENTICATED": 401, "RESOURCE_EXHAUSTED": 429,
    "FAILED_PRECONDITION": 400, "ABORTED": 409, "OUT_OF_RANGE": 400, "UNIMPLEMENTED": 501, "INTERNAL": 500,
    "UNAVAILABLE": 503, "DATA_LOSS": 500,
}


def test_every_grpc_code_is_mapped_for_real(http):
    assert set(EXPECTED) == set(code_pb2.Code.keys()) - {"OK"}
    for code, status in EXPECTED.items():
        response = http.get(f"/v1/testing/fail/{code}", headers={"X-Request-ID": f"fail-{code}"})
        assert response.status_code == status, (code, response.text)
        error = response.json()["error"]
        assert error == {"code": status, "status": code, "message": error["message"], "request_id": f"fail-{code}"}
        if code == "RESOURCE_EXHAUSTED":
            assert int(response.headers["retry-after"]) >= 1
        if status < 500 and code != "CANCELLED":
            assert error["message"] == f"failed on purpose with {code}"  # compute's own message passes through


def test_request_id_and_trace_reach_compute_logs(stack, http):
    compute, _ = stack
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    response = http.post(
        "/v1/testing/spin",
        json={"seconds": 0.01},
        headers={"X-Request-ID": "rid-roundtrip-1", "traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"},
    )
    assert response.status_code == 200 and response.json()["finished"] is True
    assert response.headers["x-request-id"] == "rid-roundtrip-1"

    def logged() -> list[dict]:
        return [r for r in compute.log_records() if r.get("request_id") == "rid-roundtrip-1"]

    wait_until(lambda: bool(logged()), 10, message="request id in compute's logs")
    traced = [r for r in logged() if r.get("traceparent")]
    assert traced and all(r["traceparent"].split("-")[1] == trace_id for r in traced)
    # The gateway is a hop of the trace: same trace id, its own span id.
    assert all(r["traceparent"].split("-")[2] != "00f067aa0ba902b7" for r in traced)


def test_client_deadline_header_gives_504(http):
    started = time.monotonic()
    response = http.post("/v1/testing/spin", json={"seconds": 5}, headers={"X-Request-Timeout": "0.3"})
    assert response.status_code == 504
    assert response.json()["error"]["status"] == "DEADLINE_EXCEEDED"
    assert time.monotonic() - started < 3


def _events(text: str) -> list[dict[str, str]]:
    events = []
    for block in text.strip().split("\n\n"):
        fields = {}
        for line in block.splitlines():
            if line.startswith(":"):
                continue
            key, _, value = line.partition(": ")
            fields[key] = value
        if fields:
            events.append(fields)
    return events


def test_server_stream_as_sse(http):
    with http.stream("GET", "/v1/testing/ticks/4", params={"interval_ms": 5}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        text = response.read().decode()
    events = _events(text)
    assert [e["id"] for e in events] == ["1", "2", "3", "4"]
    assert [e["data"] for e in events] == [f'{{"index":{i}}}' for i in range(1, 5)]


def test_sse_resumes_from_last_event_id(http):
    response = http.get("/v1/testing/ticks/5", headers={"Last-Event-ID": "3"})
    assert [e["id"] for e in _events(response.text)] == ["4", "5"]


def test_sse_errors_before_the_first_event_keep_their_status(http):
    assert http.get("/v1/testing/ticks/x").status_code == 400
    assert http.get("/v1/testing/ticks/3", headers={"Last-Event-ID": "abc"}).status_code == 400


def test_sse_deadline_mid_stream_ends_with_an_error_event(http):
    response = http.get("/v1/testing/ticks/100", params={"interval_ms": 100}, headers={"X-Request-Timeout": "0.35"})
    assert response.status_code == 200
    events = _events(response.text)
    assert events[-1]["event"] == "error" and '"DEADLINE_EXCEEDED"' in events[-1]["data"]
    assert 1 <= len(events) - 1 < 10


def test_metrics_aggregate_all_workers(http):
    for _ in range(6):
        http.get("/v1/items/item-2")
    text = http.get("/metrics").text
    assert 'offload_gateway_requests_total{rpc="GetItem",status="200"}' in text
    assert "offload_loop_lag_seconds_bucket" in text


def test_malformed_input_over_the_wire(stack):
    _, gateway = stack
    # A chunked body with no Content-Length, over the limit: 413 while reading, not 500.
    big = (b"[" + b"0.5," * (3 * 1024 * 1024) + b"0.5]")

    def chunks():
        for start in range(0, len(big), 65536):
            yield big[start:start + 65536]

    with httpx.Client(base_url=gateway.url, timeout=10) as client:
        response = client.post("/v1/search", content=chunks(), headers={"content-type": "application/json"})
        assert response.status_code == 413
        assert client.post("/v1/search", content=b'{"vector": [1, 2', headers={"content-type": "application/json"}).status_code == 400
        assert client.post("/v1/search", content=b"\xff\xfe", headers={"content-type": "application/json"}).status_code == 400
        assert client.post("/v1/search", data={"a": "b"}).status_code == 415


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/openapi.json", "/docs", "/metrics"])
def test_admin_routes(http, path):
    response = http.get(path)
    assert response.status_code == 200 and response.headers["x-request-id"]
