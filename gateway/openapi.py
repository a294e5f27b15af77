"""OpenAPI 3.1 for the generated routes, from the same descriptors the routes come from.

Schemas follow the JSON mapping the codec implements (64-bit integers are strings, enums are
names, bytes base64, Timestamp date-time...), one component per message, named by its full proto
name. Request bodies drop the fields bound by the path; every operation lists the error
responses the gateway can produce, with the AIP-193 body. Proto comments become the
descriptions of operations, tags (services), schemas (messages), properties and parameters
(fields) and enum values (gateway/proto_docs.py).
"""

from __future__ import annotations

from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor as FD

from gateway import constraints
from gateway.json_codec import is_map
from gateway.proto_docs import ProtoDocs
from gateway.transcoding import Route, resolve_field

ERROR_SCHEMA = "offload.Error"

_SCALARS: dict[int, dict[str, Any]] = {
    FD.TYPE_DOUBLE: {"type": "number", "format": "double"},
    # float32's range: the codec refuses what float32 cannot hold (JSON numbers are doubles).
    FD.TYPE_FLOAT: {"type": "number", "format": "float", "minimum": -3.4028234663852886e38, "maximum": 3.4028234663852886e38},
    # 64-bit integers are JSON strings. The pattern keeps them in range by length (18 digits
    # always fit; 19-digit values up to the limit are accepted too, but not promised).
    FD.TYPE_INT64: {"type": "string", "format": "int64", "pattern": "^-?[0-9]{1,18}$"},
    FD.TYPE_SINT64: {"type": "string", "format": "int64", "pattern": "^-?[0-9]{1,18}$"},
    FD.TYPE_SFIXED64: {"type": "string", "format": "int64", "pattern": "^-?[0-9]{1,18}$"},
    FD.TYPE_UINT64: {"type": "string", "format": "uint64", "pattern": "^[0-9]{1,19}$"},
    FD.TYPE_FIXED64: {"type": "string", "format": "uint64", "pattern": "^[0-9]{1,19}$"},
    FD.TYPE_INT32: {"type": "integer", "format": "int32"},
    FD.TYPE_SINT32: {"type": "integer", "format": "int32"},
    FD.TYPE_SFIXED32: {"type": "integer", "format": "int32"},
    FD.TYPE_UINT32: {"type": "integer", "format": "int64", "minimum": 0, "maximum": 4294967295},
    FD.TYPE_FIXED32: {"type": "integer", "format": "int64", "minimum": 0, "maximum": 4294967295},
    FD.TYPE_BOOL: {"type": "boolean"},
    FD.TYPE_STRING: {"type": "string"},
    FD.TYPE_BYTES: {"type": "string", "format": "byte"},
}

_WKT: dict[str, dict[str, Any]] = {
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    "google.protobuf.Duration": {"type": "string", "pattern": r"^-?[0-9]+(\.[0-9]{1,9})?s$", "example": "1.5s"},
    "google.protobuf.FieldMask": {"type": "string"},
    "google.protobuf.Struct": {"type": "object", "additionalProperties": True},
    "google.protobuf.Value": {},
    "google.protobuf.ListValue": {"type": "array", "items": {}},
    "google.protobuf.Empty": {"type": "object"},
    "google.protobuf.Any": {"type": "object", "properties": {"@type": {"type": "string"}}, "additionalProperties": True},
}

_ERRORS = {
    "400": "Malformed request (JSON, field types, unknown fields) or INVALID_ARGUMENT / FAILED_PRECONDITION / OUT_OF_RANGE",
    "404": "NOT_FOUND",
    "409": "ALREADY_EXISTS or ABORTED",
    "429": "RESOURCE_EXHAUSTED: compute is at capacity; see Retry-After",
    "499": "CANCELLED",
    "500": "INTERNAL / UNKNOWN / DATA_LOSS",
    "501": "UNIMPLEMENTED",
    "503": "UNAVAILABLE: compute is down or restarting; retry later",
    "504": "DEADLINE_EXCEEDED",
}


