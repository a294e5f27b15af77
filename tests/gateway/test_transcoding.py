"""Unit tests: routes from annotations, path templates, query/body mapping, JSON mapping."""

from __future__ import annotations

import dataclasses
import math

import orjson
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import FieldDescriptor

from gateway import binder
from gateway.json_codec import Codec, CodecError, EncodeError
from gateway.binder import RequestBinder, RequestError
from gateway.path_template import RouteError, parse_template
from gateway.transcoding import load_routes
from offload.testing.v1 import testing_pb2
from offload.v1 import compute_pb2, jobs_pb2, search_pb2

MODULES = ["offload.v1.compute_pb2", "offload.testing.v1.testing_pb2"]


@pytest.fixture(scope="module")
def routes():
    return {r.name: r for r in load_routes(MODULES, Codec())}


def dumps(value) -> dict:
    return orjson.loads(orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY))


# -- routes from the proto -------------------------------------------------------------------


def test_every_annotated_rpc_gets_its_route(routes):
    table = {(r.http_method, r.path.template): r.full_method for r in routes.values()}
    assert table[("GET", "/v1/items/{id}")] == "/offload.v1.ComputeService/GetItem"
    assert table[("POST", "/v1/search")] == "/offload.v1.ComputeService/Search"
    assert table[("POST", "/v1/jobs/{id}:cancel")] == "/offload.v1.ComputeService/CancelJob"
    assert table[("GET", "/v1/jobs/{id}/events")] == "/offload.v1.ComputeService/WatchJob"
    # The test proto's RPCs appear with no gateway change: the extension model.
    assert table[("POST", "/v1/testing/echo/{name}")] == "/offload.testing.v1.TestingService/Echo"
    assert table[("GET", "/v1/testing/fail/{code}")] == "/offload.testing.v1.TestingService/Fail"
    assert len(routes) == len(compute_pb2.DESCRIPTOR.services_by_name["ComputeService"].methods) + len(
        testing_pb2.DESCRIPTOR.services_by_name["TestingService"].methods
    )


def test_method_options_are_read(routes):
    submit = routes["SubmitJob"]
    assert submit.success_status == 202
    assert submit.location_for(jobs_pb2.Job(id="j/1")) == "/v1/jobs/j%2F1"
    assert routes["GetItem"].success_status == 200 and routes["GetItem"].location_for(compute_pb2.Item()) is None
    assert routes["WatchJob"].sse.event_id_field == "sequence"
    assert routes["WatchJob"].sse.resume_from_field == "after_sequence"
    assert routes["Ticks"].streaming and not routes["Echo"].streaming
    # Only GET routes are idempotent (retried on UNAVAILABLE by the channel).
    assert routes["GetItem"].idempotent and not routes["Search"].idempotent


# -- path templates ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "template, path, expected",
    [
        ("/v1/items/{id}", "/v1/items/abc", {"id": "abc"}),
        ("/v1/items/{id}", "/v1/items/a%20b%2Fc", {"id": "a b/c"}),
        ("/v1/items/{id}", "/v1/items/a/b", None),
        ("/v1/items/{id}", "/v1/items/", None),
        ("/v1/jobs/{id}:cancel", "/v1/jobs/j1:cancel", {"id": "j1"}),
        ("/v1/jobs/{id}:cancel", "/v1/jobs/j1", None),
        ("/v1/{name=shelves/*}/books", "/v1/shelves/s1/books", {"name": "shelves/s1"}),
        ("/v1/{name=shelves/*}/books", "/v1/other/s1/books", None),
        ("/v1/{path=files/**}", "/v1/files/a/b%2Fc", {"path": "files/a/b%2Fc"}),
        ("/v1/{a.b}/x/*", "/v1/q/x/anything", {"a.b": "q"}),
    ],
)
def test_path_templates(template, path, expected):
    assert parse_template(template).match(path) == expected


def test_openapi_path_of_template():
    assert parse_template("/v1/{name=shelves/*}/books:list").openapi_path == "/v1/{name}/books:list"


@pytest.mark.parametrize("bad", ["v1/items", "/v1/{id", "/v1//x", "/v1/{id}/{id}", "/v1/{a-b}", "/v1/{x={y}}"])
def test_bad_templates_fail_at_start_up(bad):
    with pytest.raises(RouteError):
        parse_template(bad)


# -- request building: path, query, body ------------------------------------------------------


def test_path_query_and_named_body(routes):
    echo = routes["Echo"]
    body = b'{"text": "hi", "tags": ["a", "b"], "counts": {"x": 1}, "when": "2024-01-02T03:04:05.25+01:00", "blob": "aGk"}'
    query = [("big", "9007199254740993"), ("color", "GREEN"), ("numbers", "1"), ("numbers", "-2"), ("flag", "true"), ("ratio", "0.5")]
    msg = echo.binder.bind({"name": "a/b"}, query, body)
    assert msg.name == "a/b"
    assert msg.big == 9007199254740993  # beyond float precision: int64 arrives intact
    assert msg.color == testing_pb2.GREEN
    assert list(msg.numbers) == [1, -2]
    assert msg.flag is True and msg.ratio == 0.5
    assert msg.payload.text == "hi" and list(msg.payload.tags) == ["a", "b"] and dict(msg.payload.counts) == {"x": 1}
    assert (msg.payload.when.seconds, msg.payload.when.nanos) == (1704161045, 250_000_000)
    assert msg.payload.blob == b"hi"


