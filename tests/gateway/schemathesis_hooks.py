"""schemathesis checks for tests/gateway/test_schemathesis.py (loaded with SCHEMATHESIS_HOOKS).

Three built-in checks, each less one exclusion the schema cannot carry (see that test's docstring).
"""

from __future__ import annotations

import re

import schemathesis
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import negative_data_rejection, positive_data_acceptance

RUNTIME_ONLY = [
    re.compile(r"vector must have \d+ values"),  # the table's dimension: compute knows it, the schema cannot
    re.compile(r"vectors\[\d+\] must have \d+ values"),
    re.compile(r"has zero length"),  # a zero vector: JSON Schema cannot say "not all zeros"
    re.compile(r"item_ids\[\d+\] is not a known item"),  # data, not shape
    re.compile(r"^page_token is invalid"),  # opaque and server-issued (AIP-158)
]
SHORT_DEADLINE_SECONDS = 1.0


def _message(response) -> str:
    try:
        return response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return ""


def _status(response) -> str:
    try:
        return response.json()["error"]["status"]
    except (ValueError, KeyError, TypeError):
        return ""


@schemathesis.check
def valid_data_accepted_but_for_runtime_limits(ctx, response, case):
    if response.status_code == 400 and any(p.search(_message(response)) for p in RUNTIME_ONLY):
        return None
    if response.status_code == 400 and _status(response) == "FAILED_PRECONDITION":
        return None  # the resource's state (cancelling a finished job), not the request's shape
    return positive_data_acceptance(ctx, response, case)


@schemathesis.check
def no_server_error_but_for_short_deadlines(ctx, response, case):
    if response.status_code == 504:
        timeout = float((case.headers or {}).get("X-Request-Timeout", "inf"))
        body = response.json() if response.content else {}
        if timeout < SHORT_DEADLINE_SECONDS and body.get("error", {}).get("status") == "DEADLINE_EXCEEDED":
            return None
    return not_a_server_error(ctx, response, case)


@schemathesis.check
def invalid_data_rejected_but_unknown_headers(ctx, response, case):
    """An HTTP server ignores headers it does not know (proxies and clients add their own):
    a request whose only "violation" is an extra header is not expected to be refused."""
    phase = case.meta.phase if case.meta is not None else None
    data = getattr(phase, "data", None)
    location = getattr(data, "parameter_location", None)
    if getattr(data, "scenario", None) == "object_unexpected_properties" and getattr(location, "value", location) == "header":
        return None
    return negative_data_rejection(ctx, response, case)

