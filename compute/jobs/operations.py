"""The job RPCs of offload.v1.ComputeService: all light (the loop only awaits the store's thread).

Ids and tokens are checked before any store access: a malformed id is NOT_FOUND (ids are
unguessable, their format is nobody's business), an empty or oversized one INVALID_ARGUMENT.
Watch events carry the job without its result: read pages of it with GetJob.
"""

from __future__ import annotations

import asyncio
import logging
import base64
import binascii
import json
import re
import time
from typing import AsyncIterator

from compute.errors import AlreadyExists, InvalidArgument, NotFound, Unavailable
from compute.jobs import store as st
from compute.jobs.messages import DEFAULT_EVENTS, EVENT_TYPES, to_proto
from compute.jobs.runner import JobService
from compute.jobs.types import result_page
from compute.registry import light
from compute.runtime import Runtime
from offload import context
from offload.v1 import jobs_pb2

SERVICE = "offload.v1.ComputeService"
audit = logging.getLogger("compute.audit")
MAX_PAGE_TOKEN_CHARS = 256
DEFAULT_LIST_PAGE = 50
MAX_LIST_PAGE = 500
DELIVERIES_SHOWN = 20
_JOB_ID = re.compile(r"[A-Za-z0-9_-]{24}")


def _service(runtime: Runtime) -> JobService:
    service = runtime.services.get("jobs")
    if service is None:
        raise Unavailable("jobs are not enabled on this compute")
    return service


def checked_id(value: str) -> str:
    """A job id (the proto bounds its length); one that no job could have is NOT_FOUND."""
    if not _JOB_ID.fullmatch(value):
        raise NotFound("no job with this id")
    return value


@light(f"{SERVICE}.SubmitJob")
async def submit_job(request: jobs_pb2.SubmitJobRequest, runtime: Runtime) -> jobs_pb2.Job:
    service = _service(runtime)
    key = request.idempotency_key  # the proto bounds it and requires a spec
    kind = request.WhichOneof("spec")
    job_type = service.types.get(kind)
    if job_type is None:
        raise InvalidArgument(f"job type {kind} is not served by this compute")
    # Validates the spec (raises InvalidArgument). In a thread: a 100k-query spec takes ~0.25 s of
    # numpy and Python, and the loop keeps serving meanwhile (the GIL is switched every 5 ms).
    chunks = await asyncio.to_thread(job_type.plan, getattr(request, kind), runtime)
    spec = request.SerializeToString(deterministic=True)
    webhook = None
    if request.HasField("webhook"):
        events = list(dict.fromkeys(EVENT_TYPES[value] for value in request.webhook.events)) or list(DEFAULT_EVENTS)
        webhook = (request.webhook.url, events)
    ctx = context.current() or context.RequestContext(context.new_request_id())
    record, created = await service.submit(kind, spec, key, ctx, sum(chunk.entries for chunk in chunks), webhook)
    if not created and record.spec != spec:
        raise AlreadyExists("this idempotency_key was already used for a different job")
    # Who did what, with the caller's principal (the API key's id) and request id on the line.
    audit.info("job submitted" if created else "job submit repeated", extra={"job_id": record.id, "job_type": kind})
    return to_proto(record)


@light(f"{SERVICE}.GetJob")
async def get_job(request: jobs_pb2.GetJobRequest, runtime: Runtime) -> jobs_pb2.Job:
    service = _service(runtime)
    settings = runtime.settings
    job_id = checked_id(request.id)
    limit = min(request.result_limit or settings.jobs_result_page_default, settings.jobs_result_page_max)
    record = await service.get(job_id)
    deliveries = await service.store.deliveries(job_id, DELIVERIES_SHOWN) if record.webhook_url else ()
    job = to_proto(record, deliveries)
    if record.done:
        job.table_generations.extend(sorted(set((await service.store.chunk_generations(job_id)).values())))
    job_type = service.types.get(record.type)
    if record.state == st.SUCCEEDED and job_type is not None:
        chunks = await service.store.result_chunks(job_id, request.result_offset, limit)
        job.result.CopyFrom(result_page(job_type, ((c.first, c.payload) for c in chunks), request.result_offset, limit))
    return job


def _encode_token(record: st.JobRecord) -> str:
    return base64.urlsafe_b64encode(json.dumps([record.create_time, record.id]).encode()).decode()


def _decode_token(token: str) -> tuple[float, str] | None:
    if not token:
        return None
    try:
        if len(token) > MAX_PAGE_TOKEN_CHARS:
            raise ValueError("too long")
        create_time, job_id = json.loads(base64.urlsafe_b64decode(token.encode("ascii")))
        if not isinstance(create_time, float) or not isinstance(job_id, str) or not _JOB_ID.fullmatch(job_id):
            raise ValueError("bad fields")
        return create_time, job_id
    except (ValueError, TypeError, UnicodeError, binascii.Error) as exc:
        raise InvalidArgument("page_token is invalid: pass next_page_token from the previous page") from exc


@light(f"{SERVICE}.ListJobs")
async def list_jobs(request: jobs_pb2.ListJobsRequest, runtime: Runtime) -> jobs_pb2.ListJobsResponse:
    service = _service(runtime)
    state = None if request.state == jobs_pb2.JOB_STATE_UNSPECIFIED else jobs_pb2.JobState.Name(request.state)
    size = min(request.page_size or DEFAULT_LIST_PAGE, MAX_LIST_PAGE)
    after = _decode_token(request.page_token)
    records = await service.store.list(state, size + 1, after, time.time())
    response = jobs_pb2.ListJobsResponse(jobs=[to_proto(r) for r in records[:size]])
    if len(records) > size:
        response.next_page_token = _encode_token(records[size - 1])
    return response


@light(f"{SERVICE}.CancelJob")
async def cancel_job(request: jobs_pb2.CancelJobRequest, runtime: Runtime) -> jobs_pb2.Job:
    record = await _service(runtime).cancel(checked_id(request.id))
    audit.info("job cancelled", extra={"job_id": record.id, "state": record.state})
    return to_proto(record)


@light(f"{SERVICE}.WatchJob")
async def watch_job(request: jobs_pb2.WatchJobRequest, runtime: Runtime) -> AsyncIterator[jobs_pb2.JobEvent]:
    service = _service(runtime)
    job_id = checked_id(request.id)
    async for record in service.watch(job_id, request.after_sequence):
        yield jobs_pb2.JobEvent(sequence=record.sequence, job=to_proto(record))