class SchemaBuilder:
    def __init__(self, docs: ProtoDocs | None = None) -> None:
        self.components: dict[str, Any] = {}
        self.docs = docs or ProtoDocs()

    def ref(self, desc: Descriptor) -> dict[str, Any]:
        name = desc.full_name
        if name in _WKT:
            return dict(_WKT[name])
        if name.startswith("google.protobuf.") and name.endswith("Value") and "value" in desc.fields_by_name:
            return {"anyOf": [self.field(desc.fields_by_name["value"]), {"type": "null"}]}
        if name not in self.components:
            self.components[name] = {}  # placeholder: recursive types
            self.components[name] = self.message(desc)
        return {"$ref": f"#/components/schemas/{name}"}

    def message(self, desc: Descriptor, exclude: set[str] = frozenset()) -> dict[str, Any]:  # type: ignore[assignment]
        fields = [f for f in desc.fields if f.name not in exclude]
        properties = {f.json_name: self.described_field(f) for f in fields}
        schema: dict[str, Any] = {"type": "object", "properties": properties, "additionalProperties": False}
        required = [f.json_name for f in fields if constraints.is_required(f)]
        if required:
            schema["required"] = required
        one_of = constraints.required_oneofs(desc)
        choices = [[{"required": [name], **constraints.set_keywords(desc, name)} for name in members] for members in one_of]
        if len(choices) == 1:
            schema["oneOf"] = choices[0]
        elif choices:
            schema["allOf"] = [{"oneOf": group} for group in choices]
        oneofs = [o for o in desc.oneofs if not (len(o.fields) == 1 and o.name.startswith("_"))]
        required_oneofs = {tuple(members) for members in one_of}
        notes = [self.docs.of(desc)] + [
            f"{'Exactly' if tuple(f.json_name for f in o.fields) in required_oneofs else 'At most'} one of "
            f"{', '.join(f.json_name for f in o.fields)} ({o.name})."
            for o in oneofs
        ]
        if any(notes):
            schema["description"] = "\n\n".join(note for note in notes if note)
        return schema

    def described_field(self, f: FD) -> dict[str, Any]:
        """The field's schema with its declared constraints, and its proto comment as description."""
        schema = self.constrained_field(f)
        comment = self.docs.of(f)
        if comment:
            schema = {**schema, "description": comment}
        return schema

    def constrained_field(self, f: FD) -> dict[str, Any]:
        """The field's schema with its buf.validate rules as JSON Schema keywords."""
        schema = self.field(f)
        if is_map(f) or f.is_repeated:
            outer, element = constraints.list_keywords(f)
            schema = {**schema, **outer}
            inner = "additionalProperties" if is_map(f) else "items"
            if element and "$ref" not in schema[inner]:
                schema[inner] = {**schema[inner], **element}
            if f.is_repeated and not is_map(f) and f.type == FD.TYPE_ENUM:
                schema[inner] = self.enum(f, constraints.enum_allowed(f))
            return schema
        if f.type == FD.TYPE_ENUM:
            return self.enum(f, constraints.enum_allowed(f))
        keywords = constraints.value_keywords(f, constraints.field_rules(f))
        return {**schema, **keywords} if keywords else schema

    def field(self, f: FD) -> dict[str, Any]:
        if is_map(f):
            value = f.message_type.fields_by_name["value"]
            return {"type": "object", "additionalProperties": self.single(value)}
        if f.is_repeated:
            return {"type": "array", "items": self.single(f)}
        return self.single(f)

    def single(self, f: FD) -> dict[str, Any]:
        if f.type == FD.TYPE_MESSAGE:
            return self.ref(f.message_type)
        if f.type == FD.TYPE_ENUM:
            return self.enum(f, None)
        return dict(_SCALARS[f.type])

    def enum(self, f: FD, allowed: set[int] | None) -> dict[str, Any]:
        """Names (what responses carry) or numbers: proto3 JSON parsers accept both."""
        kept = [v for v in f.enum_type.values if allowed is None or v.number in allowed]
        schema: dict[str, Any] = {
            "anyOf": [{"type": "string", "enum": [v.name for v in kept]}, {"type": "integer", "enum": [v.number for v in kept]}]
        }
        values = {v.name: self.docs.of_value(f.enum_type, v) for v in kept}
        if any(values.values()):
            schema["x-enum-descriptions"] = {name: text for name, text in values.items() if text}
        return schema


