"""A small gRPC client for compute, for people and scripts (grpcurl's job, without grpcurl).

    python -m compute.client GetItem '{"id": "item-42"}'
    python -m compute.client Search --like item-42 '{"k": 5}'
    python -m compute.client GetStats
    python -m compute.client health
    python -m compute.client --list
    python -m compute.client load-table var/tables/next.npy [--ids var/tables/next.txt]   # a hot swap

Any RPC compute serves works, yours included, by short name (`Search`) or full name
(`offload.v1.ComputeService.Search`): the client asks compute's reflection service for the
protos, so it needs no generated code. Requests and responses are protobuf JSON.
Server-streaming RPCs print one JSON object per message.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import grpc
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from offload import context
from offload.v1 import compute_pb2

# Served by compute for its own plumbing: not operations.
_INFRASTRUCTURE = ("grpc.", "offload.v1.CallBatching")


class ServedProtos:
    """The services compute serves and their types, read through its reflection service."""

    def __init__(self, channel: grpc.Channel) -> None:
        database = ProtoReflectionDescriptorDatabase(channel)
        self.pool = descriptor_pool.DescriptorPool(database)
        self.services = [
            self.pool.FindServiceByName(name)
            for name in database.get_services()
            if not name.startswith(_INFRASTRUCTURE)
        ]

    def find_method(self, name: str):
        if name.count(".") >= 2:
            try:
                return self.pool.FindMethodByName(name)
            except KeyError:
                raise SystemExit(f"compute serves no method {name!r}; try --list") from None
        found = [s.methods_by_name[name] for s in self.services if name in s.methods_by_name]
        if len(found) > 1:
            names = ", ".join(m.full_name for m in found)
            raise SystemExit(f"{name!r} is ambiguous ({names}): give the full name")
        if not found:
            raise SystemExit(f"compute serves no method {name!r}; try --list")
        return found[0]


def call(channel: grpc.Channel, method, request_json: str, *, timeout: float, metadata) -> list[str]:
    request_cls = message_factory.GetMessageClass(method.input_type)
    response_cls = message_factory.GetMessageClass(method.output_type)
    request = json_format.Parse(request_json or "{}", request_cls())
    path = f"/{method.containing_service.full_name}/{method.name}"
    if method.server_streaming:
        rpc = channel.unary_stream(path, request_cls.SerializeToString, response_cls.FromString)
        return [json_format.MessageToJson(item, indent=None) for item in rpc(request, timeout=timeout, metadata=metadata)]
    rpc = channel.unary_unary(path, request_cls.SerializeToString, response_cls.FromString)
    return [json_format.MessageToJson(rpc(request, timeout=timeout, metadata=metadata), indent=2)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m compute.client", description=__doc__.split("\n\n")[0])
    parser.add_argument("method", nargs="?", help="RPC name, or 'health'")
    parser.add_argument("request", nargs="?", default="{}", help="request as protobuf JSON ('-' reads stdin)")
    parser.add_argument("--address", default="127.0.0.1:50051", help="compute address (host:port or unix:/path)")
    parser.add_argument("--timeout", type=float, default=None, help="deadline in seconds (default 30; load-table: 600)")
    parser.add_argument("--request-id", default=None, help="x-request-id to send (generated if absent)")
    parser.add_argument("--api-key", default=os.environ.get("OFFLOAD_API_KEY"), help="key for a compute that requires one (default: $OFFLOAD_API_KEY)")
    parser.add_argument("--like", metavar="ITEM_ID", help="Search: use this item's vector as the query")
    parser.add_argument("--list", action="store_true", help="list the RPCs")
    table = parser.add_argument_group("load-table PATH (LoadTable: swap in a new table while serving)")
    table.add_argument("--ids", metavar="PATH", help="the new table's ids file (one per line)")
    table.add_argument("--synthetic", metavar="ROWS,DIM,SEED", help="a synthetic table instead of a file")
    table.add_argument("--allow-dimension-change", action="store_true", help="switch even if the dimension changes")
    args = parser.parse_intermixed_args(argv)
    if args.timeout is None:
        args.timeout = 600.0 if args.method == "load-table" else 30.0

    if not args.method and not args.list:
        parser.error("a method is required (or --list)")

    channel = grpc.insecure_channel(args.address)
    ctx = context.from_headers(args.request_id, None)
    metadata = ((context.REQUEST_ID_HEADER, ctx.request_id), (context.TRACEPARENT_HEADER, ctx.traceparent))
    if args.api_key:
        metadata += (("authorization", f"Bearer {args.api_key}"),)
    try:
        if args.list:
            for service in ServedProtos(channel).services:
                for m in service.methods:
                    stream = "stream " if m.server_streaming else ""
                    print(f"{service.full_name}.{m.name}({m.input_type.name}) -> {stream}{m.output_type.name}")
            return 0
        if args.method == "health":
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=args.timeout)
            print(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
            return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1
        request_json = sys.stdin.read() if args.request == "-" else args.request
        if args.method == "load-table":
            args.method, request_json = "offload.v1.ComputeService.LoadTable", load_table_request(parser, args)
        if args.like:
            item = fetch_item(channel, args.like, args.timeout, metadata)
            body = json.loads(request_json or "{}")
            body["vector"] = list(item.vector)
            request_json = json.dumps(body)
        method = ServedProtos(channel).find_method(args.method)
        for line in call(channel, method, request_json, timeout=args.timeout, metadata=metadata):
            print(line)
        return 0
    except json_format.ParseError as exc:
        print(f"bad request JSON: {exc}", file=sys.stderr)
        return 2
    except grpc.RpcError as exc:
        print(f"{exc.code().name}: {exc.details()} (request id {ctx.request_id})", file=sys.stderr)
        return 1
    finally:
        channel.close()


def load_table_request(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """LoadTable's request, as JSON. Paths are made absolute here: compute reads them from its
    own working directory, which need not be ours."""
    body: dict = {"allowDimensionChange": args.allow_dimension_change}
    if args.synthetic:
        try:
            rows, dim, seed = (int(part) for part in args.synthetic.split(","))
        except ValueError:
            parser.error("--synthetic takes ROWS,DIM,SEED, e.g. 100000,128,7")
        body["synthetic"] = {"rows": rows, "dim": dim, "seed": seed}
    elif args.request and args.request != "{}":
        body["file"] = {"vectorsPath": os.path.abspath(args.request)}
        if args.ids:
            body["file"]["idsPath"] = os.path.abspath(args.ids)
    else:
        parser.error("load-table needs a .npy PATH or --synthetic ROWS,DIM,SEED")
    return json.dumps(body)


def fetch_item(channel: grpc.Channel, item_id: str, timeout: float, metadata):
    rpc = channel.unary_unary(
        "/offload.v1.ComputeService/GetItem", compute_pb2.GetItemRequest.SerializeToString, compute_pb2.Item.FromString
    )
    return rpc(compute_pb2.GetItemRequest(id=item_id), timeout=timeout, metadata=metadata)


if __name__ == "__main__":
    sys.exit(main())
