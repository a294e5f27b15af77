"""Webhooks with real peers: a real compute POSTs to a real HTTP receiver on loopback, and the
receiver checks every signature with the `standardwebhooks` reference library. No test sends
traffic off this machine: the refused destinations are refused before any connect."""

from __future__ import annotations

import base64
import os

import grpc
import psutil
import pytest
from standardwebhooks import Webhook

from tests.conftest import kill_orphans, wait_until
from tests.jobs.helpers import get, stub, submit_ids, wait_state
from tests.jobs.webhook_receiver import Receiver, free_port
from offload.v1 import jobs_pb2

SECRET = "whsec_" + base64.b64encode(os.urandom(32)).decode()
WEBHOOKS = {
    "webhook_secrets": [SECRET],
    "webhook_allowlist": ["127.0.0.1"],
    "webhook_allow_http": True,
    "webhook_backoff_base_seconds": 0.2,
    "webhook_backoff_max_seconds": 0.8,
    "webhook_timeout_seconds": 3,
    "jobs_chunk_queries": 8,
}
IDS = [f"item-{i}" for i in range(0, 2000, 100)]  # 20 queries: 3 chunks


def submit(compute, url: str, events=(), ids=IDS) -> jobs_pb2.Job:
    request = jobs_pb2.SubmitJobRequest(
        batch_search=jobs_pb2.BatchSearchSpec(k=3, item_ids=ids),
        webhook=jobs_pb2.WebhookTarget(url=url, events=list(events)),
    )
    return stub(compute).SubmitJob(request, timeout=10)


def verified(received) -> dict:
    """The payload, after the reference library checked the signature and timestamp."""
    return Webhook(SECRET).verify(received.body, received.headers)


def deliveries(compute, job_id) -> list[jobs_pb2.WebhookDelivery]:
    return list(get(compute, job_id).webhook.deliveries)


def test_terminal_event_is_signed_delivered_and_visible_on_the_job(compute_factory):
    receiver = Receiver().start()
    try:
        compute = compute_factory(**WEBHOOKS)
        job = submit(compute, receiver.url)
        assert job.webhook.url == receiver.url
        assert list(job.webhook.events) == [jobs_pb2.JOB_SUCCEEDED, jobs_pb2.JOB_FAILED, jobs_pb2.JOB_CANCELLED]
        done = wait_state(compute, job.id, {jobs_pb2.SUCCEEDED})
        wait_until(lambda: receiver.received, 10, 0.02, "the webhook")

        [hook] = receiver.received
        payload = verified(hook)
        assert hook.path == "/hooks/offload" and hook.headers["content-type"] == "application/json"
        assert hook.headers["host"] == f"127.0.0.1:{receiver.port}" and hook.headers["user-agent"].startswith("offload-webhooks")
        assert payload["type"] == "job.succeeded" and payload["timestamp"].endswith("Z")
        assert payload["data"]["id"] == job.id and payload["data"]["state"] == "SUCCEEDED"
        assert payload["data"]["progress"] == {"done": "20", "total": "20"}  # proto3 JSON: int64 as strings
        assert "result" not in payload["data"]
        assert hook.headers["webhook-id"].startswith(f"msg_{job.id}_")

        wait_until(lambda: deliveries(compute, job.id)[0].state == jobs_pb2.DELIVERED, 5, 0.05, "DELIVERED on the job")
        [delivery] = deliveries(compute, job.id)
        assert delivery.id == hook.headers["webhook-id"] and delivery.type == "job.succeeded"
        assert delivery.attempts == 1 and delivery.last_status_code == 200 and not delivery.last_error
        assert not delivery.HasField("next_attempt_time")
        latency = hook.at - done.end_time.ToNanoseconds() / 1e9
        print(f"delivery latency after the terminal state: {latency * 1000:.1f} ms")
    finally:
        receiver.stop()


def test_progress_events_when_asked_and_a_cancel_fires_its_own(compute_factory):
    receiver = Receiver().start()
    try:
        compute = compute_factory(**WEBHOOKS)
        job = submit(compute, receiver.url, events=[jobs_pb2.JOB_PROGRESS, jobs_pb2.JOB_SUCCEEDED])
        wait_state(compute, job.id, {jobs_pb2.SUCCEEDED})
        wait_until(lambda: receiver.of_type("job.succeeded"), 10, 0.02, "the terminal webhook")
        wait_until(lambda: len(receiver.of_type("job.progress")) == 3, 10, 0.02, "one progress webhook per chunk")
        progress = sorted(int(verified(r)["data"]["progress"]["done"]) for r in receiver.of_type("job.progress"))
        assert len(set(progress)) == 3 and progress[-1] == 20  # chunks finish in any order, 8 + 8 + 4 entries
        assert len({r.headers["webhook-id"] for r in receiver.received}) == 4  # one id per event

        # Only the events asked for: a cancelled job with the default set sends job.cancelled.
        slow = submit(compute, receiver.url, ids=[f"item-{i}" for i in range(500)])
        stub(compute).CancelJob(jobs_pb2.CancelJobRequest(id=slow.id), timeout=10)
        wait_until(lambda: receiver.of_type("job.cancelled"), 10, 0.02, "the cancel webhook")
        assert verified(receiver.of_type("job.cancelled")[0])["data"]["id"] == slow.id
    finally:
        receiver.stop()


