"""How a job type is declared: a planner (compute process, in a thread), a chunk function (pool).

    def search_chunk(chunk, task) -> bytes: ...          # module-level: pool workers import it

    @job_type("batch_search", chunk=search_chunk)
    def plan_batch_search(spec, runtime) -> list[Chunk]: ...

The name is the field of the `spec` oneof in SubmitJobRequest and of the `result` oneof in
JobResult. The planner validates the spec (raise InvalidArgument) and splits it into chunks;
it must be deterministic, because a job interrupted by a restart is re-planned from its
stored spec and resumes at its first chunk without results. Each chunk function returns the
JobResult field's message, serialized, holding `Chunk.entries` entries of its one repeated
field: results are stored per chunk and served in pages without ever being unpickled.

Adding a job type = one oneof field in SubmitJobRequest and JobResult (`make protos`) + one
module with a decorated planner, listed in the `extra_job_type_modules` setting.
Like heavy operations, job-type modules must not import grpc.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from google.protobuf import message as pb_message
from google.protobuf import message_factory

from compute.registry import find_marked
from offload.v1 import jobs_pb2

_TAG = "__offload_job_type__"


@dataclass(frozen=True, slots=True)
class Chunk:
    """One unit of pool work: `request` is sent to the chunk function (pickled, in-host only)."""

    request: Any
    entries: int  # result entries this chunk produces (its share of the progress total)


@dataclass(frozen=True, slots=True)
class JobType:
    name: str
    plan: Callable[[Any, Any], list[Chunk]]
    run_chunk: Callable[[Any, Any], bytes]
    # Derived from the descriptors when collected:
    result_cls: type[pb_message.Message] | None = None
    entries_field: str = ""


def job_type(name: str, *, chunk: Callable[[Any, Any], bytes]) -> Callable[[Callable], Callable]:
    def mark(plan: Callable) -> Callable:
        setattr(plan, _TAG, JobType(name, plan, chunk))
        return plan

    return mark


def _resolve(job: JobType) -> JobType:
    """Check a job type against the protos and fill in its result message class."""
    spec_field = jobs_pb2.SubmitJobRequest.DESCRIPTOR.fields_by_name.get(job.name)
    if spec_field is None or spec_field.containing_oneof is None or spec_field.containing_oneof.name != "spec":
        raise ValueError(f"job type {job.name!r}: SubmitJobRequest has no field {job.name!r} in its `spec` oneof")
    result_field = jobs_pb2.JobResult.DESCRIPTOR.fields_by_name.get(job.name)
    if result_field is None or result_field.message_type is None:
        raise ValueError(f"job type {job.name!r}: JobResult has no message field {job.name!r}")
    repeated = [f for f in result_field.message_type.fields if f.is_repeated]
    if len(repeated) != 1:
        raise ValueError(f"job type {job.name!r}: its result message needs exactly one repeated field")
    fn = job.run_chunk
    module = sys.modules.get(fn.__module__)
    if getattr(module, fn.__name__, None) is not fn:
        raise ValueError(f"job type {job.name!r}: the chunk function must be a module-level function")
    result_cls = message_factory.GetMessageClass(result_field.message_type)
    return JobType(job.name, job.plan, job.run_chunk, result_cls, repeated[0].name)


def collect(module_names: Iterable[str]) -> dict[str, JobType]:
    """Import the modules and return their job types by name (duplicates refused)."""
    types: dict[str, JobType] = {}
    for value, job in find_marked(module_names, _TAG):
        if isinstance(job, JobType) and job.plan is value:
            if job.name in types and types[job.name].plan is not job.plan:
                raise ValueError(f"two job types named {job.name!r}")
            types[job.name] = _resolve(job)
    return types


def result_page(job: JobType, chunks: Iterable[tuple[int, bytes]], offset: int, limit: int) -> jobs_pb2.JobResult:
    """Entries [offset, offset + limit) from stored chunks given as (first entry, payload)."""
    assert job.result_cls is not None
    page = job.result_cls()
    entries = getattr(page, job.entries_field)
    end = offset + limit
    for first, payload in chunks:
        stored = getattr(job.result_cls.FromString(payload), job.entries_field)
        entries.extend(stored[max(0, offset - first) : max(0, end - first)])
    result = jobs_pb2.JobResult()
    getattr(result, job.name).CopyFrom(page)
    return result
