"""Protobuf's JSON mapping, without `json_format` on the request path.

`json_format.MessageToDict` is pure Python and costs ~0.5 ms for a 128-float message. Here a
converter per message type is built once from its descriptor (lazily, then cached), producing
plain dicts/lists that orjson serialises; float32 arrays go through numpy so orjson writes their
shortest float32 form. The rules are protobuf's (https://protobuf.dev/programming-guides/json/):
lowerCamel names out, both names in; 64-bit integers as strings; enums by name; bytes base64;
Timestamp/Duration/FieldMask/wrappers/Struct in their special forms. Deliberate choices:
fields without presence are emitted even when default (as grpc-gateway does), so clients see
`"busy": 0`; NaN/Infinity are rejected in input and never emitted (EncodeError instead).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import math
import re
from typing import Any, Callable

import numpy as np
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor as FD
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

_INT32 = {FD.TYPE_INT32, FD.TYPE_SINT32, FD.TYPE_SFIXED32}
_UINT32 = {FD.TYPE_UINT32, FD.TYPE_FIXED32}
_INT64 = {FD.TYPE_INT64, FD.TYPE_SINT64, FD.TYPE_SFIXED64}
_UINT64 = {FD.TYPE_UINT64, FD.TYPE_FIXED64}
_RANGES = {
    **{t: (-(2**31), 2**31 - 1) for t in _INT32},
    **{t: (0, 2**32 - 1) for t in _UINT32},
    **{t: (-(2**63), 2**63 - 1) for t in _INT64},
    **{t: (0, 2**64 - 1) for t in _UINT64},
}
_FLOAT32_MAX = 3.4028234663852886e38
_WRAPPERS = {
    f"google.protobuf.{n}"
    for n in ("DoubleValue", "FloatValue", "Int64Value", "UInt64Value", "Int32Value", "UInt32Value",
              "BoolValue", "StringValue", "BytesValue")
}
_SCALAR_WKT = {"google.protobuf.Timestamp", "google.protobuf.Duration", "google.protobuf.FieldMask"} | _WRAPPERS
_TIMESTAMP_RE = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?(?:([Zz])|([+-])(\d{2}):(\d{2}))$"
)
_DURATION_RE = re.compile(r"^(-)?(\d+)(?:\.(\d{1,9}))?s$")
_MAX_DURATION_SECONDS = 315_576_000_000
_MIN_TS, _MAX_TS = -62_135_596_800, 253_402_300_799  # 0001-01-01 .. 9999-12-31T23:59:59
_EPOCH = dt.datetime(1970, 1, 1)
_MAX_STRUCT_DEPTH = 32


class CodecError(ValueError):
    """Input that does not follow the JSON mapping; `field` is the dotted path (may be "")."""

    def __init__(self, field: str, problem: str) -> None:
        self.field = field
        self.problem = problem
        super().__init__(f"field '{field}': {problem}" if field else problem)


class EncodeError(ValueError):
    """A message JSON cannot represent (NaN, Infinity): a bug upstream, reported as 500."""


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def is_scalar_like(field: FD) -> bool:
    """Fields settable from one text value (path variables, query parameters)."""
    if field.type == FD.TYPE_MESSAGE:
        return field.message_type.full_name in _SCALAR_WKT
    return True


def is_map(field: FD) -> bool:
    return field.type == FD.TYPE_MESSAGE and field.message_type.GetOptions().map_entry


# -- encoding: message -> JSON-ready Python values ----------------------------------------------


def _check_double(value: float) -> float:
    if not math.isfinite(value):
        raise EncodeError("non-finite number in response")
    return value


def _float32(value: float) -> np.float32:
    if not math.isfinite(value):
        raise EncodeError("non-finite number in response")
    return np.float32(value)


def _float32_array(values: Any) -> np.ndarray:
    array = np.array(values, dtype=np.float32)
    if array.size and not np.isfinite(array).all():
        raise EncodeError("non-finite number in response")
    return array


def _double_list(values: Any) -> list[float]:
    out = list(values)
    # One C-level sum is cheaper than a Python loop; a finite sum means every term is finite
    # (an overflowing sum of finite terms falls back to the exact check).
    if not math.isfinite(sum(out)) and not all(map(math.isfinite, out)):
        raise EncodeError("non-finite number in response")
    return out


def _b64(value: bytes) -> str:
    return base64.b64encode(value).decode("ascii")


def format_timestamp(seconds: int, nanos: int) -> str:
    text = (_EPOCH + dt.timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%S")
    return text + _fraction(nanos) + "Z"


def _fraction(nanos: int) -> str:
    if not nanos:
        return ""
    if nanos % 1_000_000 == 0:
        return f".{nanos // 1_000_000:03d}"
    if nanos % 1000 == 0:
        return f".{nanos // 1000:06d}"
    return f".{nanos:09d}"


def _format_duration(seconds: int, nanos: int) -> str:
    sign = "-" if seconds < 0 or nanos < 0 else ""
    return f"{sign}{abs(seconds)}{_fraction(abs(nanos))}s"


def _camel(path: str) -> str:
    head, *rest = path.split("_")
    return head + "".join(p[:1].upper() + p[1:] for p in rest)


def _snake(path: str) -> str:
    return re.sub(r"([A-Z])", lambda m: "_" + m.group(1).lower(), path)


class Codec:
    """Converters per message type, built once from descriptors and cached. One per app."""

    def __init__(self) -> None:
        self._encoders: dict[str, Callable[[Message], Any]] = {}
        self._decoders: dict[str, Callable[[Any, str], Message]] = {}

    # -- public ---------------------------------------------------------------------------

    def encoder(self, descriptor: Descriptor) -> Callable[[Message], Any]:
        """message -> dict (or the special JSON form of a well-known type)."""
        name = descriptor.full_name
        if name not in self._encoders:
            # Placeholder first so recursive types resolve to the cached function.
            self._encoders[name] = lambda msg: self._encoders[name](msg)
            self._encoders[name] = self._build_encoder(descriptor)
        return self._encoders[name]

    def decoder(self, descriptor: Descriptor) -> Callable[[Any, str], Message]:
        """JSON value (already parsed) -> message; raises CodecError naming the field."""
        name = descriptor.full_name
        if name not in self._decoders:
            self._decoders[name] = lambda value, path: self._decoders[name](value, path)
            self._decoders[name] = self._build_decoder(descriptor)
        return self._decoders[name]

    # -- encoders -------------------------------------------------------------------------

    def _build_encoder(self, desc: Descriptor) -> Callable[[Message], Any]:
        wkt = self._wkt_encoder(desc)
        if wkt is not None:
            return wkt
        plans = []
        for field in desc.fields:
            presence = field.has_presence and not field.is_repeated
            plans.append((field.name, field.json_name, presence, self._field_encoder(field)))

        def encode(msg: Message) -> dict[str, Any]:
            out = {}
            for name, json_name, presence, conv in plans:
                if presence and not msg.HasField(name):
                    continue
                value = getattr(msg, name)
                out[json_name] = value if conv is None else conv(value)
            return out

        return encode

    def _field_encoder(self, field: FD) -> Callable[[Any], Any] | None:
        if is_map(field):
            key_field = field.message_type.fields_by_name["key"]
            value_conv = self._scalar_encoder(field.message_type.fields_by_name["value"])
            if key_field.type == FD.TYPE_BOOL:
                key_conv: Callable[[Any], str] = lambda k: "true" if k else "false"  # noqa: E731
            else:
                key_conv = str
            if value_conv is None:
                return lambda m: {key_conv(k): v for k, v in m.items()}
            return lambda m: {key_conv(k): value_conv(v) for k, v in m.items()}
        if field.is_repeated:
            if field.type == FD.TYPE_FLOAT:
                return _float32_array
            if field.type == FD.TYPE_DOUBLE:
                return _double_list
            conv = self._scalar_encoder(field)
            if conv is None:
                return list
            return lambda values: [conv(v) for v in values]
        return self._scalar_encoder(field)

    def _scalar_encoder(self, field: FD) -> Callable[[Any], Any] | None:
        t = field.type
        if t == FD.TYPE_MESSAGE:
            return self.encoder(field.message_type)
        if t in _INT64 or t in _UINT64:
            return str
        if t == FD.TYPE_FLOAT:
            return _float32
        if t == FD.TYPE_DOUBLE:
            return _check_double
        if t == FD.TYPE_BYTES:
            return _b64
        if t == FD.TYPE_ENUM:
            names = {v.number: v.name for v in field.enum_type.values}
            return lambda n: names.get(n, n)
        return None  # int32 family, bool, string: as they are

    def _wkt_encoder(self, desc: Descriptor) -> Callable[[Message], Any] | None:
        name = desc.full_name
        if name == "google.protobuf.Timestamp":
            def timestamp(msg: Message) -> str:
                if not _MIN_TS <= msg.seconds <= _MAX_TS:
                    raise EncodeError("timestamp out of range in response")
                return format_timestamp(msg.seconds, msg.nanos)
            return timestamp
        if name == "google.protobuf.Duration":
            return lambda msg: _format_duration(msg.seconds, msg.nanos)
        if name == "google.protobuf.FieldMask":
            return lambda msg: ",".join(_camel(p) for p in msg.paths)
        if name in _WRAPPERS:
            conv = self._scalar_encoder(desc.fields_by_name["value"])
            return (lambda msg: msg.value) if conv is None else (lambda msg: conv(msg.value))
        if name == "google.protobuf.Empty":
            return lambda msg: {}
        if name in ("google.protobuf.Struct", "google.protobuf.Value", "google.protobuf.ListValue", "google.protobuf.Any"):
            # Rare in APIs like this one; the reference implementation is fine here.
            return lambda msg: _checked_json(json_format.MessageToDict(msg))
        return None

    # -- decoders -------------------------------------------------------------------------

    def _build_decoder(self, desc: Descriptor) -> Callable[[Any, str], Message]:
        cls = GetMessageClass(desc)
        wkt = self._wkt_decoder(desc, cls)
        if wkt is not None:
            return wkt
        by_key: dict[str, tuple[str, Callable[[Any, str], Any], str | None]] = {}
        for field in desc.fields:
            oneof = field.containing_oneof.name if field.containing_oneof is not None else None
            entry = (field.name, self._field_decoder(field), oneof)
            by_key[field.name] = entry
            by_key[field.json_name] = entry
        has_oneofs = any(f.containing_oneof is not None for f in desc.fields)

        def decode(value: Any, path: str) -> Message:
            if not isinstance(value, dict):
                raise CodecError(path, "expected a JSON object")
            kwargs: dict[str, Any] = {}
            seen_oneofs: dict[str, str] = {}
            for key, item in value.items():
                entry = by_key.get(key)
                here = _join(path, key)
                if entry is None:
                    raise CodecError(here, "unknown field")
                name, conv, oneof = entry
                if name in kwargs:
                    raise CodecError(here, "field given twice (as proto and JSON name)")
                if item is None:
                    continue  # null means "default" in the JSON mapping
                if has_oneofs and oneof is not None:
                    if oneof in seen_oneofs:
                        raise CodecError(here, f"only one of the '{oneof}' fields may be set ({seen_oneofs[oneof]} is)")
                    seen_oneofs[oneof] = key
                kwargs[name] = conv(item, here)
            try:
                return cls(**kwargs)
            except (ValueError, TypeError) as exc:
                raise CodecError(path, "invalid value") from exc

        return decode

    def _field_decoder(self, field: FD) -> Callable[[Any, str], Any]:
        if is_map(field):
            key_conv = _map_key_decoder(field.message_type.fields_by_name["key"])
            value_conv = self._scalar_decoder(field.message_type.fields_by_name["value"])

            def decode_map(value: Any, path: str) -> dict[Any, Any]:
                if not isinstance(value, dict):
                    raise CodecError(path, "expected a JSON object")
                out = {}
                for k, v in value.items():
                    here = _join(path, k)
                    if v is None:
                        raise CodecError(here, "null is not a valid map value")
                    out[key_conv(k, here)] = value_conv(v, here)
                return out

            return decode_map
        conv = self._scalar_decoder(field)
        if not field.is_repeated:
            return conv

        def decode_list(value: Any, path: str) -> list[Any]:
            if not isinstance(value, list):
                raise CodecError(path, "expected a JSON array")
            out = []
            for i, item in enumerate(value):
                if item is None:
                    raise CodecError(f"{path}[{i}]", "null is not a valid array element")
                out.append(conv(item, f"{path}[{i}]"))
            return out

        return decode_list

    def _scalar_decoder(self, field: FD) -> Callable[[Any, str], Any]:
        t = field.type
        if t == FD.TYPE_MESSAGE:
            return self.decoder(field.message_type)
        if t in _RANGES:
            lo, hi = _RANGES[t]
            return lambda v, p: _decode_int(v, p, lo, hi)
        if t == FD.TYPE_FLOAT:
            return lambda v, p: _decode_float(v, p, _FLOAT32_MAX)
        if t == FD.TYPE_DOUBLE:
            return lambda v, p: _decode_float(v, p, math.inf)
        if t == FD.TYPE_BOOL:
            return _decode_bool
        if t == FD.TYPE_STRING:
            return _decode_string
        if t == FD.TYPE_BYTES:
            return _decode_bytes
        if t == FD.TYPE_ENUM:
            return _enum_decoder(field)
        raise TypeError(f"unsupported field type {t} for {field.full_name}")

    def _wkt_decoder(self, desc: Descriptor, cls: type[Message]) -> Callable[[Any, str], Message] | None:
        name = desc.full_name
        if name == "google.protobuf.Timestamp":
            return lambda v, p: cls(**_parse_timestamp(v, p))
        if name == "google.protobuf.Duration":
            return lambda v, p: cls(**_parse_duration(v, p))
        if name == "google.protobuf.FieldMask":
            def field_mask(v: Any, p: str) -> Message:
                text = _decode_string(v, p)
                return cls(paths=[_snake(x) for x in text.split(",") if x])
            return field_mask
        if name in _WRAPPERS:
            conv = self._scalar_decoder(desc.fields_by_name["value"])
            return lambda v, p: cls(value=conv(v, p))
        if name in ("google.protobuf.Struct", "google.protobuf.Value", "google.protobuf.ListValue",
                    "google.protobuf.Empty", "google.protobuf.Any"):
            def reference(v: Any, p: str) -> Message:
                _check_depth(v, p, 0)
                try:
                    return json_format.ParseDict(v, cls())
                except json_format.ParseError as exc:
                    raise CodecError(p, "invalid value") from exc
            return reference
        return None


# -- scalar decoders --------------------------------------------------------------------------


def _decode_int(value: Any, path: str, lo: int, hi: int) -> int:
    if isinstance(value, bool):
        raise CodecError(path, "expected an integer")
    if isinstance(value, int):
        number = value
    elif isinstance(value, float):
        if not value.is_integer():
            raise CodecError(path, "expected an integer")
        number = int(value)
    elif isinstance(value, str):
        try:
            number = int(value)
        except ValueError:
            try:
                as_float = float(value)
            except ValueError:
                raise CodecError(path, "expected an integer") from None
            if not as_float.is_integer():
                raise CodecError(path, "expected an integer") from None
            number = int(as_float)
        if value != value.strip():
            raise CodecError(path, "expected an integer")
    else:
        raise CodecError(path, "expected an integer")
    if not lo <= number <= hi:
        raise CodecError(path, f"integer out of range [{lo}, {hi}]")
    return number


def _decode_float(value: Any, path: str, limit: float) -> float:
    if isinstance(value, bool):
        raise CodecError(path, "expected a number")
    if isinstance(value, (int, float)):
        number = float(value) if not isinstance(value, int) or abs(value) < 2**1023 else math.inf
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            raise CodecError(path, "expected a number") from None
        if value != value.strip():
            raise CodecError(path, "expected a number")
    else:
        raise CodecError(path, "expected a number")
    if not math.isfinite(number):
        raise CodecError(path, "NaN and Infinity are not accepted")
    if abs(number) > limit:
        raise CodecError(path, "number out of range")
    return number


def _decode_bool(value: Any, path: str) -> bool:
    if isinstance(value, bool):
        return value
    raise CodecError(path, "expected true or false")


def _decode_string(value: Any, path: str) -> str:
    if isinstance(value, str):
        return value
    raise CodecError(path, "expected a string")


def _decode_bytes(value: Any, path: str) -> bytes:
    if not isinstance(value, str):
        raise CodecError(path, "expected a base64 string")
    text = value.replace("-", "+").replace("_", "/")
    text += "=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise CodecError(path, "expected a base64 string") from None


def _enum_decoder(field: FD) -> Callable[[Any, str], int]:
    by_name = {v.name: v.number for v in field.enum_type.values}
    known = set(by_name.values())
    closed = getattr(field.enum_type, "is_closed", False)

    def decode(value: Any, path: str) -> int:
        if isinstance(value, str):
            if value in by_name:
                return by_name[value]
            raise CodecError(path, f"unknown enum value; expected one of {', '.join(by_name)}")
        if isinstance(value, int) and not isinstance(value, bool) and -(2**31) <= value < 2**31:
            if closed and value not in known:
                raise CodecError(path, "unknown enum number")
            return value
        raise CodecError(path, f"expected one of {', '.join(by_name)}")

    return decode


def _map_key_decoder(field: FD) -> Callable[[str, str], Any]:
    t = field.type
    if t == FD.TYPE_STRING:
        return lambda k, p: k
    if t == FD.TYPE_BOOL:
        def bool_key(k: str, p: str) -> bool:
            if k in ("true", "false"):
                return k == "true"
            raise CodecError(p, "map key must be true or false")
        return bool_key
    lo, hi = _RANGES[t]
    return lambda k, p: _decode_int(k, p, lo, hi)


def _parse_timestamp(value: Any, path: str) -> dict[str, int]:
    match = _TIMESTAMP_RE.match(value) if isinstance(value, str) else None
    if match is None:
        raise CodecError(path, "expected an RFC 3339 timestamp, e.g. 2024-01-02T03:04:05Z")
    year, month, day, hour, minute, second, frac, _z, sign, off_h, off_m = match.groups()
    try:
        moment = dt.datetime(int(year), int(month), int(day), int(hour), int(minute), int(second))
    except ValueError:
        raise CodecError(path, "invalid date or time") from None
    seconds = int((moment - _EPOCH).total_seconds())
    if sign:
        offset = int(off_h) * 3600 + int(off_m) * 60
        seconds -= offset if sign == "+" else -offset
    if not _MIN_TS <= seconds <= _MAX_TS:
        raise CodecError(path, "timestamp out of range")
    return {"seconds": seconds, "nanos": int((frac or "").ljust(9, "0"))}


def _parse_duration(value: Any, path: str) -> dict[str, int]:
    match = _DURATION_RE.match(value) if isinstance(value, str) else None
    if match is None:
        raise CodecError(path, "expected a duration such as \"1.5s\"")
    negative, whole, frac = match.groups()
    seconds, nanos = int(whole), int((frac or "").ljust(9, "0"))
    if seconds > _MAX_DURATION_SECONDS:
        raise CodecError(path, "duration out of range")
    if negative:
        seconds, nanos = -seconds, -nanos
    return {"seconds": seconds, "nanos": nanos}


def _check_depth(value: Any, path: str, depth: int) -> None:
    if depth > _MAX_STRUCT_DEPTH:
        raise CodecError(path, "nested too deeply")
    if isinstance(value, dict):
        for item in value.values():
            _check_depth(item, path, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _check_depth(item, path, depth + 1)
    elif isinstance(value, float) and not math.isfinite(value):
        raise CodecError(path, "NaN and Infinity are not accepted")


def _checked_json(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _checked_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_checked_json(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        raise EncodeError("non-finite number in response")
    return value
