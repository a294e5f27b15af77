"""Limits before any work (431, 414), CORS for browser clients, and admin answers that tell
the truth (405 with Allow, /metrics as text)."""

from __future__ import annotations



def test_too_many_or_too_large_headers_get_431_with_the_error_body(stack):
    _, gateway = stack
    with gateway.client() as http:
        big = http.get("/v1/items/item-1", headers={"x-big": "a" * 20_000})
        assert big.status_code == 431
        assert big.json()["error"]["status"] == "INVALID_ARGUMENT"
        assert big.json()["error"]["message"] == "request headers larger than 16384 bytes"
        many = http.get("/v1/items/item-1", headers={f"x-h{i}": "v" * 20 for i in range(150)})
        assert many.status_code == 431 and "too many request headers" in many.json()["error"]["message"]
        assert many.headers["x-request-id"]
        fine = http.get("/v1/items/item-1", headers={f"x-h{i}": "v" * 20 for i in range(50)})
        assert fine.status_code == 200


def test_an_over_long_url_gets_414(stack):
    _, gateway = stack
    with gateway.client() as http:
        long = http.get("/v1/items/" + "x" * 9000)
        assert long.status_code == 414 and long.json()["error"]["message"] == "URL longer than 8192 bytes"
        query = http.get("/v1/jobs", params={"page_token": "y" * 9000})
        assert query.status_code == 414


def test_admin_405_carries_allow_and_metrics_are_documented_as_text(stack):
    _, gateway = stack
    with gateway.client() as http:
        response = http.post("/healthz")
        assert response.status_code == 405 and response.headers["allow"] == "GET"
        assert response.json()["error"]["code"] == 405
        generated = http.delete("/v1/search")  # a generated route: its methods
        assert generated.status_code == 405 and generated.headers["allow"] == "POST"
        doc = http.get("/openapi.json").json()
        assert list(doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain"]
        assert http.get("/metrics").headers["content-type"].startswith("text/plain")
        events = doc["paths"]["/v1/jobs/{id}/events"]["get"]["responses"]["200"]["content"]["text/event-stream"]
        assert events["schema"]["required"] == ["data"] and events["schema"]["properties"]["id"] == {"type": "string"}
        data = events["schema"]["properties"]["data"]
        assert data["contentMediaType"] == "application/json"
        assert data["contentSchema"]["anyOf"][0] == {"$ref": "#/components/schemas/offload.v1.JobEvent"}
        timeout = next(p for p in doc["paths"]["/v1/search"]["post"]["parameters"] if p["name"] == "X-Request-Timeout")
        assert timeout["schema"] == {"type": "number", "exclusiveMinimum": 0, "maximum": 3600.0}


def test_cors_is_off_by_default_and_answers_browsers_when_configured(stack, gateway_factory):
    compute, gateway = stack
    origin = {"origin": "https://app.example"}
    with gateway.client() as http:
        assert "access-control-allow-origin" not in http.get("/v1/items/item-1", headers=origin).headers

    cors = gateway_factory(compute.address, cors_allow_origins="https://app.example")  # plain text list
    with cors.client() as http:
        preflight = http.options(
            "/v1/search",
            headers={**origin, "access-control-request-method": "POST", "access-control-request-headers": "content-type"},
        )
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "https://app.example"
        assert "POST" in preflight.headers["access-control-allow-methods"]
        response = http.get("/v1/items/item-1", headers=origin)
        assert response.status_code == 200 and response.headers["access-control-allow-origin"] == "https://app.example"
        assert "x-request-id" in response.headers["access-control-expose-headers"]
        other = http.get("/v1/items/item-1", headers={"origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers
