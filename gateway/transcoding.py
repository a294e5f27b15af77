"""REST routes read from the proto: `google.api.http` rules and offload's own method options.

`load_routes(modules)` walks every service of the listed *_pb2 modules once at start-up and
returns one frozen `Route` per HTTP binding (additional_bindings included). A route knows its
path template and which request fields come from the path, the body and the query string; its
`binder` (a `RequestBinder`) turns an HTTP request into the request message. Every field name
the annotation or a client may use is resolved to descriptors while the routes are built, so a
request costs dict lookups, not descriptor scans. Nothing here names an RPC.

Path template grammar (google/api/http.proto):
    Template = "/" Segments [ Verb ] ;  Segments = Segment { "/" Segment } ;
    Segment  = "*" | "**" | LITERAL | Variable ;  Variable = "{" FieldPath [ "=" Segments ] "}" ;
    Verb     = ":" LITERAL ;
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field as dc_field
from typing import Any, Callable
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

    def build_request(
        self,
        path_values: dict[str, str],
        query: list[tuple[str, str]],
        body: bytes | None,
        extra: dict[str, str] | None = None,
    ) -> Message:
        """Same as `self.binder.bind(...)`, kept for existing callers."""
        return self.binder.bind(path_values, query, body, extra)

    def location_for(self, response: Message) -> str | None:
        if not self.location:
            return None

        def value(match: re.Match[str]) -> str:
            target: Any = response
            for part in match.group(1).split("."):
                target = getattr(target, part)
            return quote(str(target), safe="")

        return _LOCATION_VAR.sub(value, self.location)


# -- binding one request -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _FieldSetter:
    """How to put one text value (path, query or extra) into the dict handed to the decoder."""

    dotted: str  # proto names, e.g. "payload.text": what "given more than once" compares
    parents: tuple[tuple[str, str], ...]  # (proto name, JSON name) of each enclosing message field
    name: str  # proto name of the field itself
    json_name: str
    repeated: bool
    convert: Callable[[str], Any]  # text -> the JSON value the codec expects; may raise CodecError


def _setter(chain: list[FieldDescriptor]) -> _FieldSetter:
    last = chain[-1]
    return _FieldSetter(
        dotted=".".join(f.name for f in chain),
        parents=tuple((f.name, f.json_name) for f in chain[:-1]),
        name=last.name,
        json_name=last.json_name,
        repeated=last.is_repeated,
        convert=_text_converter(last),
    )


def _query_key_problem(chain: list[FieldDescriptor] | None, path_fields: frozenset[str], body: str) -> str | None:
    """Why a resolved query key cannot be set (a message with `{key}` to fill in), or None.

    The one rule for both the start-up table and the per-request fallback, so they agree.
    """
    if chain is None or is_map(chain[-1]) or not is_scalar_like(chain[-1]):
        return "unknown query parameter '{key}'"
    if ".".join(f.name for f in chain) in path_fields or chain[0].name == body:
        return "query parameter '{key}' is bound by the path or the body"
    if any(f.is_repeated for f in chain[:-1]):
        return "query parameter '{key}' is inside a repeated field"
    return None


class RequestBinder:
    """Turns one HTTP request into the request message of one route.

    Built once per route at start-up: every path variable, every `extra` field and every
    accepted spelling of every query parameter (proto name, lowerCamel name, custom json_name,
    in any mix along a dotted path into nested messages, exactly what `resolve_field` accepts)
    is resolved here, so `bind` only does dict lookups. A query key that is not in the table is
    an error except below a recursive message type, where the table stops at the first
    repetition (it would be infinite); such keys, like invalid ones, go through
    `resolve_field` per request, which is also where the error message comes from.
    """

    __slots__ = ("_request_type", "_body", "_path_fields", "_path", "_extra", "_query", "_decode")

    def __init__(
        self,
        request_type: Descriptor,
        body: str,
        path_chains: dict[str, list[FieldDescriptor]],
        extra_fields: tuple[str, ...],
        decode: Callable[[Any, str], Message],
    ) -> None:
        """`path_chains` maps each path variable name to its resolved chain (checked singular
        and scalar by the caller); `extra_fields` are top-level request fields settable through
        `bind(extra=...)`; `decode` turns the assembled dict into the message."""
        self._request_type = request_type
        self._body = body
        self._path_fields = frozenset(path_chains)
        self._path = {name: _setter(chain) for name, chain in path_chains.items()}
        self._extra: dict[str, _FieldSetter] = {}
        for name in extra_fields:
            chain = resolve_field(request_type, (name,))
            if chain is None:
                raise RouteError(f"{request_type.full_name}: field {name!r} does not exist")
            self._extra[name] = _setter(chain)
        # A route whose body is "*" takes no query parameter at all: no table to build.
        self._query = {} if body == "*" else self._query_table()
        self._decode = decode

    def _query_table(self) -> dict[str, _FieldSetter]:
        table: dict[str, _FieldSetter] = {}
        shared: dict[str, _FieldSetter] = {}  # one setter per field, whatever the spelling

        def walk(desc: Descriptor, prefix: str, chain: list[FieldDescriptor], open_types: frozenset[str]) -> None:
            spellings = {*desc.fields_by_name, *desc.fields_by_camelcase_name, *(f.json_name for f in desc.fields)}
            for part in spellings:
                if "." in part:
                    continue  # a custom json_name with a dot: resolve_field splits it, never matches
                f = _field_named(desc, part)
                assert f is not None  # every spelling comes from desc itself
                key, here = prefix + part, chain + [f]
                if _query_key_problem(here, self._path_fields, self._body) is None:
                    dotted = ".".join(x.name for x in here)
                    table[key] = shared.setdefault(dotted, _setter(here))
                # Go deeper where resolve_field does (message, not map), except where every key
                # below is an error anyway: inside a repeated field, or inside the body field.
                if f.type != FieldDescriptor.TYPE_MESSAGE or is_map(f) or f.is_repeated or here[0].name == self._body:
                    continue
                if f.message_type.full_name in open_types:
                    continue  # recursive type: deeper keys are left to the per-request fallback
                walk(f.message_type, key + ".", here, open_types | {f.message_type.full_name})

        walk(self._request_type, "", [], frozenset({self._request_type.full_name}))
        return table

    def _query_setter_fallback(self, key: str) -> _FieldSetter:
        """The setter for a key missing from the table, or the RequestError saying why not."""
        chain = resolve_field(self._request_type, tuple(key.split(".")))
        problem = _query_key_problem(chain, self._path_fields, self._body)
        if problem is not None:
            raise RequestError(problem.format(key=key), key)
        assert chain is not None
        return _setter(chain)

    def bind(
        self,
        path_values: dict[str, str],
        query: list[tuple[str, str]],
        body: bytes | None,
        extra: dict[str, str] | None = None,
    ) -> Message:
        """The request message from the matched path, the query pairs and the raw JSON body.

        Preconditions: the keys of `path_values` are path-variable names of this route (as
        `PathTemplate.match` returns them) and the keys of `extra` are fields named when the
        binder was built (the SSE resume field); anything else is a KeyError, a caller bug.
        Path values and `extra` override what the body and the query say about the same field.
        Raises RequestError / CodecError (both 400) for anything the client got wrong.
        """
        obj: dict[str, Any]
        if self._body == "*":
            obj = _parse_json(body) if body else {}
            if not isinstance(obj, dict):
                raise RequestError("the request body must be a JSON object")
        elif self._body:
            obj = {}
            if body:
                obj[self._body] = _parse_json(body)
        else:
            obj = {}
        if query:
            if self._body == "*":
                raise RequestError(f"unknown query parameter '{query[0][0]}' (this route takes a JSON body)", query[0][0])
            seen: set[str] = set()
            for key, text in query:
                setter = self._query.get(key) or self._query_setter_fallback(key)
                # Converted before the duplicate check: a bad value is reported as such.
                value = setter.convert(text)
                target = _set_path(obj, setter.parents)
                if setter.repeated:
                    target.setdefault(setter.name, []).append(value)
                else:
                    if setter.dotted in seen:
                        raise RequestError(f"query parameter '{key}' given more than once", key)
                    seen.add(setter.dotted)
                    target[setter.name] = value
        for name, text in path_values.items():
            _assign(obj, self._path[name], text)
        if extra:
            for name, text in extra.items():
                _assign(obj, self._extra[name], text)
        return self._decode(obj, "")


def _parse_json(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise RequestError(f"malformed JSON body: {str(exc).split(':')[0]}") from None


def _field_named(desc: Descriptor, part: str) -> FieldDescriptor | None:
    """The field of `desc` called `part`: proto name first, then lowerCamel, then json_name."""
    f = desc.fields_by_name.get(part) or desc.fields_by_camelcase_name.get(part)
    if f is None:
        f = next((x for x in desc.fields if x.json_name == part), None)
    return f


def resolve_field(desc: Descriptor, parts: tuple[str, ...]) -> list[FieldDescriptor] | None:
    """The chain of fields for a dotted path (proto or JSON names), or None.

    Start-up only (and the binder's fallback for keys it did not foresee): it scans fields.
    """
    chain: list[FieldDescriptor] = []
    current: Descriptor | None = desc
    for part in parts:
        if current is None:
            return None
        f = _field_named(current, part)
        if f is None:
            return None
        chain.append(f)
        current = f.message_type if f.type == FieldDescriptor.TYPE_MESSAGE and not is_map(f) else None
    return chain


_ENUM_NUMBER = re.compile(r"-?[0-9]{1,10}")


def _text_converter(field: FieldDescriptor) -> Callable[[str], Any]:
    """For a path/query text, the JSON value the codec expects (numbers may stay strings)."""
    target = field
    if field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type.full_name.endswith(("BoolValue",)):
        target = field.message_type.fields_by_name["value"]
    if target.type == FieldDescriptor.TYPE_BOOL:
        name = field.name  # the wrapper field, not its "value", is what the client named

        def to_bool(text: str) -> bool:
            lowered = text.lower()
            if lowered in ("true", "1"):
                return True
            if lowered in ("false", "0"):
                return False
            raise CodecError(name, "expected true or false")

        return to_bool
    if target.type == FieldDescriptor.TYPE_ENUM:
        # A number selects the value by number; anything else is a name, checked by the codec.
        return lambda text: int(text) if _ENUM_NUMBER.fullmatch(text) else text
    return _as_is


def _as_is(text: str) -> str:
    return text


def _set_path(obj: dict[str, Any], parents: tuple[tuple[str, str], ...]) -> dict[str, Any]:
    """The dict of the innermost parent message, created as needed.

    A nested dict the body gave under the JSON name is moved under the proto name, so the
    decoder does not see the same message twice.
    """
    for name, json_name in parents:
        nested = obj.get(name)
        if nested is None:
            nested = obj.pop(json_name, None)
        if not isinstance(nested, dict):
            nested = {}
        obj[name] = nested
        obj = nested
    return obj


def _assign(obj: dict[str, Any], setter: _FieldSetter, text: str) -> None:
    """Set a path-bound (or extra) field, overriding whatever the body said about it."""
    value = setter.convert(text)
    target = _set_path(obj, setter.parents)
    target.pop(setter.json_name, None)
    target[setter.name] = value


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