def build_openapi(
    routes: list[Route],
    title: str = "offload",
    version: str = "v1",
    max_timeout_seconds: float = 3600.0,
    auth: bool = False,
) -> dict[str, Any]:
    """The OpenAPI document of the generated routes (merge admin routes in separately)."""
    schemas = SchemaBuilder()
    paths: dict[str, Any] = {}
    tags: dict[str, dict[str, Any]] = {}
    for route in routes:
        operation = _operation(route, schemas, max_timeout_seconds)
        if auth:
            operation["security"] = [{"apiKey": []}, {"bearer": []}]
            operation["x-required-scopes"] = sorted(route.scopes)
            operation["responses"]["401"] = {"description": "UNAUTHENTICATED: no valid API key", "content": _error_content()}
            operation["responses"]["403"] = {
                "description": "PERMISSION_DENIED: the key lacks the scopes " + (", ".join(sorted(route.scopes)) or "(none needed)"),
                "content": _error_content(),
            }
        paths.setdefault(route.path.openapi_path, {})[route.http_method.lower()] = operation
        service = route.method.containing_service
        tag = tags.setdefault(service.name, {"name": service.name})
        if schemas.docs.of(service):
            tag["description"] = schemas.docs.of(service)
    components = {
        **schemas.components,
        ERROR_SCHEMA: {
            "type": "object",
            "required": ["error"],
            "properties": {
                "error": {
                    "type": "object",
                    "required": ["code", "status", "message", "request_id"],
                    "properties": {
                        "code": {"type": "integer", "description": "HTTP status code"},
                        "status": {"type": "string", "description": "google.rpc.Code name, e.g. NOT_FOUND"},
                        "message": {"type": "string"},
                        "request_id": {"type": "string"},
                        "details": {
                            "type": "array",
                            "description": "google.rpc error details; INVALID_ARGUMENT from a declared constraint "
                            "carries a google.rpc.BadRequest with one entry per field at fault",
                            "items": {
                                "type": "object",
                                "required": ["@type"],
                                "properties": {
                                    "@type": {"type": "string", "example": "type.googleapis.com/google.rpc.BadRequest"},
                                    "fieldViolations": {
                                        "type": "array",
                                        "items": {
                                            "type": "object",
                                            "properties": {"field": {"type": "string"}, "description": {"type": "string"}},
                                        },
                                    },
                                },
                            },
                        },
                    },
                }
            },
        },
    }
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version},
        "tags": list(tags.values()),
        "paths": paths,
        "components": {"schemas": components},
    }
    if auth:
        document["components"]["securitySchemes"] = {
            "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
            "bearer": {"type": "http", "scheme": "bearer", "description": "the API key as a bearer token"},
        }
    return document


