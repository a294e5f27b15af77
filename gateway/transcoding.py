"""REST routes read from the proto: `google.api.http` rules and offload's own method options.

`load_routes(modules)` walks every service of the listed *_pb2 modules once at start-up and
returns one frozen `Route` per HTTP binding (additional_bindings included). A route knows its
path template and which request fields come from the path, the body and the query string; its
`binder` (a `RequestBinder`) turns an HTTP request into the request message. Every field name
the annotation or a client may use is resolved to descriptors while the routes are built, so a
request costs dict lookups, not descriptor scans. Nothing here names an RPC.

Path templates live in `gateway/path_template.py`, request binding in `gateway/binder.py`.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field as dc_field
from typing import Any, Callable
from urllib.parse import quote

from google.api import annotations_pb2, http_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message

from gateway.binder import RequestBinder, resolve_field
from gateway.json_codec import Codec, is_map, is_scalar_like
from gateway.path_template import PathTemplate, RouteError, parse_template
from gateway.settings import GatewaySettings
from offload import config
from offload.v1 import http_options_pb2

HTTP_METHODS = ("get", "put", "post", "delete", "patch")

@dataclass(frozen=True)
class SseRule:
    event_id_field: str
    resume_from_field: str


# -- the route: frozen, everything derived from the descriptors computed once ------------------

_LOCATION_VAR = re.compile(r"\{([^}]+)\}")


@dataclass(frozen=True, slots=True, eq=False)
class Route:
    """One HTTP binding of one RPC. Built by `Route.build` (via `load_routes`), never mutated.

    The first nine fields are what the annotation says; the rest is derived from them and the
    descriptors at start-up, so serving a request only reads attributes. Routes compare and
    hash by identity: two bindings of the same RPC are distinct routes.
    """

    service: str  # "offload.v1.ComputeService"
    method: MethodDescriptor
    http_method: str  # upper case
    path: PathTemplate
    body: str  # "", "*" or a top-level field name
    response_body: str
    success_status: int
    location: str  # template such as "/v1/jobs/{id}", filled from the response
    sse: SseRule | None
    # -- derived ----------------------------------------------------------------------------
    full_method: str = dc_field(repr=False)  # "/offload.v1.ComputeService/GetItem", the gRPC path
    name: str = dc_field(repr=False)  # the RPC name, used as the metrics/log label
    operation_id: str = dc_field(repr=False)
    streaming: bool = dc_field(repr=False)
    idempotent: bool = dc_field(repr=False)
    request_type: Descriptor = dc_field(repr=False)
    response_type: Descriptor = dc_field(repr=False)
    path_fields: frozenset[str] = dc_field(repr=False)  # dotted proto names bound by the path
    body_field: FieldDescriptor | None = dc_field(repr=False)  # None unless body names a field
    response_body_json: str = dc_field(repr=False)  # JSON name of response_body ("" if none)
    location_fields: tuple[str, ...] = dc_field(repr=False)
    decode_request: Callable[[Any, str], Message] = dc_field(repr=False)
    encode_response: Callable[[Message], Any] = dc_field(repr=False)
    binder: RequestBinder = dc_field(repr=False)
    scopes: frozenset[str] = dc_field(repr=False)  # (offload.v1.auth).scopes: what an API key needs

    @classmethod
    def build(
        cls,
        service: str,
        method: MethodDescriptor,
        http_method: str,
        path: PathTemplate,
        body: str,
        response_body: str,
        success_status: int,
        location: str,
        sse: SseRule | None,
        codec: Codec,
    ) -> Route:
        """Check the binding against the descriptors and derive everything a request needs.

        Raises RouteError naming the RPC when a field the annotation mentions does not exist
        or cannot be bound the way it is used.
        """
        full_method = f"/{service}/{method.name}"
        request_type: Descriptor = method.input_type
        response_type: Descriptor = method.output_type
        path_chains: dict[str, list[FieldDescriptor]] = {}
        for var in path.variables:
            chain = resolve_field(request_type, var.field_path)
            if chain is None or not is_scalar_like(chain[-1]) or chain[-1].is_repeated:
                raise RouteError(f"{full_method}: path variable {var.name!r} is not a singular scalar field")
            path_chains[var.name] = chain
        body_field = None
        if body not in ("", "*"):
            body_field = request_type.fields_by_name.get(body)
            if body_field is None:
                raise RouteError(f"{full_method}: body field {body!r} does not exist")
        response_body_json = ""
        if response_body:
            if response_body not in response_type.fields_by_name:
                raise RouteError(f"{full_method}: response_body {response_body!r} does not exist")
            response_body_json = response_type.fields_by_name[response_body].json_name
        extra_fields: tuple[str, ...] = ()
        if sse is not None:
            if not method.server_streaming:
                raise RouteError(f"{full_method}: sse option on a unary method")
            if sse.event_id_field and sse.event_id_field not in response_type.fields_by_name:
                raise RouteError(f"{full_method}: event_id_field {sse.event_id_field!r} does not exist")
            if sse.resume_from_field:
                if sse.resume_from_field not in request_type.fields_by_name:
                    raise RouteError(f"{full_method}: resume_from_field {sse.resume_from_field!r} does not exist")
                extra_fields = (sse.resume_from_field,)
        location_fields = tuple(_LOCATION_VAR.findall(location))
        for name in location_fields:
            if resolve_field(response_type, tuple(name.split("."))) is None:
                raise RouteError(f"{full_method}: location field {name!r} does not exist")
        decode_request = codec.decoder(request_type)
        return cls(
            service=service,
            method=method,
            http_method=http_method,
            path=path,
            body=body,
            response_body=response_body,
            success_status=success_status,
            location=location,
            sse=sse,
            full_method=full_method,
            name=method.name,
            operation_id=f"{method.containing_service.name}_{method.name}",
            streaming=method.server_streaming,
            # GET reads are idempotent: the only ones retried by the channel on UNAVAILABLE.
            idempotent=http_method == "GET",
            request_type=request_type,
            response_type=response_type,
            path_fields=frozenset(path_chains),
            body_field=body_field,
            response_body_json=response_body_json,
            location_fields=location_fields,
            decode_request=decode_request,
            encode_response=codec.encoder(response_type),
            binder=RequestBinder(request_type, body, path_chains, extra_fields, decode_request),
            scopes=_scopes(method),
        )

    @property
    def has_body(self) -> bool:
        return bool(self.body)

    def query_fields(self) -> list[tuple[str, list[FieldDescriptor]]]:
        """(dotted name, field chain) of every field settable from the query string.

        What the OpenAPI document lists: proto names, messages followed three levels deep.
        The binder accepts more spellings (JSON names, fields of well-known types); see
        `RequestBinder`. Computed on each call; only the start-up code uses it.
        """
        if self.body == "*":
            return []
        out: list[tuple[str, list[FieldDescriptor]]] = []

        def walk(desc: Descriptor, prefix: tuple[str, ...], chain: list[FieldDescriptor], depth: int) -> None:
            for f in desc.fields:
                name = prefix + (f.name,)
                dotted = ".".join(name)
                if dotted in self.path_fields or (not prefix and f.name == self.body):
                    continue
                if is_map(f):
                    continue
                if is_scalar_like(f):
                    out.append((dotted, chain + [f]))
                elif not f.is_repeated and depth < 3:
                    walk(f.message_type, name, chain + [f], depth + 1)

        walk(self.request_type, (), [], 0)
        return out

    # -- per request ----------------------------------------------------------------------

    def location_for(self, response: Message) -> str | None:
        if not self.location:
            return None

        def value(match: re.Match[str]) -> str:
            target: Any = response
            for part in match.group(1).split("."):
                target = getattr(target, part)
            return quote(str(target), safe="")

        return _LOCATION_VAR.sub(value, self.location)


def routes_from_settings(settings: GatewaySettings, codec: Codec) -> list[Route]:
    """The routes of the settings' proto modules; raises ConfigError naming the setting at fault."""
    lines = []
    for field in ("proto_modules", "extra_proto_modules"):
        try:
            config.import_modules(getattr(settings, field), f"OFFLOAD_GATEWAY_{field.upper()}")
        except config.ConfigError as exc:
            lines += exc.lines
    if lines:
        raise config.ConfigError(lines)
    try:
        return load_routes(settings.routed_proto_modules, codec)
    except RouteError as exc:
        raise config.ConfigError([f"the HTTP annotations of the proto modules: {exc}"]) from None


