"""Proto comments reach the OpenAPI document: offload.protogen keeps them, the gateway shows them."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

from gateway.json_codec import Codec
from gateway.openapi import build_openapi
from gateway.transcoding import load_routes
from offload import protogen


def test_protogen_keeps_every_kind_of_comment_by_full_name(tmp_path):
    root = tmp_path / "protos"
    (root / "shapes" / "v1").mkdir(parents=True)
    (root / "shapes" / "v1" / "shapes.proto").write_text(
        textwrap.dedent(
            """
            // A detached file comment: not attached to anything.

            syntax = "proto3";
            package shapes.v1;
            import "google/api/annotations.proto";

            // Shapes.
            service ShapeService {
              // Draw one.
              rpc Draw(Shape) returns (Shape) { option (google.api.http) = {post: "/v1/shapes" body: "*"}; }
            }

            // A shape.
            message Shape {
              // Its corners.
              message Corner {
                int64 x = 1;  // Across.
              }
              // How it is filled.
              enum Fill {
                FILL_UNSPECIFIED = 0;
                // Solid colour.
                SOLID = 1;
              }
              repeated Corner corners = 1;
              Fill fill = 2;
              // One of two ways to size it.
              oneof size {
                float radius = 3;
                float side = 4;
              }
            }
            """
        )
    )
    out = tmp_path / "out"
    assert protogen.generate([root], out) == [Path("shapes/v1/shapes.proto")]
    assert (out / "shapes" / "v1" / "shapes_pb2.py").exists() and (out / "shapes" / "v1" / "shapes_pb2_grpc.py").exists()
    assert json.loads((out / "shapes" / "v1" / "shapes.comments.json").read_text()) == {
        "shapes.v1.ShapeService": "Shapes.",
        "shapes.v1.ShapeService.Draw": "Draw one.",
        "shapes.v1.Shape": "A shape.",
        "shapes.v1.Shape.Corner": "Its corners.",
        "shapes.v1.Shape.Corner.x": "Across.",
        "shapes.v1.Shape.Fill": "How it is filled.",
        "shapes.v1.Shape.Fill.SOLID": "Solid colour.",
        "shapes.v1.Shape.size": "One of two ways to size it.",
    }


def test_openapi_descriptions_come_from_the_proto_comments():
    doc = build_openapi(load_routes(["offload.v1.compute_pb2", "offload.testing.v1.testing_pb2"], Codec()))
    tags = {tag["name"]: tag.get("description") for tag in doc["tags"]}
    assert tags["TestingService"] == "Test-only RPCs: faults, transcoding and batching."
    assert tags["ComputeService"].startswith("offload's built-in operations")

    echo = doc["paths"]["/v1/testing/echo/{name}"]["post"]
    assert echo["description"] == (
        "Light: returns its request; exercises path, query and named-body transcoding.\n\n"
        "gRPC `/offload.testing.v1.TestingService/Echo`"
    )
    parameters = {p["name"]: p for p in echo["parameters"]}
    assert parameters["name"]["description"] == "Bound by the path."
    assert parameters["big"]["description"] == "64 bits: a JSON string."  # a trailing comment
    assert parameters["big"]["schema"]["type"] == "string"

    schemas = doc["components"]["schemas"]
    payload = schemas["offload.testing.v1.Payload"]
    assert payload["description"] == "A nested message: every JSON-mapped kind of field."
    assert payload["properties"]["text"]["description"] == "Free text.\n\nA second paragraph."
    assert "description" not in payload["properties"]["tags"]  # no comment, no description
    color = parameters["color"]["schema"]
    assert color["x-enum-descriptions"] == {"RED": "The colour of stop.", "GREEN": "The colour of go."}
    search = schemas["offload.v1.SearchRequest"]["properties"]
    assert search["k"]["description"] == "Number of hits, 1..1000, and at most compute's max_k setting."
