"""Tracing across every process: a real gateway and compute export over OTLP/HTTP, configured
only with the standard OTEL_* variables, to a real receiver on loopback (an HTTP server in
this test, decoding the OTLP protobuf). One request must give one trace: gateway -> compute ->
pool task, each span the parent of the next, with the request id on each."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from bench.otlp_sink import OtlpSink
from offload.tracing import Tracing, enabled_exporters
from tests.conftest import ComputeLauncher, wait_until
from tests.gateway.conftest import GatewayLauncher

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


@dataclass(frozen=True)
class Span:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    attributes: dict
    start: int
    end: int
    error: bool


class Collector:
    """The spans an OTLP/HTTP sink on loopback receives (bench/otlp_sink.py), decoded."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.sink = OtlpSink(on_export=lambda body: self.add(ExportTraceServiceRequest.FromString(body))).start()
        self.endpoint = self.sink.endpoint

    def add(self, request: ExportTraceServiceRequest) -> None:
        for resource_spans in request.resource_spans:
            service = next(a.value.string_value for a in resource_spans.resource.attributes if a.key == "service.name")
            for scope_spans in resource_spans.scope_spans:
                for s in scope_spans.spans:
                    attributes = {a.key: getattr(a.value, a.value.WhichOneof("value")) for a in s.attributes}
                    self.spans.append(Span(service, s.name, s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex(),
                                           attributes, s.start_time_unix_nano, s.end_time_unix_nano, s.status.code == 2))

    def of_request(self, request_id: str) -> list[Span]:
        return [s for s in self.spans if s.attributes.get("offload.request_id") == request_id]

    def close(self) -> None:
        self.sink.stop()


