"""How an operation is declared: one function, marked light or heavy, named by its RPC.

    @light("offload.v1.ComputeService.GetItem")
    def get_item(request, runtime): ...          # runs on the event loop: must be fast

    @heavy("offload.v1.ComputeService.Search", validate=check_search, batch=search_segment, merge=merge_search)
    def search(request, task): ...               # runs in a pool worker with the shared table

`batch` (optional) opts a heavy operation into dynamic batching: calls of it that wait for
a worker run together, as `batch([request, ...], batch_task)`, which returns one response
per request (see compute/worker.py `BatchTask` for each member's own deadline and
cancellation). A call that finds a worker free runs alone, through the function itself.

`merge` (optional, with `batch`) makes it a segmented scan: `batch` then scans only
`batch_task.rows` (one segment of the table) and returns a partial result per request, and
`merge(request, partials, runtime)` combines a call's partials on the loop. Calls join a
scan at the next segment, and one call's segments run on several workers at once
(compute/scheduler.py). Search is one: `search_segment` and `merge_search`.

The decorators only tag the function; `collect()` gathers the tagged functions of the
modules listed in settings. The servicer derives everything else (request/response types,
streaming, error mapping, deadlines, admission) from the proto descriptors.
Light functions may be `def`, `async def` or async generators (server-streaming RPCs).
Heavy functions must be module-level (pool workers import them by name) and never import grpc.
"""

from __future__ import annotations

import enum
import importlib
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

_TAG = "__offload_operation__"


class Kind(enum.Enum):
    LIGHT = "light"
    HEAVY = "heavy"


@dataclass(frozen=True, slots=True)
class Operation:
    method: str  # full proto name: "package.Service.Method"
    fn: Callable[..., Any]
    kind: Kind
    # Heavy only: runs on the loop before admission, raises InvalidArgument (cheap checks).
    validate: Callable[[Any, Any], None] | None = None
    # Heavy only: runs several waiting calls at once (dynamic batching); module-level too.
    batch: Callable[[list[Any], Any], list[Any]] | None = None
    # With batch: combines a call's per-segment results, on the loop (a segmented scan).
    merge: Callable[[Any, list[Any], Any], Any] | None = None


def light(method: str) -> Callable[[Callable], Callable]:
    def mark(fn: Callable) -> Callable:
        setattr(fn, _TAG, Operation(method, fn, Kind.LIGHT))
        return fn

    return mark


def heavy(
    method: str,
    *,
    validate: Callable[[Any, Any], None] | None = None,
    batch: Callable[[list[Any], Any], list[Any]] | None = None,
    merge: Callable[[Any, list[Any], Any], Any] | None = None,
) -> Callable[[Callable], Callable]:
    if batch is not None and "<locals>" in batch.__qualname__:
        raise ValueError(f"{method}: the batch function must be defined at module level (workers import it by name)")
    if merge is not None and batch is None:
        raise ValueError(f"{method}: merge needs a batch function (it combines the batch function's per-segment results)")

    def mark(fn: Callable) -> Callable:
        setattr(fn, _TAG, Operation(method, fn, Kind.HEAVY, validate, batch, merge))
        return fn

    return mark


def find_marked(module_names: Iterable[str], attribute: str) -> Iterator[tuple[Any, Any]]:
    """(value, mark) for each module-level value that a decorator marked with `attribute`."""
    for module_name in module_names:
        module = importlib.import_module(module_name)
        for value in vars(module).values():
            mark = getattr(value, attribute, None)
            if mark is not None:
                yield value, mark


def collect(module_names: Iterable[str]) -> dict[str, Operation]:
    """Import the modules and return their operations by method name (duplicates refused)."""
    operations: dict[str, Operation] = {}
    for value, op in find_marked(module_names, _TAG):
        if isinstance(op, Operation) and op.fn is value:
            if op.method in operations and operations[op.method].fn is not op.fn:
                raise ValueError(f"two operations for {op.method}")
            operations[op.method] = op
    return operations
