"""Batching through a real multi-worker gateway: per request, the same answers as plain unary.

Module processes (left as found by every test that uses them):
- `compute`, at DEBUG level (one "call done" log line per call, with the request id);
- `batched`: 2 uvicorn workers, batching on, no window (the same loop iteration only);
- `plain`: 1 worker, batching off: the baseline every batched answer is compared with;
- `windowed`: 1 worker, batch_window_seconds=0.1, so requests sent together share a batch.
Which transport a call took is read from the metrics: compute's offload_compute_batch_calls
(items that came in a Dispatch) against offload_compute_calls (every call).
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import httpx
import orjson
import psutil
import pytest
from google.rpc import code_pb2

from tests.conftest import ComputeLauncher, ComputeProcess, kill_orphans, metric_sample, wait_until
from tests.gateway.conftest import GatewayLauncher, GatewayProcess

# google/rpc/code.proto's "HTTP Mapping" lines (CANCELLED: 499, the de-facto client-closed code).
HTTP_FOR_CODE = {
    "CANCELLED": 499, "UNKNOWN": 500, "INVALID_ARGUMENT": 400, "DEADLINE_EXCEEDED": 504, "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409, "PERMISSION_DENIED": 403, "UNAUTHENTICATED": 401, "RESOURCE_EXHAUSTED": 429,
    "FAILED_PRECONDITION": 400, "ABORTED": 409, "OUT_OF_RANGE": 400, "UNIMPLEMENTED": 501, "INTERNAL": 500,
    "UNAVAILABLE": 503, "DATA_LOSS": 500,
}


# -- processes -----------------------------------------------------------------------------------


@dataclass
class Stack:
    compute: ComputeProcess
    batched: GatewayProcess
    plain: GatewayProcess
    windowed: GatewayProcess


def start_all(gateways: list[GatewayProcess]) -> None:
    """Start gateways side by side (each start waits for /readyz)."""
    errors: list[BaseException] = []

    def start(gateway: GatewayProcess) -> None:
        try:
            gateway.start()
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(g,)) for g in gateways]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("batching")
    computes, gateways = ComputeLauncher(workdir), GatewayLauncher(workdir)
    try:
        # Block holds compute's loop on purpose for up to 1 s: not a stall worth reporting here.
        compute = computes(log_level="DEBUG", stall_threshold=3)
        stack = Stack(
            compute,
            batched=gateways(compute.address, start=False, workers=2),
            plain=gateways(compute.address, start=False, workers=1, batching=False),
            windowed=gateways(compute.address, start=False, workers=1, batch_window_seconds=0.1),
        )
        start_all([stack.batched, stack.plain, stack.windowed])
        for gateway in (stack.batched, stack.windowed):
            wait_until(lambda: all_batched(gateway, compute), 20, 0.1, f"every worker of {gateway.url} batching")
        yield stack
    finally:
        gateways.close()
        computes.close()


# -- helpers -------------------------------------------------------------------------------------


def compute_metrics(compute: ComputeProcess) -> str:
    return compute.metrics_text()


def gateway_metrics(gateway: GatewayProcess) -> str:
    return httpx.get(gateway.url + "/metrics", timeout=5).text


class Delta:
    """The change of metric samples since construction."""

    def __init__(self, fetch: Callable[[], str]) -> None:
        self.fetch = fetch
        self.before = fetch()

    def __call__(self, name: str, **labels: str) -> float:
        return metric_sample(self.fetch(), name, **labels) - metric_sample(self.before, name, **labels)


def compute_delta(compute: ComputeProcess) -> Delta:
    return Delta(lambda: compute_metrics(compute))


def gateway_delta(gateway: GatewayProcess) -> Delta:
    return Delta(lambda: gateway_metrics(gateway))


def all_batched(gateway: GatewayProcess, compute: ComputeProcess, n: int = 8) -> bool:
    """True when n GETs on fresh connections (so: any worker) all reached compute in a Dispatch."""
    delta = compute_delta(compute)
    for _ in range(n):
        assert httpx.get(gateway.url + "/v1/stats", timeout=5).status_code == 200
    return delta("offload_compute_batch_calls_sum") == n == delta("offload_compute_calls_total", method="GetStats")


def fresh(gateway: GatewayProcess, method: str, path: str, **kwargs) -> httpx.Response:
    """One request on a new connection: whichever worker accepts it serves it."""
    return httpx.request(method, gateway.url + path, timeout=kwargs.pop("timeout", 15), **kwargs)


def together(requests: list[Callable[[], httpx.Response]]) -> list[httpx.Response]:
    """Send requests at (nearly) the same moment, one thread and connection each."""
    barrier = threading.Barrier(len(requests))
    results: list[Any] = [None] * len(requests)

    def run(index: int) -> None:
        barrier.wait()
        try:
            results[index] = requests[index]()
        except BaseException as exc:  # noqa: BLE001 - reported by the caller
            results[index] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results


def log_lines(text: str, **fields) -> list[dict]:
    lines = []
    for line in text.splitlines():
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if isinstance(record, dict) and all(record.get(k) == v for k, v in fields.items()):
            lines.append(record)
    return lines


def raw_request(method: str, path: str, request_id: str, body: bytes = b"") -> bytes:
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"X-Request-ID: {request_id}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def comparable(response: httpx.Response) -> tuple:
    return (
        response.status_code,
        response.json(),
        response.headers.get("x-request-id"),
        response.headers.get("retry-after"),
        response.headers.get("content-type"),
    )


def busy(gateway: GatewayProcess) -> int:
    return fresh(gateway, "GET", "/v1/stats").json()["pool"]["busy"]


# -- statuses ------------------------------------------------------------------------------------


def test_every_status_code_maps_to_its_http_status_through_dispatch(stack):
    assert set(HTTP_FOR_CODE) == set(code_pb2.Code.keys()) - {"OK"}
    compute = stack.compute

    def fail(gateway: GatewayProcess, code: str) -> httpx.Response:
        return fresh(gateway, "GET", f"/v1/testing/fail/{code}", headers={"X-Request-ID": f"fail-{code}"})

    delta = compute_delta(compute)
    batched = {code: fail(stack.batched, code) for code in HTTP_FOR_CODE}
    fails = delta("offload_compute_calls_total", method="Fail")
    # One call per code, and the UNAVAILABLE one (a GET: idempotent) tried 3 times.
    assert fails == len(HTTP_FOR_CODE) + 2
    assert delta("offload_compute_batch_calls_sum") == fails, "every Fail call reached compute inside a Dispatch"
    assert delta("offload_compute_calls_total", method="Fail", code="UNAVAILABLE") == 3

    for code, response in batched.items():
        status = HTTP_FOR_CODE[code]
        assert response.status_code == status, (code, response.text)
        assert response.headers["x-request-id"] == f"fail-{code}"
        assert response.headers["content-type"].startswith("application/json")
        error = response.json()["error"]
        assert error == {"code": status, "status": code, "message": error["message"], "request_id": f"fail-{code}"}
        if code == "RESOURCE_EXHAUSTED":
            assert int(response.headers["retry-after"]) >= 1
        if status < 500 and code != "CANCELLED":
            assert error["message"] == f"failed on purpose with {code}"

    # The same requests through a gateway that does not batch: identical responses.
    delta = compute_delta(compute)
    for code, response in batched.items():
        assert comparable(fail(stack.plain, code)) == comparable(response), code
    assert delta("offload_compute_calls_total", method="Fail") == fails
    assert delta("offload_compute_batch_calls_count") == 0, "the baseline is plain unary"


def test_answers_are_identical_to_plain_unary(stack):
    requests = [
        ("GET", "/v1/items/item-42", {}),
        ("GET", "/v1/items/no-such-item", {}),
        ("GET", "/v1/items/" + "x" * 300, {}),
        ("POST", "/v1/testing/echo/some%2Fname", {"json": {"text": "héllo", "tags": ["a"], "counts": {"x": 2}}}),
        ("POST", "/v1/testing/echo/n", {"json": {"unknownField": 1}}),  # rejected by the gateway itself
        ("POST", "/v1/testing/block", {"json": {"seconds": -1}}),  # a bug in the operation: 500
        ("GET", "/v1/testing/fail/OK", {}),
    ]
    delta = compute_delta(stack.compute)
    for number, (method, path, kwargs) in enumerate(requests):
        headers = {"X-Request-ID": f"same-{number}"}
        batched = fresh(stack.batched, method, path, headers=headers, **kwargs)
        plain = fresh(stack.plain, method, path, headers=headers, **kwargs)
        assert comparable(batched) == comparable(plain), (method, path, batched.text, plain.text)
    assert [fresh(stack.batched, m, p, **k).status_code for m, p, k in requests] == [200, 404, 400, 200, 400, 500, 400]
    # 6 requests reach compute per round (the unknown field never does), 3 rounds, one batched.
    assert delta("offload_compute_batch_calls_sum") == 12
    assert delta("offload_compute_calls_total") == 18


# -- deadlines -----------------------------------------------------------------------------------


def test_a_late_item_gets_504_while_its_batch_neighbours_get_200(stack):
    """One batch (1 worker, 0.1 s window): Block 1 s with X-Request-Timeout 0.3 -> 504 at its
    deadline; GetItem and Echo with the default deadline, sharing its batch -> 200."""
    gateway, compute = stack.windowed, stack.compute
    expected_item = fresh(stack.plain, "GET", "/v1/items/item-8").json()
    expected_echo = fresh(stack.plain, "POST", "/v1/testing/echo/neighbour", json={"text": "hi"}).json()

    def block() -> httpx.Response:
        started = time.monotonic()
        response = httpx.post(
            gateway.url + "/v1/testing/block", json={"seconds": 1.0},
            headers={"X-Request-Timeout": "0.3", "X-Request-ID": "late-block"}, timeout=15,
        )
        response.elapsed_seconds = time.monotonic() - started
        return response

    def get_item() -> httpx.Response:
        return httpx.get(gateway.url + "/v1/items/item-8", headers={"X-Request-ID": "neighbour-item"}, timeout=15)

    def echo() -> httpx.Response:
        return httpx.post(gateway.url + "/v1/testing/echo/neighbour", json={"text": "hi"}, timeout=15)

    for attempt in range(5):
        gateway_batches, calls = gateway_delta(gateway), compute_delta(compute)
        late, item, echoed = together([block, get_item, echo])
        assert late.status_code == 504, late.text
        assert late.json()["error"] == {
            "code": 504, "status": "DEADLINE_EXCEEDED", "request_id": "late-block",
            "message": "the request deadline expired before compute answered",
        }
        assert late.elapsed_seconds < 0.9, f"504 after {late.elapsed_seconds:.2f}s: the batch's time, not its own"
        assert item.status_code == 200 and item.json() == expected_item
        assert echoed.status_code == 200 and echoed.json() == expected_echo
        assert calls("offload_compute_calls_total", method="Block", code="OK") == 1  # compute did run it
        if gateway_batches("offload_gateway_batch_calls_count") == 1 and gateway_batches("offload_gateway_batch_calls_sum") == 3:
            break  # the three shared one batch: what this test is about
    else:
        pytest.fail("the three concurrent requests never shared a batch")
    print(f"shared a batch on attempt {attempt + 1}")


def test_a_deadline_shorter_than_the_batch_window_is_still_answered(stack):
    headers = {"X-Request-Timeout": "0.05"}
    assert fresh(stack.plain, "GET", "/v1/items/item-2", headers=headers).status_code == 200
    response = fresh(stack.windowed, "GET", "/v1/items/item-2", headers=headers)
    assert response.status_code == 200, response.text  # the batch left at once, not after the window


# -- disconnects ---------------------------------------------------------------------------------


def test_a_client_gone_before_its_batch_left_is_never_sent(stack):
    gateway, compute = stack.windowed, stack.compute
    # Control: an Echo that does reach compute is seen there, by its request id.
    assert fresh(gateway, "POST", "/v1/testing/echo/control", json={"text": "x"},
                 headers={"X-Request-ID": "echo-control"}).status_code == 200
    wait_until(lambda: log_lines(compute.log_text(), msg="call done", request_id="echo-control"), 5, message="control")

    calls, requests = compute_delta(compute), gateway_delta(gateway)
    body = orjson.dumps({"text": "bye"})
    for attempt in range(1, 6):
        request_id = f"echo-gone-{attempt}"
        with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as sock:
            sock.sendall(raw_request("POST", "/v1/testing/echo/gone", request_id, body))
        wait_until(
            lambda: requests("offload_gateway_requests_total", rpc="Echo", status="499") == attempt,
            10, message="the gateway counting the request as 499",
        )
        cancelled = log_lines(gateway.log_text(), msg="client disconnected; compute call cancelled", request_id=request_id)
        if cancelled:  # else uvicorn saw the close before the body was read: not this test's path
            print(f"disconnect reached the queued call on attempt {attempt}")
            break
    else:
        pytest.fail("the disconnect never reached a queued call")
    # A sentinel through the same worker and channel, after the disconnect: once compute has
    # run it, a batch carrying the gone call would have been run too.
    assert fresh(gateway, "POST", "/v1/testing/echo/after", json={"text": "x"},
                 headers={"X-Request-ID": "echo-after"}).status_code == 200
    wait_until(lambda: log_lines(compute.log_text(), msg="call done", request_id="echo-after"), 5, message="sentinel")
    assert calls("offload_compute_calls_total", method="Echo") == 1, "only the sentinel ran"
    assert not [r for r in compute.log_records() if str(r.get("request_id", "")).startswith("echo-gone-")]


def test_a_client_gone_after_its_call_was_sent_stops_the_pool_work(stack):
    gateway, compute = stack.batched, stack.compute
    calls = compute_delta(compute)
    body = orjson.dumps({"seconds": 30})
    sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=5)
    try:
        sock.sendall(raw_request("POST", "/v1/testing/spin", "spin-gone", body))
        wait_until(lambda: busy(gateway) == 1, 15, 0.05, "the spin running in a pool worker")
    finally:
        sock.close()
    closed = time.monotonic()
    wait_until(lambda: busy(gateway) == 0, 15, 0.01, "the pool freed by the cancel")
    stopped_after = time.monotonic() - closed
    print(f"spin stopped {stopped_after * 1000:.0f} ms after the disconnect")
    assert stopped_after < 5, "the 30 s spin was stopped, not waited for"
    wait_until(lambda: calls("offload_compute_calls_total", method="Spin", code="CANCELLED") == 1, 5,
               message="compute recording the spin as cancelled")
    assert log_lines(gateway.log_text(), msg="client disconnected; compute call cancelled", request_id="spin-gone")


# -- metrics -------------------------------------------------------------------------------------


def test_batch_metrics_are_exposed_by_gateway_and_compute(stack):
    gateway, compute = stack.batched, stack.compute
    gateway_batches, compute_batches = gateway_delta(gateway), compute_delta(compute)
    for _ in range(6):
        assert fresh(gateway, "GET", "/v1/items/item-3").status_code == 200
    # Summed over both workers' multiprocess files, and equal to what compute received.
    assert gateway_batches("offload_gateway_batch_calls_sum") == 6 == compute_batches("offload_compute_batch_calls_sum")
    assert gateway_batches("offload_gateway_batch_calls_count") == 6 == compute_batches("offload_compute_batch_calls_count")
    assert gateway_batches("offload_gateway_batch_wait_seconds_count") == 6
    assert compute_batches("offload_compute_batch_bytes_count") == 6 and compute_batches("offload_compute_batch_bytes_sum") > 0

    text = gateway_metrics(gateway)
    assert metric_sample(text, "offload_gateway_batch_calls_bucket", le="1.0") >= 6
    assert metric_sample(text, "offload_gateway_batch_calls_bucket", le="+Inf") == metric_sample(text, "offload_gateway_batch_calls_count")
    assert metric_sample(text, "offload_gateway_batch_wait_seconds_bucket", le="+Inf") >= 6
    assert metric_sample(text, "offload_gateway_batch_wait_seconds_sum") >= 0
    # The gateway that does not batch observes no batch.
    assert metric_sample(gateway_metrics(stack.plain), "offload_gateway_batch_calls_count") == 0
    ctext = compute_metrics(compute)
    for name in ("offload_compute_batch_calls_bucket", "offload_compute_batch_bytes_bucket"):
        assert metric_sample(ctext, name, le="+Inf") > 0, name


# -- compute restarting mid-batch ----------------------------------------------------------------


def test_compute_killed_mid_batch_then_restarted(compute_factory, gateway_factory):
    compute = compute_factory(stall_threshold=5, pool_size=1)
    gateway = gateway_factory(compute.address, workers=1, batch_window_seconds=0.1)
    wait_until(lambda: all_batched(gateway, compute, 3), 20, 0.1, "the gateway batching")
    descendants = psutil.Process(compute.pid).children(recursive=True)
    gateway_batches, compute_batches = gateway_delta(gateway), compute_delta(compute)
    long = {"X-Request-Timeout": "10"}

    def block() -> httpx.Response:
        return httpx.post(gateway.url + "/v1/testing/block", json={"seconds": 2}, headers=long, timeout=20)

    def get(path: str) -> Callable[[], httpx.Response]:
        return lambda: httpx.get(gateway.url + path, headers=long, timeout=20)

    results: list[httpx.Response] = []
    sender = threading.Thread(target=lambda: results.extend(together([block, get("/v1/items/item-1"), get("/v1/stats")])))
    sender.start()
    try:
        # Compute's metrics thread answers while its loop is held by the Block.
        wait_until(lambda: compute_batches("offload_compute_batch_calls_count") >= 1, 10, 0.02, "the batch in compute")
        assert compute_batches("offload_compute_batch_calls_sum") == 3, "Block and both GETs in one Dispatch"
        compute.kill()
        kill_orphans(descendants)
    finally:
        sender.join(30)
    assert len(results) == 3
    for response in results:
        assert response.status_code == 503, response.text
        assert response.json()["error"]["status"] == "UNAVAILABLE" and response.headers["retry-after"] == "1"
    # The batch (3 calls), then the 2 GETs retried twice each, in new batches; the POST never.
    assert gateway_batches("offload_gateway_batch_calls_sum") == 3 + 2 * 2

    # Still down: GETs keep failing fast with 503, after their retries.
    started = time.monotonic()
    assert fresh(gateway, "GET", "/v1/items/item-1", headers=long).status_code == 503
    assert time.monotonic() - started < 5

    # Same address, new process: GET routes answer again, the gateway never restarted.
    restarted = compute_factory(address=compute.address, pool_size=1)
    gateway.wait_status("/readyz", 200, timeout=20)
    wait_until(lambda: fresh(gateway, "GET", "/v1/items/item-1").status_code == 200, 15, 0.1, "GETs answered again")
    assert fresh(gateway, "GET", "/v1/stats").status_code == 200
    assert metric_sample(compute_metrics(restarted), "offload_compute_batch_calls_count") >= 1, "batched again"
    assert gateway.proc.poll() is None
