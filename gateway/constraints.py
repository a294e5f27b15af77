"""protovalidate's `buf.validate` rules as JSON Schema keywords, for the OpenAPI document.

Compute enforces the rules (compute/constraints.py); this states the same ones to OpenAPI
clients, so a generated client or validator accepts what compute accepts. Translated:
- numbers: gte/gt/lte/lt/const/in (32-bit integers and floats; 64-bit integers are JSON
  strings, so only `gte: 0` is said, as a pattern of digits);
- strings: min_len/max_len/pattern/const/in, uuid/email/uri as formats;
- repeated: min_items/max_items/unique, and `items` rules on the elements;
- maps: min_pairs/max_pairs;
- enums: defined_only (the names list already says it), in/not_in;
- `required` (and google.api.field_behavior REQUIRED) -> the message's `required` list;
- a required oneof -> `oneOf` over its members.
Rules JSON Schema cannot state (CEL expressions, byte lengths) are left to compute; the
schema says less than compute checks there, never something else.
"""

from __future__ import annotations

from typing import Any

from buf.validate import validate_pb2
from google.api import field_behavior_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor as FD

_NUMERIC = {
    FD.TYPE_INT32: "int32", FD.TYPE_SINT32: "sint32", FD.TYPE_SFIXED32: "sfixed32",
    FD.TYPE_UINT32: "uint32", FD.TYPE_FIXED32: "fixed32", FD.TYPE_FLOAT: "float", FD.TYPE_DOUBLE: "double",
}
_BOUNDS = {"gte": "minimum", "lte": "maximum", "gt": "exclusiveMinimum", "lt": "exclusiveMaximum"}
_STRING_FORMATS = {"uuid": "uuid", "email": "email", "uri": "uri", "hostname": "hostname", "ipv4": "ipv4", "ipv6": "ipv6"}


def field_rules(field: FD) -> Any | None:
    options = field.GetOptions()
    return options.Extensions[validate_pb2.field] if options.HasExtension(validate_pb2.field) else None


def is_required(field: FD) -> bool:
    """Required outright, or in effect: a field without presence is its zero value when absent
    (an empty list, ""), so a rule the zero value breaks makes leaving it out an error."""
    if field_behavior_pb2.REQUIRED in field.GetOptions().Extensions[field_behavior_pb2.field_behavior]:
        return True
    rules = field_rules(field)
    if rules is None:
        return False
    if rules.required:
        return True
    kind = rules.WhichOneof("type")
    if kind == "repeated":
        return rules.repeated.min_items > 0
    if kind == "map":
        return rules.map.min_pairs > 0
    if kind == "string" and not field.has_presence:
        return rules.string.min_len > 0
    return False


def value_keywords(field: FD, rules: Any, element: bool = False) -> dict[str, Any]:
    """Keywords for one value of the field (an element, for repeated fields' `items`)."""
    if rules is None:
        return {}
    kind = rules.WhichOneof("type")
    if kind is None:
        return {}
    typed = getattr(rules, kind)
    if kind == "repeated" and not element:
        return {}  # handled by list_keywords
    if kind in ("int64", "sint64", "sfixed64") and typed.HasField("gte") and typed.gte >= 0:
        return {"pattern": "^[0-9]{1,18}$"}  # a JSON string: only "not negative" can be said
    if kind in _NUMERIC.values():
        out = _present(typed, _BOUNDS)
        if typed.HasField("const"):
            out["const"] = typed.const
        if len(getattr(typed, "in")):
            out["enum"] = list(getattr(typed, "in"))
        return out
    if kind == "string":
        out = _present(typed, {"min_len": "minLength", "max_len": "maxLength", "pattern": "pattern", "const": "const"})
        if len(getattr(typed, "in")):
            out["enum"] = list(getattr(typed, "in"))
        well_known = typed.WhichOneof("well_known")
        if well_known in _STRING_FORMATS and getattr(typed, well_known):
            out["format"] = _STRING_FORMATS[well_known]
        return out
    return {}  # enums: enum_allowed()


def enum_allowed(field: FD) -> set[int] | None:
    """The enum numbers a field's rules allow (`in`, `not_in`); None when every defined value is.
    For a repeated enum field, the rules of its elements (`repeated.items.enum`)."""
    rules = field_rules(field)
    if rules is not None and rules.WhichOneof("type") == "repeated" and rules.repeated.HasField("items"):
        rules = rules.repeated.items
    if rules is None or rules.WhichOneof("type") != "enum":
        return None
    typed = rules.enum
    defined = {v.number for v in field.enum_type.values}
    allowed = (set(getattr(typed, "in")) or defined) - set(typed.not_in)
    return None if allowed == defined else allowed


def list_keywords(field: FD) -> tuple[dict[str, Any], dict[str, Any]]:
    """(keywords of the array or object, keywords of each element) of a repeated or map field."""
    rules = field_rules(field)
    if rules is None:
        return {}, {}
    kind = rules.WhichOneof("type")
    if kind == "repeated":
        typed = rules.repeated
        out = _present(typed, {"min_items": "minItems", "max_items": "maxItems"})
        if typed.unique:
            out["uniqueItems"] = True
        return out, value_keywords(field, typed.items, element=True) if typed.HasField("items") else {}
    if kind == "map":
        return _present(rules.map, {"min_pairs": "minProperties", "max_pairs": "maxProperties"}), {}
    return {}, {}


def required_oneofs(message: Descriptor) -> list[list[str]]:
    """The JSON names of the members of each oneof that must be set: declared oneofs with
    `(buf.validate.oneof).required`, and `(buf.validate.message).oneof` groups of plain fields."""
    found = []
    for oneof in message.oneofs:
        options = oneof.GetOptions()
        if options.HasExtension(validate_pb2.oneof) and options.Extensions[validate_pb2.oneof].required:
            found.append([f.json_name for f in oneof.fields])
    options = message.GetOptions()
    if options.HasExtension(validate_pb2.message):
        for group in options.Extensions[validate_pb2.message].oneof:
            if group.required:
                found.append([message.fields_by_name[name].json_name for name in group.fields])
    return found


def set_keywords(message: Descriptor, json_name: str) -> dict[str, Any]:
    """What "this field is set" means in JSON: present, and for a list or a string, not empty."""
    field = next(f for f in message.fields if f.json_name == json_name)
    if field.is_repeated:
        return {"properties": {json_name: {"minItems": 1}}} if not _is_map(field) else {"properties": {json_name: {"minProperties": 1}}}
    if field.type == FD.TYPE_STRING and not field.has_presence:
        return {"properties": {json_name: {"minLength": 1}}}
    return {}


def _is_map(field: FD) -> bool:
    return field.type == FD.TYPE_MESSAGE and field.message_type.GetOptions().map_entry


def _present(rules: Any, keywords: dict[str, str]) -> dict[str, Any]:
    """JSON Schema keyword -> value, for each rule field that is set."""
    return {keyword: getattr(rules, name) for name, keyword in keywords.items() if rules.HasField(name)}
