"""`RequestBinder`: one HTTP request (path values, query pairs, JSON body) -> the request message.

One binder per route, built at start-up with every field name a client may use already resolved
to descriptors, so binding a request costs dict lookups, not descriptor scans.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

import orjson
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from gateway.json_codec import CodecError, is_map, is_scalar_like
from gateway.path_template import RouteError


class RequestError(ValueError):
    """The HTTP request cannot become the request message (400); `field` names the culprit."""

    def __init__(self, message: str, field: str = "") -> None:
        self.field = field
        super().__init__(message)


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