def test_a_receiver_that_is_down_then_failing_then_up_gets_it_after_retries(compute_factory):
    receiver = Receiver(port=free_port(), statuses=[503, 500])  # not listening yet
    try:
        compute = compute_factory(**WEBHOOKS)
        job = submit(compute, receiver.url)
        wait_state(compute, job.id, {jobs_pb2.SUCCEEDED})

        def retried() -> bool:
            found = deliveries(compute, job.id)
            return bool(found) and found[0].attempts >= 2

        wait_until(retried, 15, 0.05, "two refused attempts")
        [pending] = deliveries(compute, job.id)
        assert pending.state == jobs_pb2.PENDING and pending.last_error == "connection refused"
        assert pending.last_status_code == 0 and pending.HasField("next_attempt_time")

        receiver.start()  # up, but answering 503 then 500 before 200
        wait_until(lambda: deliveries(compute, job.id)[0].state == jobs_pb2.DELIVERED, 20, 0.05, "delivered")
        assert len(receiver.received) == 3
        assert {r.headers["webhook-id"] for r in receiver.received} == {pending.id}
        assert all(verified(r)["type"] == "job.succeeded" for r in receiver.received)
        assert len({r.body for r in receiver.received}) == 1  # the same bytes every time
        [delivery] = deliveries(compute, job.id)
        assert delivery.attempts >= 5 and delivery.last_status_code == 200
        attempts = [r for r in compute.log_records() if r.get("msg") == "webhook attempt failed; retrying"]
        print("retry schedule (s):", [a["retry_in_seconds"] for a in attempts], [a["error"] for a in attempts])
    finally:
        receiver.stop()


def test_attempts_are_capped_then_the_delivery_gives_up(compute_factory):
    receiver = Receiver(statuses=[500] * 10).start()
    try:
        compute = compute_factory(**{**WEBHOOKS, "webhook_max_attempts": 3})
        job = submit(compute, receiver.url)
        wait_until(lambda: (deliveries(compute, job.id) or [None])[0] and deliveries(compute, job.id)[0].state == jobs_pb2.GAVE_UP, 20, 0.05, "gave up")
        [delivery] = deliveries(compute, job.id)
        assert delivery.attempts == 3 and delivery.last_status_code == 500 and delivery.last_error == "HTTP 500"
        assert len(receiver.received) == 3
    finally:
        receiver.stop()


@pytest.mark.slow
def test_a_delivery_pending_when_compute_is_sigkilled_arrives_after_the_restart(compute_factory):
    receiver = Receiver(port=free_port())  # down
    try:
        compute = compute_factory(**WEBHOOKS)
        job = submit(compute, receiver.url)
        wait_state(compute, job.id, {jobs_pb2.SUCCEEDED})
        wait_until(lambda: (deliveries(compute, job.id) or [None])[0] and deliveries(compute, job.id)[0].attempts >= 1, 10, 0.05, "a failed attempt")
        owed = deliveries(compute, job.id)[0].id

        children = psutil.Process(compute.pid).children(recursive=True)
        compute.kill()  # SIGKILL
        kill_orphans(children)
        receiver.start()
        compute.start()

        wait_until(lambda: receiver.received, 20, 0.05, "the webhook after the restart")
        wait_until(lambda: deliveries(compute, job.id)[0].state == jobs_pb2.DELIVERED, 10, 0.05, "DELIVERED after restart")
        assert {r.headers["webhook-id"] for r in receiver.received} == {owed}
        assert verified(receiver.received[0])["data"]["id"] == job.id
    finally:
        receiver.stop()