def test_query_accepts_json_names_and_enum_numbers(routes):
    msg = routes["ListJobs"].binder.bind({}, [("pageSize", "5"), ("state", "2")], None)
    assert msg.page_size == 5 and msg.state == jobs_pb2.RUNNING


def test_path_wins_over_body(routes):
    msg = routes["CancelJob"].binder.bind({"id": "from-path"}, [], b'{"id": "from-body"}')
    assert msg.id == "from-path"


def test_empty_body_is_an_empty_message(routes):
    assert routes["Search"].binder.bind({}, [], b"") == search_pb2.SearchRequest()


@pytest.mark.parametrize(
    "route, query, body, fragment",
    [
        ("Search", [], b'{"vector": [1], "kk": 2}', "'kk': unknown field"),
        ("Search", [], b'{"vector": "x"}', "'vector': expected a JSON array"),
        ("Search", [], b'{"vector": [1, "a"]}', "'vector[1]': expected a number"),
        ("Search", [], b'{"vector": [1, null]}', "'vector[1]'"),
        ("Search", [], b'{"k": 1.5}', "'k': expected an integer"),
        ("Search", [], b'{"k": true}', "'k': expected an integer"),
        ("Search", [], b'{"k": 4294967296}', "'k': integer out of range"),
        ("Search", [], b'{"vector": ["NaN"]}', "NaN and Infinity"),
        ("Search", [], b'{"vector": [1e39]}', "out of range"),
        ("Search", [], b"[1, 2]", "must be a JSON object"),
        ("Search", [], b'{"vector": [NaN]}', "malformed JSON"),
        ("Search", [], b'{"vector": [1,', "malformed JSON"),
        ("Search", [("k", "1")], b"{}", "unknown query parameter 'k'"),
        ("GetItem", [("nope", "1")], None, "unknown query parameter 'nope'"),
        ("GetItem", [("id", "x")], None, "bound by the path"),
        ("ListJobs", [("page_size", "1"), ("page_size", "2")], None, "more than once"),
        ("ListJobs", [("state", "SLEEPING")], None, "'state': unknown enum value"),
        ("ListJobs", [("page_size", "ten")], None, "'page_size': expected an integer"),
        ("Echo", [("flag", "maybe")], None, "expected true or false"),
        ("Echo", [("big", "99999999999999999999")], None, "'big': integer out of range"),
        ("Echo", [], b'{"when": "yesterday"}', "'payload.when': expected an RFC 3339 timestamp"),
        ("Echo", [], b'{"blob": "***"}', "'payload.blob': expected a base64 string"),
        ("Echo", [], b'{"counts": {"a": "x"}}', "'payload.counts.a': expected an integer"),
        ("Echo", [], b'{"text": "a", "Text": "b"}', "'payload.Text': unknown field"),
        ("SubmitJob", [], b'{"batchSearch": {"k": 1}, "batch_search": {"k": 2}}', "given twice"),
    ],
)
def test_malformed_requests_name_the_problem(routes, route, query, body, fragment):
    with pytest.raises((RequestError, CodecError)) as info:
        routes[route].binder.bind({name: "x" for name in routes[route].path_fields}, query, body)
    assert fragment in str(info.value)


def test_path_variable_with_wrong_type_is_rejected(routes):
    with pytest.raises(CodecError, match="'count': expected an integer"):
        routes["Ticks"].binder.bind({"count": "many"}, [], None)


def test_resume_field_from_extra(routes):
    msg = routes["Ticks"].binder.bind({"count": "5"}, [("after_index", "1")], None, {"after_index": "3"})
    assert msg.count == 5 and msg.after_index == 3


# -- the binder: everything resolved at start-up ----------------------------------------------


def test_routes_are_frozen(routes):
    with pytest.raises(dataclasses.FrozenInstanceError):
        routes["GetItem"].http_method = "POST"  # type: ignore[misc]


_TEXT_FOR_TYPE = {
    FieldDescriptor.TYPE_BOOL: "true",
    FieldDescriptor.TYPE_ENUM: "1",
    FieldDescriptor.TYPE_STRING: "s",
    FieldDescriptor.TYPE_BYTES: "aGk",
}


def test_query_keys_bind_alike_by_proto_and_json_name_without_resolving(routes, monkeypatch):
    # A request must not look field names up again: every spelling was resolved at start-up.
    def no_resolving(*args):
        raise AssertionError("resolve_field called while binding a request")

    monkeypatch.setattr(binder, "resolve_field", no_resolving)
    checked = 0
    for route in routes.values():
        path_values = {name: "1" for name in route.path_fields}
        bare = route.binder.bind(path_values, [], None)
        for dotted, chain in route.query_fields():
            text = _TEXT_FOR_TYPE.get(chain[-1].type, "1")  # "1" suits every number type
            json_dotted = ".".join(f.json_name for f in chain)
            by_proto = route.binder.bind(path_values, [(dotted, text)], None)
            assert by_proto == route.binder.bind(path_values, [(json_dotted, text)], None) != bare
            checked += 1
    assert checked >= 10 and any("_" in dotted for r in routes.values() for dotted, _ in r.query_fields())
    msg = routes["Ticks"].binder.bind({"count": "5"}, [("intervalMs", "2")], None, {"after_index": "3"})
    assert (msg.count, msg.interval_ms, msg.after_index) == (5, 2, 3)


