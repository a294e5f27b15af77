"""Domain errors, raised by operations (on the loop or in pool workers).

Each carries a google.rpc.Code *name*, not a grpc object: pool workers never import grpc.
The servicer turns them into a gRPC status in one place (compute/servicer.py).
Messages are shown to callers: say what is wrong, never echo input or paths.
"""

from __future__ import annotations


class ComputeError(Exception):
    code = "INTERNAL"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(ComputeError):
    """`field_violations`: (field path, description) pairs, sent as google.rpc.BadRequest."""

    code = "INVALID_ARGUMENT"

    def __init__(self, message: str, field_violations: list[tuple[str, str]] | tuple = ()) -> None:
        super().__init__(message)
        self.field_violations = list(field_violations)

    def __reduce__(self):  # keep the violations across pickling (raised in pool workers)
        return (type(self), (self.message, self.field_violations))


class NotFound(ComputeError):
    code = "NOT_FOUND"


class FailedPrecondition(ComputeError):
    code = "FAILED_PRECONDITION"


class AlreadyExists(ComputeError):
    code = "ALREADY_EXISTS"


class Aborted(ComputeError):
    """A conflict with another operation under way (e.g. a second table load): retry after it."""

    code = "ABORTED"


class Cancelled(ComputeError):
    code = "CANCELLED"


class DeadlineExceeded(ComputeError):
    code = "DEADLINE_EXCEEDED"


class Unavailable(ComputeError):
    """Transient: the caller may retry (a pool worker died, compute is starting or draining)."""

    code = "UNAVAILABLE"


class ResourceExhausted(ComputeError):
    """Admission control said no; `retry_after` (seconds) is a hint for the caller."""

    code = "RESOURCE_EXHAUSTED"

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def __reduce__(self):  # keep retry_after across pickling
        return (type(self), (self.message, self.retry_after))


class Internal(ComputeError):
    """A bug in an operation: logged with its stack where it happened; callers see only this."""

    code = "INTERNAL"