def test_ssrf_destinations_are_refused_at_submit(compute_factory):
    compute = compute_factory(**{**WEBHOOKS, "webhook_allowlist": []})  # loopback not allowed
    port = free_port()
    refused = [
        "http://10.1.2.3/hook",  # private
        "http://169.254.169.254/latest/meta-data/",  # cloud metadata (link-local)
        f"http://localhost:{port}/hook",  # a host name resolving to 127.0.0.1
        f"http://127.0.0.1:{port}/hook",
        f"http://[::ffff:127.0.0.1]:{port}/hook",  # IPv4-mapped loopback
        "http://0.0.0.0/hook",
        "ftp://example.com/hook",
        "http://user:secret@example.com/hook",
    ]
    for url in refused:
        try:
            submit(compute, url)
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, url
            assert url not in exc.details() and "webhook" in exc.details()
        else:
            raise AssertionError(f"accepted {url}")
    assert not stub(compute).ListJobs(jobs_pb2.ListJobsRequest(), timeout=10).jobs  # nothing was created

    https_only = compute_factory(**{**WEBHOOKS, "webhook_allow_http": False})
    with pytest.raises(grpc.RpcError) as caught:
        submit(https_only, f"http://127.0.0.1:{port}/hook")
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "https" in caught.value.details()


def test_webhooks_need_a_signing_secret(compute_factory):
    compute = compute_factory()
    with pytest.raises(grpc.RpcError) as caught:
        submit(compute, "https://hooks.example.com/x")
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "webhook_secrets" in caught.value.details()
    # A job without a webhook is as before.
    job = submit_ids(compute, IDS[:2])
    assert not job.HasField("webhook")


def test_the_readme_receiver_runs_as_written(compute_factory, tmp_path):
    """The README's receiver, run as written (its port aside) in its own process, gets the
    callback of a job submitted with the README's webhook settings."""
    import socket
    import subprocess
    import sys

    from tests.conftest import ROOT, terminate

    text = (ROOT / "README.md").read_text()
    snippet = text.split("# pip install standardwebhooks\n", 1)[1].split("```", 1)[0]
    port = free_port()
    script = tmp_path / "receiver.py"
    script.write_text(snippet.replace("9000", str(port)))
    receiver = subprocess.Popen(
        [sys.executable, str(script)], env={**os.environ, "WEBHOOK_SECRET": SECRET}, stdout=subprocess.PIPE, text=True
    )
    try:
        def listening() -> bool:
            with socket.socket() as sock:
                return sock.connect_ex(("127.0.0.1", port)) == 0

        wait_until(listening, 20, 0.05, "the README receiver listening")
        compute = compute_factory(**WEBHOOKS)
        job = submit(compute, f"http://127.0.0.1:{port}/hooks")
        wait_state(compute, job.id, {jobs_pb2.SUCCEEDED})
        assert receiver.stdout.readline().split() == ["job.succeeded", job.id, "SUCCEEDED"]
        wait_until(lambda: deliveries(compute, job.id)[0].last_status_code == 204, 10, 0.05, "204 recorded")
    finally:
        terminate(receiver, 5)


def test_over_rest_the_webhook_is_part_of_the_job_and_refusals_are_400(compute_factory, tmp_path):
    from tests.gateway.conftest import GatewayLauncher

    receiver = Receiver().start()
    gateways = GatewayLauncher(tmp_path)
    try:
        compute = compute_factory(**WEBHOOKS)
        with gateways(compute.address, workers=1).client(timeout=30) as http:
            body = {"batchSearch": {"k": 2, "itemIds": ["item-1"]}, "webhook": {"url": receiver.url, "events": ["JOB_SUCCEEDED", "JOB_PROGRESS"]}}
            created = http.post("/v1/jobs", json=body)
            assert created.status_code == 202, created.text
            webhook = created.json()["webhook"]
            assert (webhook["url"], webhook["events"], webhook.get("deliveries", [])) == (receiver.url, ["JOB_SUCCEEDED", "JOB_PROGRESS"], [])
            job_id = created.json()["id"]
            wait_until(lambda: receiver.of_type("job.succeeded"), 10, 0.02, "the webhook")

            def delivered() -> list[dict]:
                found = http.get(f"/v1/jobs/{job_id}").json()["webhook"].get("deliveries", [])
                return [d for d in found if d["state"] == "DELIVERED"]

            wait_until(lambda: len(delivered()) == 2, 10, 0.05, "two deliveries DELIVERED")
            assert {d["type"] for d in delivered()} == {"job.succeeded", "job.progress"}
            assert all(d["attempts"] == 1 and d["lastStatusCode"] == 200 for d in delivered())

            refused = http.post("/v1/jobs", json={**body, "webhook": {"url": "http://169.254.169.254/latest/meta-data/"}})
            assert refused.status_code == 400
            error = refused.json()["error"]
            assert error["status"] == "INVALID_ARGUMENT" and error["message"].startswith("webhook.url:")
            assert "169.254" not in refused.text
            bad_event = http.post("/v1/jobs", json={**body, "webhook": {"url": receiver.url, "events": ["WEBHOOK_EVENT_UNSPECIFIED"]}})
            assert bad_event.status_code == 400
    finally:
        gateways.close()
        receiver.stop()
