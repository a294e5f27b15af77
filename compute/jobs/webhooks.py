"""Webhook delivery: signed POSTs of job events, at least once, from the job store's outbox.

- Signing follows Standard Webhooks (compute/jobs/webhook_signing.py); `webhook-id` is the
  same on every attempt, so receivers deduplicate on it.
- Delivery: the sender leases due deliveries from the store, POSTs them (a few at once), and
  records each attempt. A 2xx delivers; anything else is retried after a delay drawn uniformly
  from [0, min(max, base * 2 ** (attempt - 1))] (full jitter), up to `webhook_max_attempts`;
  then the delivery GAVE_UP. A destination the policy refuses at connect time gives up at once.
- Safety: every attempt resolves and checks the host again (compute/jobs/webhook_policy.py)
  and connects to the checked address; redirects are not followed; no proxy from the
  environment; timeouts on connect, write, read and the whole attempt; at most
  MAX_RESPONSE_BYTES of the answer are read. Its own httpx client and connection limits: it
  never shares a pool, a thread or a hot path with the RPCs.
"""

from __future__ import annotations

import asyncio
import logging
import time

import httpx

from compute.errors import ComputeError
from compute.jobs import store as st
from compute.jobs.backoff import Backoff
from compute.jobs.webhook_policy import DestinationRefused, DestinationUnresolved, WebhookPolicy
from compute.jobs.webhook_signing import sign

log = logging.getLogger("compute.webhooks")

MAX_RESPONSE_BYTES = 4096
USER_AGENT = "offload-webhooks/1"
IDLE_POLL_SECONDS = 5.0  # a safety net: new deliveries wake the sender at once


