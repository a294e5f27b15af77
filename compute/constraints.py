"""Request constraints declared in the protos (protovalidate's `buf.validate` options), enforced
on every call before its operation runs: one rule, written once, for gRPC and REST callers,
and for the OpenAPI document (gateway/constraints.py translates the same options).

A violation is INVALID_ARGUMENT with a message naming the field and one google.rpc.BadRequest
field violation per broken rule. Limits known only at run time (the table's dimension,
`max_k` when set below the proto's bound) stay as checks in the operations.
"""

from __future__ import annotations

from typing import Any

import protovalidate
from buf.validate import validate_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from compute.errors import InvalidArgument

# buf.validate's option of each kind of definition.
_EXTENSIONS = {"MessageOptions": validate_pb2.message, "OneofOptions": validate_pb2.oneof, "FieldOptions": validate_pb2.field}

_validator = protovalidate.Validator()
MAX_DETAILS = 20


def has_rules(message: Descriptor, _seen: set[str] | None = None) -> bool:
    """Whether validating this message type can find anything (so calls without rules skip it)."""
    seen = _seen if _seen is not None else set()
    if message.full_name in seen:
        return False
    seen.add(message.full_name)
    if _annotated(message) or any(_annotated(oneof) for oneof in message.oneofs):
        return True
    for field in message.fields:
        if _annotated(field):
            return True
        if field.type == FieldDescriptor.TYPE_MESSAGE and has_rules(field.message_type, seen):
            return True
    return False


def check(request: Any) -> None:
    """Raise InvalidArgument (with BadRequest field violations) if the request breaks a rule."""
    violations = _validator.collect_violations(request)
    if not violations:
        return
    # At most MAX_DETAILS in the details: they travel in a gRPC trailer, whose size is limited.
    pairs = [(field_path(v.proto.field), v.proto.message) for v in violations[:MAX_DETAILS]]
    first_field, first_message = pairs[0]
    summary = f"{first_field}: {first_message}" if first_field else first_message
    if len(violations) > 1:
        summary += f" (and {len(violations) - 1} more)"
    raise InvalidArgument(summary, field_violations=pairs)


def field_path(path: Any) -> str:
    """'vector[3]', 'batch_search.item_ids[0]', 'counts["x"]': the path of the field at fault
    ("" for a rule on the message itself)."""
    out = ""
    for element in path.elements if path is not None else ():
        out += ("." if out else "") + element.field_name
        subscript = element.subscript
        if subscript is not None:
            value = subscript.value
            out += f"[{value}]" if subscript.field in ("index", "int_key", "uint_key") else f"[{value!r}]"
    return out


def _annotated(descriptor: Any) -> bool:
    options = descriptor.GetOptions()
    extension = _EXTENSIONS[type(options).__name__]
    return options.HasExtension(extension)