def _operation(route: Route, schemas: SchemaBuilder, max_timeout_seconds: float) -> dict[str, Any]:
    parameters: list[dict[str, Any]] = []
    for var in route.path.variables:
        chain = resolve_field(route.request_type, var.field_path)
        assert chain is not None
        parameters.append(_described(
            {"name": var.name, "in": "path", "required": True, "schema": schemas.constrained_field(chain[-1])},
            schemas.docs.of(chain[-1]),
        ))
    for dotted, chain in route.query_fields():
        schema = schemas.constrained_field(chain[-1])
        required = all(constraints.is_required(f) for f in chain)
        param: dict[str, Any] = _described(
            {"name": dotted, "in": "query", "required": required, "schema": schema}, schemas.docs.of(chain[-1])
        )
        if chain[-1].is_repeated:
            param.update(style="form", explode=True)
        parameters.append(param)
    if route.sse is not None and route.sse.resume_from_field:
        resume = route.request_type.fields_by_name[route.sse.resume_from_field]
        digits = resume.cpp_type in (FD.CPPTYPE_INT32, FD.CPPTYPE_INT64, FD.CPPTYPE_UINT32, FD.CPPTYPE_UINT64)
        parameters.append(
            {
                "name": "Last-Event-ID",
                "in": "header",
                "required": False,
                "schema": {"type": "string", "pattern": "^[0-9]{1,18}$"} if digits else {"type": "string"},
                "description": f"Resume after this event id (sets `{route.sse.resume_from_field}`)",
            }
        )
    parameters += [
        {"name": "X-Request-ID", "in": "header", "required": False, "schema": {"type": "string"},
         "description": "Request id, echoed in the response and in logs. Used as given when it matches "
                        "^[A-Za-z0-9._:/+=-]{1,128}$; otherwise (or when absent) a generated one is used"},
        {"name": "X-Request-Timeout", "in": "header", "required": False,
         "schema": {"type": "number", "exclusiveMinimum": 0, "maximum": max_timeout_seconds},
         "description": "Deadline in seconds for this call, at most the gateway's maximum"},
    ]
    grpc_line = f"gRPC `{route.full_method}`"
    if route.streaming:
        resume = route.sse.resume_from_field if route.sse else ""
        grpc_line += (
            " (server stream, served as Server-Sent Events). The same path also upgrades to a WebSocket: "
            "one text message per streamed message, the same JSON as the events' data"
            + (f", resume with the `{resume}` query parameter" if resume else "")
            + "; close 1000 after the last message, or the error body then 4000 + the gRPC code."
        )
    comment = schemas.docs.of(route.method)
    operation: dict[str, Any] = {
        "operationId": route.operation_id,
        "summary": route.name,
        "description": f"{comment}\n\n{grpc_line}" if comment else grpc_line,
        "tags": [route.method.containing_service.name],
        "parameters": parameters,
    }
    if route.body:
        top = {v.field_path[0] for v in route.path.variables if len(v.field_path) == 1}
        if route.body == "*":
            schema = schemas.message(route.request_type, exclude=top) if top else schemas.ref(route.request_type)
        else:
            schema = schemas.described_field(route.body_field)  # type: ignore[arg-type]
        body_message = route.request_type if route.body == "*" else None
        needed = body_message is not None and (
            any(constraints.is_required(f) for f in body_message.fields if f.name not in top)
            or bool(constraints.required_oneofs(body_message))
        )
        operation["requestBody"] = {"required": needed, "content": {"application/json": {"schema": schema}}}
    request_id_header = {"X-Request-ID": {"schema": {"type": "string"}}}
    if route.streaming:
        success = {
            "description": (
                f"Server-Sent Events. The schema is one event's: its `data` is one JSON "
                f"`{route.response_type.full_name}`, its `id` the resume point (send it back as "
                f"Last-Event-ID). An `event: error` event carries an AIP-193 error body as its data and "
                f"ends the stream. Comment lines (`:`) keep the connection alive."
            ),
            "headers": request_id_header,
            "content": {"text/event-stream": {"schema": _sse_event(schemas.ref(route.response_type))}},
        }
    else:
        response_schema = schemas.ref(route.response_type)
        if route.response_body:
            response_schema = schemas.field(route.response_type.fields_by_name[route.response_body])
        headers = dict(request_id_header)
        if route.location:
            headers["Location"] = {"schema": {"type": "string"}, "description": f"e.g. {route.location}"}
        success = {"description": "OK", "headers": headers, "content": {"application/json": {"schema": response_schema}}}
    responses: dict[str, Any] = {str(route.success_status): success}
    error_ref = {"application/json": {"schema": {"$ref": f"#/components/schemas/{ERROR_SCHEMA}"}}}
    codes = dict(_ERRORS)
    if route.body:
        codes["413"] = "Request body too large"
        codes["415"] = "Content-Type is not application/json"
    for code in sorted(codes):
        responses[code] = {"description": codes[code], "content": error_ref}
        if code in ("429", "503"):
            responses[code]["headers"] = {"Retry-After": {"schema": {"type": "integer"}}}
    operation["responses"] = responses
    return operation


def _error_content() -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": f"#/components/schemas/{ERROR_SCHEMA}"}}}


def _sse_event(data: dict[str, Any]) -> dict[str, Any]:
    """One Server-Sent Event as clients parse it (OpenAPI 3.2's itemSchema model): `data` is a
    JSON document, given with JSON Schema's content keywords."""
    error = {"$ref": f"#/components/schemas/{ERROR_SCHEMA}"}
    return {
        "type": "object",
        "required": ["data"],
        "properties": {
            "data": {"type": "string", "contentMediaType": "application/json", "contentSchema": {"anyOf": [data, error]}},
            "event": {"type": "string", "enum": ["message", "error"]},
            "id": {"type": "string"},
        },
    }


def _described(parameter: dict[str, Any], comment: str | None) -> dict[str, Any]:
    if comment:
        parameter["description"] = comment
    return parameter
