"""The assembled app in-process, with no compute: OpenAPI, admin routes, error mapping, limits."""

from __future__ import annotations

import warnings

import grpc
import pytest

with warnings.catch_warnings():
    # Starlette would rather have httpx2; the httpx in the lock works fine for this.
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

from gateway.app import create_app
from gateway.errors import from_rpc_error, http_status_for
from gateway.settings import GatewaySettings
from tests.gateway.conftest import TEST_PROTO_MODULES


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    sock = tmp_path_factory.mktemp("nocompute") / "absent.sock"
    settings = GatewaySettings(
        compute_address=f"unix:{sock}", extra_proto_modules=TEST_PROTO_MODULES, max_body_bytes=1024, _env_file=None
    )
    return create_app(settings)


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def _refs(node, found):
    if isinstance(node, dict):
        if "$ref" in node:
            found.add(node["$ref"].rsplit("/", 1)[1])
        for value in node.values():
            _refs(value, found)
    elif isinstance(node, list):
        for value in node:
            _refs(value, found)
    return found


def test_openapi_is_generated_from_the_descriptors(client):
    doc = client.get("/openapi.json").json()
    paths = doc["paths"]
    item = paths["/v1/items/{id}"]["get"]
    assert item["operationId"] == "ComputeService_GetItem"
    assert {
        "name": "id", "in": "path", "required": True, "schema": {"type": "string", "minLength": 1, "maxLength": 256},
        "description": 'The item\'s id, e.g. "item-42".',
    } in item["parameters"]
    assert item["responses"]["200"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/offload.v1.Item"}
    for code in ("400", "404", "429", "500", "501", "503", "504"):
        assert item["responses"][code]["content"]["application/json"]["schema"]["$ref"].endswith("offload.Error")
    schemas = doc["components"]["schemas"]
    assert schemas["offload.v1.Item"]["properties"] == {
        "id": {"type": "string"},
        "vector": {
            "type": "array",
            "items": {"type": "number", "format": "float", "minimum": -3.4028234663852886e38, "maximum": 3.4028234663852886e38},
            "description": "The unit-length vector (dim values).",
        },
    }
    search = paths["/v1/search"]["post"]
    assert search["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/offload.v1.SearchRequest"}
    assert "413" in search["responses"] and "415" in search["responses"]
    # Jobs: 202 + Location from the custom option, int64 as string, enums by name, Timestamp.
    submit = paths["/v1/jobs"]["post"]
    assert "202" in submit["responses"] and "Location" in submit["responses"]["202"]["headers"]
    job = schemas["offload.v1.Job"]["properties"]
    assert job["resultCount"]["type"] == "string" and job["resultCount"]["format"] == "int64"
    assert job["state"]["anyOf"][0]["enum"][:2] == ["JOB_STATE_UNSPECIFIED", "QUEUED"]  # names, or numbers:
    assert job["state"]["anyOf"][1] == {"type": "integer", "enum": [0, 1, 2, 3, 4, 5]}
    assert job["createTime"] == {"type": "string", "format": "date-time"}
    # Query parameters of a GET, repeated ones exploded; the path variable excluded from the body.
    list_params = {p["name"]: p for p in paths["/v1/jobs"]["get"]["parameters"]}
    assert {"page_size", "page_token", "state"} <= set(list_params)
    echo = paths["/v1/testing/echo/{name}"]["post"]
    echo_params = {p["name"]: p for p in echo["parameters"]}
    assert echo_params["numbers"]["schema"]["type"] == "array" and echo_params["numbers"]["explode"] is True
    assert echo["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/offload.testing.v1.Payload"}
    cancel = paths["/v1/jobs/{id}:cancel"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert "id" not in cancel["properties"]
    assert "text/event-stream" in paths["/v1/jobs/{id}/events"]["get"]["responses"]["200"]["content"]
    # Admin routes are in the same document, and every $ref resolves.
    assert {"/healthz", "/readyz", "/metrics"} <= set(paths)
    assert _refs(doc, set()) <= set(schemas)


def test_docs_page(client):
    response = client.get("/docs")
    assert response.status_code == 200 and "swagger" in response.text.lower()


def test_healthz_and_not_ready_without_compute(client):
    assert client.get("/healthz").status_code == 200
    ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.json()["compute"] is False


def test_call_without_compute_fails_fast_with_503(client):
    response = client.get("/v1/items/x", headers={"X-Request-Timeout": "20"})
    assert response.status_code == 503
    body = response.json()["error"]
    assert body["status"] == "UNAVAILABLE" and "sock" not in body["message"]
    assert response.headers["retry-after"] == "1"
    assert response.elapsed.total_seconds() < 5


def test_request_id_is_echoed_or_generated(client):
    response = client.get("/healthz", headers={"X-Request-ID": "abc-123"})
    assert response.headers["x-request-id"] == "abc-123"
    generated = client.get("/nowhere")
    assert generated.status_code == 404 and len(generated.headers["x-request-id"]) == 16
    assert generated.json()["error"]["request_id"] == generated.headers["x-request-id"]
    unsafe = client.get("/healthz", headers={"X-Request-ID": "bad id\twith spaces"})
    assert unsafe.headers["x-request-id"] != "bad id\twith spaces"


@pytest.mark.parametrize(
    "method, path, kwargs, status, fragment",
    [
        ("POST", "/v1/search", {"content": b"{}", "headers": {"content-type": "text/plain"}}, 415, "application/json"),
        ("POST", "/v1/search", {"content": b"{", "headers": {"content-type": "application/json"}}, 400, "malformed JSON"),
        ("POST", "/v1/search", {"json": {"vector": [1], "extra": 1}}, 400, "'extra': unknown field"),
        ("POST", "/v1/search", {"json": {"k": "x"}}, 400, "'k': expected an integer"),
        ("POST", "/v1/search", {"json": {"vector": [0.5] * 400}}, 413, "larger than 1024"),
        ("GET", "/v1/items/x", {"headers": {"X-Request-Timeout": "soon"}}, 400, "X-Request-Timeout"),
        ("GET", "/v1/items/x", {"headers": {"X-Request-Timeout": "-1"}}, 400, "X-Request-Timeout"),
        ("GET", "/v1/items/x", {"headers": {"X-Request-Timeout": "3601"}}, 400, "at most 3600 seconds"),
        ("GET", "/v1/items/x", {"params": {"bogus": "1"}}, 400, "unknown query parameter 'bogus'"),
        ("DELETE", "/v1/items/x", {}, 405, "not allowed"),
        ("GET", "/v1/testing/ticks/abc", {}, 400, "'count': expected an integer"),
    ],
)
def test_malformed_input_is_a_4xx_naming_the_problem(client, method, path, kwargs, status, fragment):
    response = client.request(method, path, **kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert fragment in error["message"]
    assert error["code"] == status and error["request_id"] == response.headers["x-request-id"]
    assert "Traceback" not in response.text


def test_chunked_body_over_the_limit_is_413(client):
    def chunks():
        for _ in range(20):
            yield b" " * 100

    response = client.post("/v1/search", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413


def test_metrics_are_exposed(client):
    client.get("/v1/items/x")
    text = client.get("/metrics").text
    assert "offload_gateway_requests_total" in text and "offload_loop_lag_seconds_bucket" in text


# -- the one error mapping --------------------------------------------------------------------


@pytest.mark.parametrize(
    "code, status",
    [
        ("CANCELLED", 499), ("UNKNOWN", 500), ("INVALID_ARGUMENT", 400), ("DEADLINE_EXCEEDED", 504),
        ("NOT_FOUND", 404), ("ALREADY_EXISTS", 409), ("PERMISSION_DENIED", 403), ("UNAUTHENTICATED", 401),
        ("RESOURCE_EXHAUSTED", 429), ("FAILED_PRECONDITION", 400), ("ABORTED", 409), ("OUT_OF_RANGE", 400),
        ("UNIMPLEMENTED", 501), ("INTERNAL", 500), ("UNAVAILABLE", 503), ("DATA_LOSS", 500),
    ],
)
def test_grpc_code_to_http(code, status):
    assert http_status_for(getattr(grpc.StatusCode, code)) == status


def test_library_messages_are_not_leaked_and_retry_after_is_kept():
    leaky = grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                 details="failed to connect to all addresses; last error: unix:/run/secret.sock")
    assert "secret" not in from_rpc_error(leaky).message
    busy = grpc.aio.AioRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.aio.Metadata(),
                                grpc.aio.Metadata(("retry-after", "7")), details="pool busy")
    error = from_rpc_error(busy)
    assert (error.http_status, error.message, error.headers) == (429, "pool busy", [(b"retry-after", b"7")])


def test_settings_refuse_plaintext_to_a_remote_compute():
    with pytest.raises(ValueError, match="non-loopback"):
        GatewaySettings(compute_address="10.1.2.3:50051", _env_file=None)
    assert GatewaySettings(compute_address="unix:/tmp/x.sock", _env_file=None).compute_address == "unix:/tmp/x.sock"


def test_the_launcher_imports_no_prometheus_client_before_setting_its_directory():
    """prometheus_client picks its storage at import: imported before PROMETHEUS_MULTIPROC_DIR is
    set, a one-worker gateway (served in the launcher's process) would report empty metrics."""
    import subprocess
    import sys

    code = "import sys, gateway.__main__; print('prometheus_client' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "False", result.stderr
