"""google.api.http path templates: parsed and compiled to a regex once, at start-up.

Grammar (google/api/http.proto):
    Template = "/" Segments [ Verb ] ;  Segments = Segment { "/" Segment } ;
    Segment  = "*" | "**" | LITERAL | Variable ;  Variable = "{" FieldPath [ "=" Segments ] "}" ;
    Verb     = ":" LITERAL ;
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote


class RouteError(ValueError):
    """A malformed annotation: raised at start-up, never per request."""


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
    verb: str = ""  # the custom method after ':' ("cancel"), if any

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
    return PathTemplate(template, regex, tuple(variables), openapi, verb)


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