OTEL = {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf", "OTEL_BSP_SCHEDULE_DELAY": "50"}


@pytest.fixture(scope="module")
def traced(tmp_path_factory) -> Iterator[tuple[Collector, str]]:
    collector = Collector()
    workdir = tmp_path_factory.mktemp("tracing")
    computes, gateways = ComputeLauncher(workdir), GatewayLauncher(workdir)
    env = {**OTEL, "OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint}
    try:
        compute = computes(start=False, jobs_chunk_queries=4)
        compute.env.update(env)
        compute.start()
        gateway = gateways(compute.address, start=False, workers=2)
        gateway.env.update(env)
        gateway.start()
        yield collector, gateway.url
    finally:
        gateways.close()
        computes.close()
        collector.close()


def test_one_request_is_one_trace_from_gateway_to_pool_worker(traced):
    collector, url = traced
    vector = httpx.get(f"{url}/v1/items/item-7", timeout=10).json()["vector"]
    headers = {"x-request-id": "trace-search-1", "traceparent": f"00-{TRACE_ID}-{CALLER_SPAN}-01"}
    response = httpx.post(f"{url}/v1/search", json={"vector": vector, "k": 3}, headers=headers, timeout=10)
    assert response.status_code == 200

    def complete() -> bool:
        names = {s.name for s in collector.of_request("trace-search-1")}
        return {"POST /v1/search", "offload.v1.ComputeService.Search", "pool Search"} <= names

    wait_until(complete, 15, 0.05, "the gateway, compute and pool spans")
    spans = collector.of_request("trace-search-1")
    assert {s.trace_id for s in spans} == {TRACE_ID}  # the caller's trace, continued
    [http_span] = [s for s in spans if s.name == "POST /v1/search"]
    [rpc_span] = [s for s in spans if s.name == "offload.v1.ComputeService.Search"]
    pool_spans = [s for s in spans if s.name == "pool Search"]
    assert http_span.service == "offload-gateway" and rpc_span.service == "offload-compute"
    assert http_span.parent_id == CALLER_SPAN
    assert rpc_span.parent_id == http_span.span_id
    assert pool_spans and all(p.parent_id == rpc_span.span_id and p.service == "offload-compute" for p in pool_spans)
    assert all("process.pid" in p.attributes for p in pool_spans)  # timed by the worker that ran it
    assert http_span.start <= rpc_span.start <= min(p.start for p in pool_spans)
    assert max(p.end for p in pool_spans) <= rpc_span.end <= http_span.end
    assert http_span.attributes["http.response.status_code"] == 200 and http_span.attributes["http.route"] == "/v1/search"
    assert rpc_span.attributes["rpc.grpc.status_code"] == 0 and not rpc_span.error


def test_batched_light_calls_and_errors_get_their_own_spans(traced):
    collector, url = traced
    for i in range(3):
        assert httpx.get(f"{url}/v1/items/item-{i}", headers={"x-request-id": f"trace-get-{i}"}, timeout=10).status_code == 200
    assert httpx.get(f"{url}/v1/items/nope", headers={"x-request-id": "trace-missing"}, timeout=10).status_code == 404
    wait_until(lambda: all(len(collector.of_request(r)) == 2 for r in ("trace-get-0", "trace-get-1", "trace-get-2", "trace-missing")),
               15, 0.05, "two spans per GetItem")
    for request_id in ("trace-get-0", "trace-get-1", "trace-get-2"):
        http_span, rpc_span = sorted(collector.of_request(request_id), key=lambda s: s.start)
        assert rpc_span.parent_id == http_span.span_id and rpc_span.trace_id == http_span.trace_id
        assert http_span.parent_id == ""  # no caller traceparent: the gateway starts the trace
    missing = {s.service: s for s in collector.of_request("trace-missing")}
    assert missing["offload-compute"].error and missing["offload-compute"].attributes["rpc.grpc.status_code"] == 5
    assert not missing["offload-gateway"].error  # a 404 is the client's, not a server error
    assert missing["offload-gateway"].attributes["http.response.status_code"] == 404


def test_a_job_s_chunks_are_in_its_submit_s_trace(traced):
    collector, url = traced
    body = {"batchSearch": {"k": 2, "itemIds": [f"item-{i}" for i in range(10)]}}  # 3 chunks of 4
    job = httpx.post(f"{url}/v1/jobs", json=body, headers={"x-request-id": "trace-job"}, timeout=10).json()

    def chunks() -> list[Span]:
        return [s for s in collector.of_request("trace-job") if s.name == "job chunk batch_search"]

    wait_until(lambda: len(chunks()) == 3, 20, 0.05, "three chunk spans")
    spans = collector.of_request("trace-job")
    [submit] = [s for s in spans if s.name == "offload.v1.ComputeService.SubmitJob"]
    assert {s.trace_id for s in spans} == {submit.trace_id}
    assert all(c.parent_id == submit.span_id and c.attributes["offload.job.id"] == job["id"] for c in chunks())
    wait_until(lambda: len([s for s in collector.of_request("trace-job") if s.name.startswith("pool ")]) == 3, 10, 0.05, "pool spans")
    pool = [s for s in collector.of_request("trace-job") if s.name.startswith("pool ")]
    assert {p.parent_id for p in pool} == {c.span_id for c in chunks()}


def test_off_unless_asked_and_unknown_exporters_are_refused():
    assert enabled_exporters({}) == [] and Tracing.from_env("x", {}) is None
    assert enabled_exporters({"OTEL_TRACES_EXPORTER": "none"}) == []
    assert enabled_exporters({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}) == []
    assert enabled_exporters({"OTEL_TRACES_EXPORTER": "otlp,console"}) == ["otlp", "console"]
    with pytest.raises(ValueError, match="zipkin"):
        enabled_exporters({"OTEL_TRACES_EXPORTER": "zipkin"})


def test_off_means_not_even_imported():
    """Tracing off costs nothing: neither OpenTelemetry's SDK nor an exporter is imported by
    compute or the gateway's app (FastAPI imports the API package itself), nor httpx by compute
    while webhooks are off."""
    import subprocess
    import sys

    from tests.conftest import ROOT, clean_env

    code = (
        "import sys\n"
        "import compute.server, gateway.prefork\n"
        "from gateway.app import create_app\n"
        "from offload.tracing import Tracing\n"
        "create_app()\n"
        "assert Tracing.from_env('x') is None\n"
        "print(sorted({m for m in sys.modules if m.startswith(('opentelemetry.sdk', 'opentelemetry.exporter', 'httpx'))}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
