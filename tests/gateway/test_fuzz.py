"""A small property-based fuzz of the generated routes through the real gateway and compute.

Inputs are drawn from /openapi.json (real field names, so requests get past the unknown-field
check and reach compute) mixed with junk. Whatever comes in, the answer is a mapped status:
never a 500, never a stack trace, always the AIP-193 body on errors.
"""

from __future__ import annotations

import json
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

# Routes that burn CPU, block the loop, kill workers or fail on purpose are not fuzzed, nor
# LoadTable: it would swap the table the other examples read (tests/compute/test_table_swap.py).
SKIP = {"Spin", "Block", "Crash", "Fail", "Ticks", "WatchJob", "LoadTable"}
ALLOWED = {200, 202, 400, 404, 405, 409, 413, 415, 429, 501}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=20,
)


@pytest.fixture(scope="module")
def operations(http):
    doc = http.get("/openapi.json").json()
    ops = []
    for path, methods in doc["paths"].items():
        for method, op in methods.items():
            if not path.startswith("/v1/") or op["summary"] in SKIP:
                continue
            body_schema = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
            if body_schema and "$ref" in body_schema:
                body_schema = doc["components"]["schemas"][body_schema["$ref"].rsplit("/", 1)[1]]
            fields = sorted((body_schema or {}).get("properties", {}))
            query = [p["name"] for p in op["parameters"] if p["in"] == "query"]
            ops.append((method.upper(), path, fields, query))
    assert {op[1] for op in ops} >= {"/v1/items/{id}", "/v1/search", "/v1/stats", "/v1/testing/echo/{name}"}
    return ops


def _value_for(name: str) -> st.SearchStrategy:
    if name in ("vector", "values"):
        return st.lists(st.floats(-10, 10, width=32), max_size=20) | json_values
    if name == "k":
        return st.integers(-5, 3000) | json_values
    return json_values


@st.composite
def requests(draw, operations):
    method, path, fields, query = draw(st.sampled_from(operations))
    segment = draw(st.sampled_from(["item-1", "item-1999", "0", ""]) | st.text(min_size=1, max_size=15))
    url = path.replace("{id}", quote(segment, safe="")).replace("{name}", quote(segment, safe=""))
    params = []
    for name in draw(st.lists(st.sampled_from(query + ["junk"]) if query else st.just("junk"), max_size=3)):
        params.append((name, draw(st.text(max_size=10) | st.integers(-5, 10).map(str))))
    headers = {"X-Request-Timeout": "5"}
    content = None
    if method == "POST":
        kind = draw(st.sampled_from(["fields", "json", "bytes"]))
        if kind == "fields":
            body = {name: draw(_value_for(name)) for name in draw(st.lists(st.sampled_from(fields), unique=True)) } if fields else {}
            content = json.dumps(body).encode()
        elif kind == "json":
            content = json.dumps(draw(json_values)).encode()
        else:
            content = draw(st.binary(max_size=64))
        headers["content-type"] = draw(st.sampled_from(["application/json", "application/json; charset=utf-8", "text/plain"]))
    return method, url, params, content, headers


def test_generated_routes_never_500(http, operations):
    seen = set()

    @settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck))
    @given(requests(operations))
    def check(request):
        method, url, params, content, headers = request
        response = http.request(method, url, params=params, content=content, headers=headers)
        seen.add(response.status_code)
        assert response.status_code in ALLOWED, (method, url, params, content, response.status_code, response.text)
        assert "Traceback" not in response.text and "NaN" not in response.text
        if response.status_code >= 400:
            error = response.json()["error"]
            assert error["code"] == response.status_code and error["request_id"] == response.headers["x-request-id"]

    check()
    assert 200 in seen and 400 in seen  # the fuzz reached compute and the validation both
