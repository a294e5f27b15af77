"""Stored jobs as the protos say them: the Job message, and a webhook delivery's JSON body."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Iterable

import orjson
from google.protobuf import json_format, timestamp_pb2

from compute.jobs import store as st
from offload.v1 import jobs_pb2

# Event type <-> WebhookEvent enum value.
EVENT_TYPES = {
    jobs_pb2.JOB_SUCCEEDED: "job.succeeded",
    jobs_pb2.JOB_FAILED: "job.failed",
    jobs_pb2.JOB_CANCELLED: "job.cancelled",
    jobs_pb2.JOB_PROGRESS: "job.progress",
}
EVENT_VALUES = {name: value for value, name in EVENT_TYPES.items()}
DEFAULT_EVENTS = ("job.succeeded", "job.failed", "job.cancelled")


def timestamp(seconds: float | None) -> timestamp_pb2.Timestamp | None:
    if seconds is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def to_proto(record: st.JobRecord, deliveries: Iterable[st.Delivery] = ()) -> jobs_pb2.Job:
    job = jobs_pb2.Job(
        id=record.id,
        state=jobs_pb2.JobState.Value(record.state),
        type=record.type,
        progress=jobs_pb2.JobProgress(done=record.done, total=record.total),
        attempts=record.attempts,
        idempotency_key=record.idempotency_key or "",
        result_count=record.result_count,
        create_time=timestamp(record.create_time),
        update_time=timestamp(record.update_time),
        start_time=timestamp(record.start_time),
        end_time=timestamp(record.end_time),
        expire_time=timestamp(record.expire_time),
    )
    if record.error_code:
        job.error.code = record.error_code
        job.error.message = record.error_message or ""
    if record.webhook_url:
        job.webhook.url = record.webhook_url
        job.webhook.events.extend(EVENT_VALUES[name] for name in record.webhook_events.split(",") if name)
        job.webhook.deliveries.extend(delivery_proto(d) for d in deliveries)
    return job


def delivery_proto(delivery: st.Delivery) -> jobs_pb2.WebhookDelivery:
    message = jobs_pb2.WebhookDelivery(
        id=delivery.id,
        type=delivery.type,
        state=jobs_pb2.WebhookDeliveryState.Value(delivery.state),
        attempts=delivery.attempts,
        last_status_code=delivery.last_status,
        last_error=delivery.last_error or "",
        last_attempt_time=timestamp(delivery.last_attempt_time),
        create_time=timestamp(delivery.create_time),
    )
    if delivery.state == st.PENDING:
        message.next_attempt_time.CopyFrom(timestamp(delivery.next_attempt_time))
    return message


def webhook_body(record: st.JobRecord, event: str, now: float) -> bytes:
    """A Standard Webhooks payload: type, timestamp and the job (proto3 JSON, as GET /v1/jobs/{id}
    shows it, without its result: the receiver fetches pages of that with GetJob).

    json_format is slow (pure Python) but this runs in the job store's thread, once per event.
    """
    data = json_format.MessageToDict(to_proto(record))  # no deliveries: they are given to GetJob only
    stamp = datetime.fromtimestamp(now, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return orjson.dumps({"type": event, "timestamp": stamp, "data": data})
