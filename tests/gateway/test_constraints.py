"""Constraints declared once in the protos (buf.validate): compute enforces them on every path
with google.rpc.BadRequest details, the gateway shows those details, and OpenAPI states them."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from gateway.json_codec import Codec
from gateway.openapi import build_openapi
from gateway.transcoding import load_routes
from offload.batcher import CallError
from offload.client import ComputeChannel
from offload.v1 import compute_pb2, compute_pb2_grpc, jobs_pb2, search_pb2

COMPUTE = "/offload.v1.ComputeService"


def violations_of(exc: grpc.RpcError) -> list[tuple[str, str]]:
    """The BadRequest of a failed sync call, read the standard way (grpcio-status)."""
    status = rpc_status.from_call(exc)
    assert status is not None, "no google.rpc.Status in the trailers"
    found = []
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        assert detail.Unpack(bad)
        found += [(v.field, v.description) for v in bad.field_violations]
    return found


def test_plain_grpc_callers_get_every_violation_with_its_field(shared_compute):
    stub = compute_pb2_grpc.ComputeServiceStub(shared_compute.channel())
    with pytest.raises(grpc.RpcError) as caught:
        stub.Search(search_pb2.SearchRequest(vector=[], k=0), timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == "vector: must contain at least 1 item(s) (and 1 more)"
    assert violations_of(caught.value) == [("vector", "must contain at least 1 item(s)"), ("k", "value is required")]

    with pytest.raises(grpc.RpcError) as caught:  # a required oneof, an enum and a stream's request
        stub.SubmitJob(jobs_pb2.SubmitJobRequest(idempotency_key="a\x07b"), timeout=5)
    assert [field for field, _ in violations_of(caught.value)] == ["spec", "idempotency_key"]
    with pytest.raises(grpc.RpcError) as caught:
        stub.ListJobs(jobs_pb2.ListJobsRequest(state=42), timeout=5)
    assert violations_of(caught.value) == [("state", "value must be one of the defined enum values")]
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.WatchJob(jobs_pb2.WatchJobRequest(id="x", after_sequence=-1), timeout=5))
    assert violations_of(caught.value) == [("after_sequence", "must be greater than or equal to 0")]


def test_details_are_capped_so_the_trailer_stays_small(shared_compute):
    """One violation per element could outgrow gRPC's metadata limit: at most 20 travel."""
    stub = compute_pb2_grpc.ComputeServiceStub(shared_compute.channel())
    spec = jobs_pb2.BatchSearchSpec(k=1, item_ids=[""] * 500)
    with pytest.raises(grpc.RpcError) as caught:
        stub.SubmitJob(jobs_pb2.SubmitJobRequest(batch_search=spec), timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().endswith("(and 499 more)")
    assert len(violations_of(caught.value)) == 20


def test_batched_calls_carry_the_same_details(shared_compute):
    async def main() -> CallError:
        async with ComputeChannel(shared_compute.address) as channel:
            assert await channel.wait_policy(10)
            get_item = channel.unary(f"{COMPUTE}/GetItem", compute_pb2.Item)
            assert f"{COMPUTE}/GetItem" in channel.batched_methods  # so this one travels in a Dispatch
            with pytest.raises(CallError) as caught:
                await get_item(compute_pb2.GetItemRequest(id=""), timeout=5)
            return caught.value

    error = asyncio.run(asyncio.wait_for(main(), 30))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.field_violations == [("id", "must be at least 1 characters")]


def test_rest_errors_show_the_field_violations(http):
    response = http.post("/v1/search", json={"vector": [], "k": 1001})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["status"] == "INVALID_ARGUMENT"
    assert error["details"] == [
        {
            "@type": "type.googleapis.com/google.rpc.BadRequest",
            "fieldViolations": [
                {"field": "vector", "description": "must contain at least 1 item(s)"},
                {"field": "k", "description": "must be greater than or equal to 1 and less than or equal to 1000"},
            ],
        }
    ]
    # A check only compute can make (the table's dimension) has no details, just its message.
    response = http.post("/v1/search", json={"vector": [1.0, 2.0], "k": 3})
    assert response.status_code == 400 and "details" not in response.json()["error"]


def test_openapi_states_the_declared_constraints():
    doc = build_openapi(load_routes(["offload.v1.compute_pb2"], Codec()))
    schemas = doc["components"]["schemas"]
    search = schemas["offload.v1.SearchRequest"]
    assert search["required"] == ["vector", "k"]  # vector: min_items 1 (absent = empty); k: required
    assert {key: search["properties"]["k"][key] for key in ("minimum", "maximum")} == {"minimum": 1, "maximum": 1000}
    assert (search["properties"]["vector"]["minItems"], search["properties"]["vector"]["maxItems"]) == (1, 65536)
    assert doc["paths"]["/v1/search"]["post"]["requestBody"]["required"] is True

    submit = schemas["offload.v1.SubmitJobRequest"]
    assert submit["oneOf"] == [{"required": ["batchSearch"]}]
    assert submit["properties"]["idempotencyKey"]["maxLength"] == 128
    assert schemas["offload.v1.BatchSearchSpec"]["properties"]["itemIds"]["items"] == {
        "type": "string", "minLength": 1, "maxLength": 256
    }
    assert schemas["offload.v1.Vector"]["required"] == ["values"]

    params = {p["name"]: p for p in doc["paths"]["/v1/jobs/{id}/events"]["get"]["parameters"]}
    assert params["id"]["schema"] == {"type": "string", "minLength": 1, "maxLength": 64}
    assert params["after_sequence"]["schema"]["pattern"] == "^[0-9]{1,18}$"  # int64 >= 0, as a JSON string
    jobs = {p["name"]: p for p in doc["paths"]["/v1/jobs"]["get"]["parameters"]}
    assert jobs["page_size"]["schema"]["minimum"] == 0