def test_a_field_is_given_once_whatever_its_spelling(routes):
    with pytest.raises(RequestError, match="query parameter 'pageSize' given more than once") as info:
        routes["ListJobs"].binder.bind({}, [("page_size", "1"), ("pageSize", "2")], None)
    assert info.value.field == "pageSize"


_OPTIONAL = descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL


def test_keys_below_a_recursive_message_fall_back_to_resolving():
    # The spelling table stops where a message type repeats (it would be infinite);
    # deeper keys still bind, resolved per request, and bad ones get the usual message.
    file = descriptor_pb2.FileDescriptorProto(name="recursive_test.proto", package="rt", syntax="proto3")
    node = file.message_type.add(name="Node")
    node.field.add(name="node_name", number=1, label=_OPTIONAL, type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING)
    node.field.add(name="child", number=2, label=_OPTIONAL, type=descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE, type_name=".rt.Node")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    desc = pool.FindMessageTypeByName("rt.Node")
    binder = RequestBinder(desc, "", {}, (), Codec().decoder(desc))
    msg = binder.bind({}, [("nodeName", "a"), ("child.child.node_name", "b")], None)
    assert (msg.node_name, msg.child.child.node_name) == ("a", "b")
    with pytest.raises(RequestError, match="unknown query parameter 'child.child'") as info:
        binder.bind({}, [("child.child", "x")], None)
    assert info.value.field == "child.child"


# -- JSON mapping out --------------------------------------------------------------------------


def test_encoding_follows_the_json_mapping():
    codec = Codec()
    echo = testing_pb2.EchoRequest(name="n", big=-(2**63), color=testing_pb2.RED, numbers=[1, 2])
    echo.payload.counts["k"] = 3
    echo.payload.when.FromSeconds(0)
    echo.payload.blob = b"\xff\x00"
    out = dumps(codec.encoder(testing_pb2.EchoRequest.DESCRIPTOR)(echo))
    assert out == {
        "name": "n",
        "big": "-9223372036854775808",
        "color": "RED",
        "numbers": [1, 2],
        "payload": {"text": "", "tags": [], "counts": {"k": 3}, "when": "1970-01-01T00:00:00Z", "blob": "/wA="},
        "flag": False,
        "ratio": 0.0,
    }


def test_float32_is_written_in_its_shortest_form():
    codec = Codec()
    out = dumps(codec.encoder(compute_pb2.Item.DESCRIPTOR)(compute_pb2.Item(id="a", vector=[0.1, 1 / 3])))
    assert out == {"id": "a", "vector": [0.1, 0.33333334]}
    hits = search_pb2.SearchResponse(hits=[search_pb2.SearchHit(id="x", score=0.7)])
    assert dumps(codec.encoder(search_pb2.SearchResponse.DESCRIPTOR)(hits)) == {"hits": [{"id": "x", "score": 0.7}]}


def test_unset_messages_are_omitted_and_json_names_used():
    codec = Codec()
    job = jobs_pb2.Job(id="j", state=jobs_pb2.QUEUED, result_count=7)
    out = dumps(codec.encoder(jobs_pb2.Job.DESCRIPTOR)(job))
    assert out["resultCount"] == "7" and out["state"] == "QUEUED"
    assert "createTime" not in out and "result" not in out


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_numbers_are_never_emitted(bad):
    codec = Codec()
    with pytest.raises(EncodeError):
        codec.encoder(compute_pb2.Item.DESCRIPTOR)(compute_pb2.Item(vector=[1.0, bad]))
    with pytest.raises(EncodeError):
        codec.encoder(compute_pb2.LoopStats.DESCRIPTOR)(compute_pb2.LoopStats(last_lag_seconds=bad))


def test_round_trip_through_the_codec():
    codec = Codec()
    msg = testing_pb2.EchoRequest(name="x", big=123, color=testing_pb2.GREEN, numbers=[-1], flag=True, ratio=-2.5)
    msg.payload.tags.extend(["t"])
    msg.payload.when.seconds, msg.payload.when.nanos = 1_700_000_000, 123_456_789
    encoded = dumps(codec.encoder(testing_pb2.EchoRequest.DESCRIPTOR)(msg))
    assert encoded["payload"]["when"] == "2023-11-14T22:13:20.123456789Z"
    assert codec.decoder(testing_pb2.EchoRequest.DESCRIPTOR)(encoded, "") == msg


def test_oneof_conflict_is_rejected():
    codec = Codec()
    decoder = codec.decoder(jobs_pb2.JobResult.DESCRIPTOR)
    assert decoder({"batchSearch": {"results": []}}, "").HasField("batch_search")