class WebhookSender:
    """`start()` once; `wake()` after a change that may have queued a delivery; `await stop()`
    (idempotent). An attempt cut short by stop() is simply due again after its lease."""

    def __init__(
        self,
        store: st.JobStore,
        policy: WebhookPolicy,
        keys: list[bytes],
        retry: Backoff,
        *,
        timeout: float,
        concurrency: int,
    ) -> None:
        self.store = store
        self.policy = policy
        self.keys = keys
        self.retry = retry
        self.timeout = timeout
        self.concurrency = concurrency
        self.lease = timeout + 5.0  # longer than any attempt
        self._wake = asyncio.Event()
        self._attempts: set[asyncio.Task[None]] = set()
        self._in_flight: set[str] = set()  # delivery ids being attempted: never claimed twice at once
        self._loop_task: asyncio.Task[None] | None = None
        self._client: httpx.AsyncClient | None = None

    def start(self) -> None:
        if self._loop_task is not None:
            raise RuntimeError("WebhookSender already started")
        self._client = httpx.AsyncClient(
            follow_redirects=False,
            trust_env=False,  # a proxy from the environment would connect to what we did not check
            timeout=httpx.Timeout(self.timeout),
            # No keep-alive: every connection goes to an address checked for its own attempt,
            # and a TLS connection made for one host name is never reused for another.
            limits=httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=0),
            headers={"user-agent": USER_AGENT},
        )
        self._loop_task = asyncio.get_running_loop().create_task(self._run(), name="webhook-sender")

    def wake(self) -> None:
        self._wake.set()

    async def stop(self) -> None:
        task, self._loop_task = self._loop_task, None
        if task is None:
            return
        task.cancel()
        for attempt in list(self._attempts):
            attempt.cancel()
        await asyncio.gather(task, *self._attempts, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            free = self.concurrency - len(self._attempts)
            due: list[st.Delivery] = []
            try:
                if free > 0:
                    due = await self.store.claim_deliveries(free, self.lease, exclude=frozenset(self._in_flight))
                for delivery in due:
                    self._in_flight.add(delivery.id)
                    task = asyncio.get_running_loop().create_task(self._attempt(delivery))
                    self._attempts.add(task)
                    task.add_done_callback(self._finished)
                next_due = await self.store.next_delivery_due()
            except Exception as exc:  # the sender must outlive any store error: log, wait, try again
                log.error("cannot read webhook deliveries", extra={"error": getattr(exc, "message", repr(exc))})
                next_due = None
            wait = IDLE_POLL_SECONDS if next_due is None else min(IDLE_POLL_SECONDS, max(0.0, next_due - time.time()))
            if free <= len(due):
                wait = IDLE_POLL_SECONDS  # every slot busy: a finishing attempt wakes us
            try:
                await asyncio.wait_for(self._wake.wait(), wait)
            except TimeoutError:
                pass

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._attempts.discard(task)
        self._wake.set()

    async def _attempt(self, delivery: st.Delivery) -> None:
        try:
            status, error, refused = await self._post(delivery)
        except Exception as exc:  # a bug or an unforeseen error: a failed attempt, so the cap applies
            log.exception("webhook attempt failed unexpectedly", extra={"webhook_id": delivery.id})
            status, error, refused = 0, f"internal error ({type(exc).__name__})", False
        finally:
            self._in_flight.discard(delivery.id)
        attempts = delivery.attempts + 1
        now = time.time()
        if 200 <= status < 300:
            state, next_attempt = st.DELIVERED, now
        else:
            delay = None if refused else self.retry.delay(attempts)
            state = st.PENDING if delay is not None else st.GAVE_UP
            next_attempt = now + (delay or 0.0)
        extra = {"job_id": delivery.job_id, "webhook_id": delivery.id, "type": delivery.type, "attempt": attempts}
        if state == st.DELIVERED:
            log.info("webhook delivered", extra={**extra, "status": status, "seconds_after_event": round(now - delivery.create_time, 3)})
        elif state == st.PENDING:
            log.warning("webhook attempt failed; retrying", extra={**extra, "error": error, "retry_in_seconds": round(next_attempt - now, 3)})
        else:
            log.error("webhook delivery gave up", extra={**extra, "error": error})
        try:
            # Fenced by the lease: an attempt whose lease already ran out records nothing.
            await self.store.record_attempt(delivery, state, status, error, next_attempt, now)
        except ComputeError as exc:
            # The lease runs out and the delivery is attempted again: at least once, maybe twice.
            log.error("cannot record a webhook attempt", extra={**extra, "error": exc.message})

    async def _post(self, delivery: st.Delivery) -> tuple[int, str | None, bool]:
        """(HTTP status or 0, error or None, refused by the policy)."""
        assert self._client is not None
        try:
            async with asyncio.timeout(self.timeout):
                destination = await self.policy.check(delivery.url)
                stamp = int(time.time())
                headers = {
                    "host": destination.host_header,
                    "content-type": "application/json",
                    "webhook-id": delivery.id,
                    "webhook-timestamp": str(stamp),
                    "webhook-signature": sign(self.keys, delivery.id, stamp, delivery.body),
                }
                extensions = {"sni_hostname": destination.host} if destination.scheme == "https" else {}
                for index, address in enumerate(destination.addresses):  # each checked address in turn
                    request = self._client.build_request(
                        "POST", destination.connect_url(address), content=delivery.body, headers=headers,
                        extensions=extensions,
                    )
                    try:
                        response = await self._client.send(request, stream=True)
                        break
                    except httpx.ConnectError:
                        if index == len(destination.addresses) - 1:
                            raise
                try:
                    read = 0
                    async for chunk in response.aiter_raw():
                        read += len(chunk)
                        if read >= MAX_RESPONSE_BYTES:
                            break  # an answer is not read beyond a few KB
                finally:
                    await response.aclose()
        except DestinationRefused as exc:
            return 0, f"destination refused: {exc}", True
        except DestinationUnresolved as exc:
            return 0, str(exc), False
        except TimeoutError:
            return 0, f"timed out after {self.timeout:g} s", False
        except httpx.TimeoutException:
            return 0, "timed out", False
        except httpx.HTTPError as exc:
            return 0, _describe(exc), False
        status = response.status_code
        if 300 <= status < 400:
            return status, f"HTTP {status}: redirects are not followed", False
        return status, None if 200 <= status < 300 else f"HTTP {status}", False


def _describe(exc: httpx.HTTPError) -> str:
    """A short reason for the job's delivery record: never the address or the answer's text."""
    if isinstance(exc, httpx.ConnectError):
        cause: BaseException | None = exc
        while cause is not None:  # anyio wraps the socket's own error
            if isinstance(cause, ConnectionRefusedError):
                return "connection refused"
            cause = cause.__cause__ or cause.__context__
        return "cannot connect"
    if isinstance(exc, httpx.RemoteProtocolError):
        return "the receiver broke the HTTP exchange"
    return type(exc).__name__