def load_routes(module_names: list[str], codec: Codec) -> list[Route]:
    """One Route per HTTP binding of every RPC of every service in the modules."""
    routes: list[Route] = []
    for module_name in module_names:
        module = importlib.import_module(module_name)
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                routes.extend(_method_routes(service.full_name, method, codec))
    seen: dict[tuple[str, str], str] = {}
    for route in routes:
        key = (route.http_method, route.path.regex.pattern)
        if key in seen:
            raise RouteError(f"{route.full_method} and {seen[key]} both bind {route.http_method} {route.path.template}")
        seen[key] = route.full_method
    return routes


def _scopes(method: MethodDescriptor) -> frozenset[str]:
    options = method.GetOptions()
    if not options.HasExtension(http_options_pb2.auth):
        return frozenset()
    return frozenset(options.Extensions[http_options_pb2.auth].scopes)


def _method_routes(service: str, method: MethodDescriptor, codec: Codec) -> list[Route]:
    options = method.GetOptions()
    if not options.HasExtension(annotations_pb2.http):
        return []
    if method.client_streaming:
        raise RouteError(f"{method.full_name}: client-streaming RPCs cannot be served over REST")
    rule: http_pb2.HttpRule = options.Extensions[annotations_pb2.http]
    response = options.Extensions[http_options_pb2.http_response] if options.HasExtension(http_options_pb2.http_response) else None
    sse = None
    if options.HasExtension(http_options_pb2.sse):
        raw = options.Extensions[http_options_pb2.sse]
        sse = SseRule(raw.event_id_field, raw.resume_from_field)
    elif method.server_streaming:
        sse = SseRule("", "")
    routes = []
    for binding in [rule, *rule.additional_bindings]:
        kind = binding.WhichOneof("pattern")
        if kind is None:
            raise RouteError(f"{method.full_name}: http rule without a pattern")
        if kind == "custom":
            http_method, template = binding.custom.kind.upper(), binding.custom.path
        else:
            http_method, template = kind.upper(), getattr(binding, kind)
        routes.append(
            Route.build(
                service=service,
                method=method,
                http_method=http_method,
                path=parse_template(template),
                body=binding.body,
                response_body=binding.response_body,
                success_status=(response.status if response and response.status else 200),
                location=response.location if response else "",
                sse=sse,
                codec=codec,
            )
        )
    return routes
