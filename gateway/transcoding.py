"""REST routes read from the proto: `google.api.http` rules and offload's own method options.

`load_routes(modules)` walks every service of the listed *_pb2 modules once at start-up and
returns one `Route` per HTTP binding (additional_bindings included). A route knows its path
template, which request fields come from the path, the body and the query string, and turns an
HTTP request into the request message (`Route.build_request`). Nothing here names an RPC.

Path template grammar (google/api/http.proto):
    Template = "/" Segments [ Verb ] ;  Segments = Segment { "/" Segment } ;
    Segment  = "*" | "**" | LITERAL | Variable ;  Variable = "{" FieldPath [ "=" Segments ] "}" ;
    Verb     = ":" LITERAL ;
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field as dc_field
from typing import Any
from urllib.parse import quote, unquote

import orjson
from google.api import annotations_pb2, http_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message

from gateway.json_codec import Codec, CodecError, is_map, is_scalar_like
from offload.v1 import http_options_pb2

HTTP_METHODS = ("get", "put", "post", "delete", "patch")


class RouteError(ValueError):
    """A malformed annotation: raised at start-up, never per request."""


class RequestError(ValueError):
    """The HTTP request cannot become the request message (400); `field` names the culprit."""

    def __init__(self, message: str, field: str = "") -> None:
        self.field = field
        super().__init__(message)


@dataclass(frozen=True, slots=True)
class PathVariable:
    field_path: tuple[str, ...]  # proto field names, e.g. ("shelf", "name")
    multi_segment: bool  # matches "/" too (a "**" in its pattern): "/" is kept when decoding

    @property
    def name(self) -> str:
        return ".".join(self.field_path)


@dataclass(frozen=True)
class PathTemplate:
    template: str
    regex: re.Pattern[str]
    variables: tuple[PathVariable, ...]
    openapi_path: str  # "{var}" per variable, as OpenAPI wants

    def match(self, raw_path: str) -> dict[str, str] | None:
        """Variable values (percent-decoded) if `raw_path` (still percent-encoded) matches."""
        found = self.regex.match(raw_path)
        if found is None:
            return None
        values = {}
        for i, var in enumerate(self.variables):
            raw = found.group(f"v{i}")
            # A single-segment value is fully decoded; a multi-segment one keeps %2F as is.
            values[var.name] = unquote(raw.replace("%2F", "%252F").replace("%2f", "%252f")) if var.multi_segment else unquote(raw)
        return values


_LITERAL_RE = re.compile(r"^[A-Za-z0-9._~!$&'()+,;=@%-]+$")


def parse_template(template: str) -> PathTemplate:
    """Compile a google.api.http path template; raises RouteError on bad syntax."""
    if not template.startswith("/"):
        raise RouteError(f"path template must start with '/': {template!r}")
    body, verb = template, ""
    # The verb is a ':' after the last '/' that is outside any {...}.
    depth, split_at = 0, -1
    for i, ch in enumerate(template):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        elif ch == "/" and depth == 0:
            split_at = -1
        elif ch == ":" and depth == 0 and split_at < 0:
            split_at = i
    if split_at > 0:
        body, verb = template[:split_at], template[split_at + 1:]
        if not _LITERAL_RE.match(verb):
            raise RouteError(f"bad verb in {template!r}")
    regex_parts: list[str] = []
    openapi_parts: list[str] = []
    variables: list[PathVariable] = []
    for segment in _split_segments(body[1:], template):
        if segment.startswith("{"):
            if not segment.endswith("}"):
                raise RouteError(f"unclosed variable in {template!r}")
            inner = segment[1:-1]
            name, _, pattern = inner.partition("=")
            field_path = tuple(name.split("."))
            if not all(re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", p) for p in field_path):
                raise RouteError(f"bad variable {name!r} in {template!r}")
            sub_segments = _split_segments(pattern, template) if pattern else ["*"]
            sub_regex = "/".join(_segment_regex(s, template) for s in sub_segments)
            variables.append(PathVariable(field_path, "**" in sub_segments))
            regex_parts.append(f"(?P<v{len(variables) - 1}>{sub_regex})")
            openapi_parts.append("{" + name + "}")
        else:
            regex_parts.append(_segment_regex(segment, template))
            openapi_parts.append(segment)
    suffix = ":" + re.escape(verb) if verb else ""
    regex = re.compile("^/" + "/".join(regex_parts) + suffix + "$")
    openapi = "/" + "/".join(openapi_parts) + (":" + verb if verb else "")
    names = [v.name for v in variables]
    if len(set(names)) != len(names):
        raise RouteError(f"variable bound twice in {template!r}")
    return PathTemplate(template, regex, tuple(variables), openapi)


def _split_segments(text: str, template: str) -> list[str]:
    segments, depth, current = [], 0, ""
    for ch in text:
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        if ch == "/" and depth == 0:
            segments.append(current)
            current = ""
        else:
            current += ch
    segments.append(current)
    if depth != 0 or any(s == "" for s in segments):
        raise RouteError(f"bad path template {template!r}")
    return segments


def _segment_regex(segment: str, template: str) -> str:
    if segment == "*":
        return "[^/]+"
    if segment == "**":
        return ".+"
    if segment.startswith("{"):
        raise RouteError(f"nested variable in {template!r}")
    if not _LITERAL_RE.match(segment):
        raise RouteError(f"bad literal {segment!r} in {template!r}")
    return re.escape(segment)


@dataclass(frozen=True)
class SseRule:
    event_id_field: str
    resume_from_field: str


@dataclass
class Route:
    service: str  # "offload.v1.ComputeService"
    method: MethodDescriptor
    http_method: str  # upper case
    path: PathTemplate
    body: str  # "", "*" or a top-level field name
    response_body: str
    success_status: int
    location: str  # template such as "/v1/jobs/{id}", filled from the response
    sse: SseRule | None
    codec: Codec = dc_field(repr=False)

    def __post_init__(self) -> None:
        self.full_method = f"/{self.service}/{self.method.name}"
        self.name = self.method.name
        self.operation_id = f"{self.method.containing_service.name}_{self.method.name}"
        self.streaming = self.method.server_streaming
        self.request_type: Descriptor = self.method.input_type
        self.response_type: Descriptor = self.method.output_type
        self.decode_request = self.codec.decoder(self.request_type)
        self.encode_response = self.codec.encoder(self.response_type)
        self.path_fields = {v.name for v in self.path.variables}
        for var in self.path.variables:
            chain = resolve_field(self.request_type, var.field_path)
            if chain is None or not is_scalar_like(chain[-1]) or chain[-1].is_repeated:
                raise RouteError(f"{self.full_method}: path variable {var.name!r} is not a singular scalar field")
        if self.body not in ("", "*"):
            body_field = self.request_type.fields_by_name.get(self.body)
            if body_field is None:
                raise RouteError(f"{self.full_method}: body field {self.body!r} does not exist")
            self.body_field: FieldDescriptor | None = body_field
        else:
            self.body_field = None
        if self.response_body:
            if self.response_body not in self.response_type.fields_by_name:
                raise RouteError(f"{self.full_method}: response_body {self.response_body!r} does not exist")
            self.response_body_json = self.response_type.fields_by_name[self.response_body].json_name
        if self.sse is not None:
            if not self.streaming:
                raise RouteError(f"{self.full_method}: sse option on a unary method")
            if self.sse.event_id_field and self.sse.event_id_field not in self.response_type.fields_by_name:
                raise RouteError(f"{self.full_method}: event_id_field {self.sse.event_id_field!r} does not exist")
            if self.sse.resume_from_field and self.sse.resume_from_field not in self.request_type.fields_by_name:
                raise RouteError(f"{self.full_method}: resume_from_field {self.sse.resume_from_field!r} does not exist")
        self.location_fields = re.findall(r"\{([^}]+)\}", self.location)
        for name in self.location_fields:
            if resolve_field(self.response_type, tuple(name.split("."))) is None:
                raise RouteError(f"{self.full_method}: location field {name!r} does not exist")
        # GET reads are idempotent: the only ones retried by the channel on UNAVAILABLE.
        self.idempotent = self.http_method == "GET"

    @property
    def has_body(self) -> bool:
        return bool(self.body)

    def query_fields(self) -> list[tuple[str, list[FieldDescriptor]]]:
        """(dotted name, field chain) of every field settable from the query string."""
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

    def build_request(
        self,
        path_values: dict[str, str],
        query: list[tuple[str, str]],
        body: bytes | None,
        extra: dict[str, str] | None = None,
    ) -> Message:
        """The request message from the matched path, the query pairs and the raw JSON body.

        `extra` sets more fields from text (e.g. the SSE resume field from Last-Event-ID).
        Raises RequestError / CodecError (both 400).
        """
        obj: dict[str, Any]
        if self.body == "*":
            obj = _parse_json(body) if body else {}
            if not isinstance(obj, dict):
                raise RequestError("the request body must be a JSON object")
        elif self.body:
            obj = {}
            if body:
                obj[self.body] = _parse_json(body)
        else:
            obj = {}
        if query:
            if self.body == "*":
                raise RequestError(f"unknown query parameter '{query[0][0]}' (this route takes a JSON body)", query[0][0])
            seen: set[str] = set()
            for key, text in query:
                chain = resolve_field(self.request_type, tuple(key.split(".")))
                dotted = ".".join(f.name for f in chain) if chain else ""
                if chain is None or is_map(chain[-1]) or not is_scalar_like(chain[-1]):
                    raise RequestError(f"unknown query parameter '{key}'", key)
                if dotted in self.path_fields or chain[0].name == self.body:
                    raise RequestError(f"query parameter '{key}' is bound by the path or the body", key)
                if any(f.is_repeated for f in chain[:-1]):
                    raise RequestError(f"query parameter '{key}' is inside a repeated field", key)
                last = chain[-1]
                value = _text_value(last, text)
                if last.is_repeated:
                    _set_path(obj, chain[:-1], key).setdefault(last.name, []).append(value)
                else:
                    if dotted in seen:
                        raise RequestError(f"query parameter '{key}' given more than once", key)
                    seen.add(dotted)
                    _set_path(obj, chain[:-1], key)[last.name] = value
        for name, text in path_values.items():
            chain = resolve_field(self.request_type, tuple(name.split(".")))
            assert chain is not None  # checked at start-up
            _assign(obj, chain, _text_value(chain[-1], text), name)
        if extra:
            for name, text in extra.items():
                chain = resolve_field(self.request_type, (name,))
                assert chain is not None
                _assign(obj, chain, _text_value(chain[-1], text), name)
        return self.decode_request(obj, "")

    def location_for(self, response: Message) -> str | None:
        if not self.location:
            return None

        def value(match: re.Match[str]) -> str:
            target: Any = response
            for part in match.group(1).split("."):
                target = getattr(target, part)
            return quote(str(target), safe="")

        return re.sub(r"\{([^}]+)\}", value, self.location)


def _parse_json(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise RequestError(f"malformed JSON body: {str(exc).split(':')[0]}") from None


def resolve_field(desc: Descriptor, parts: tuple[str, ...]) -> list[FieldDescriptor] | None:
    """The chain of fields for a dotted path (proto or JSON names), or None."""
    chain: list[FieldDescriptor] = []
    current: Descriptor | None = desc
    for part in parts:
        if current is None:
            return None
        f = current.fields_by_name.get(part) or current.fields_by_camelcase_name.get(part)
        if f is None:
            f = next((x for x in current.fields if x.json_name == part), None)
        if f is None:
            return None
        chain.append(f)
        current = f.message_type if f.type == FieldDescriptor.TYPE_MESSAGE and not is_map(f) else None
    return chain


def _text_value(field: FieldDescriptor, text: str) -> Any:
    """A path/query text as the JSON value the codec expects (numbers may stay strings)."""
    target = field
    if field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type.full_name.endswith(("BoolValue",)):
        target = field.message_type.fields_by_name["value"]
    if target.type == FieldDescriptor.TYPE_BOOL:
        lowered = text.lower()
        if lowered in ("true", "1"):
            return True
        if lowered in ("false", "0"):
            return False
        raise CodecError(field.name, "expected true or false")
    if target.type == FieldDescriptor.TYPE_ENUM and re.fullmatch(r"-?[0-9]{1,10}", text):
        return int(text)
    return text


def _set_path(obj: dict[str, Any], chain: list[FieldDescriptor], key: str) -> dict[str, Any]:
    for f in chain:
        nested = obj.get(f.name)
        if nested is None:
            nested = obj.pop(f.json_name, None)
        if not isinstance(nested, dict):
            nested = {}
        obj[f.name] = nested
        obj = nested
    return obj


def _assign(obj: dict[str, Any], chain: list[FieldDescriptor], value: Any, key: str) -> None:
    """Set a path-bound field, overriding whatever the body said about it."""
    target = _set_path(obj, chain[:-1], key)
    last = chain[-1]
    target.pop(last.json_name, None)
    target[last.name] = value


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
            Route(
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
