"""The webhook SSRF guard, and the sender checking the address it connects to at every attempt.

Host names are resolved by a stub here (no DNS server can be run for the test): it is the one
way to make a name change its answer between submit and delivery, as a rebinding attack does.
Everything else is real: the SQLite store, the sender's httpx client, a receiver on loopback.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import os
import time

import pytest
from standardwebhooks import Webhook

from compute.jobs import store as st
from compute.jobs.sqlite_store import SqliteJobStore
from compute.jobs.messages import webhook_body
from compute.jobs.webhook_policy import DestinationRefused, DestinationUnresolved, WebhookPolicy, parse_allow_entry
from compute.jobs.webhook_signing import parse_secret
from compute.jobs.backoff import Backoff
from compute.jobs.webhooks import WebhookSender
from tests.conftest import wait_until
from tests.jobs.webhook_receiver import Receiver

SECRET = "whsec_" + base64.b64encode(os.urandom(24)).decode()


def resolver(answers: dict[str, list[str]]):
    async def resolve(host: str, port: int) -> list[str]:
        if host not in answers:
            raise OSError("name not known")
        return answers[host]

    return resolve


def check(policy: WebhookPolicy, url: str):
    return asyncio.run(policy.check(url))


@pytest.mark.parametrize(
    "address, public",
    [
        ("93.184.216.34", True),
        ("2606:2800:220:1:248:1893:25c8:1946", True),
        ("10.0.0.1", False),
        ("172.16.5.4", False),
        ("192.168.1.1", False),
        ("127.0.0.1", False),
        ("169.254.169.254", False),  # AWS, GCP, Azure metadata
        ("100.100.100.200", False),  # Alibaba metadata (shared address space)
        ("fd00:ec2::254", False),  # AWS metadata over IPv6 (unique local)
        ("::1", False),
        ("::ffff:10.0.0.1", False),  # IPv4-mapped private
        ("0.0.0.0", False),
        ("224.0.0.1", False),  # multicast
        ("fe80::1", False),
        ("fec0::1", False),  # site-local
        ("64:ff9b::a00:1", False),  # NAT64 of 10.0.0.1
        ("2002:7f00:1::1", False),  # 6to4 of 127.0.0.1
        ("::7f00:1", False),  # IPv4-compatible 127.0.0.1
        ("::ffff:0:7f00:1", False),  # IPv4-translated 127.0.0.1
        ("2001:0:4136:e378:8000:63bf:3fff:fdd2", False),  # Teredo, client 192.0.2.45 (documentation range)
        ("64:ff9b::5db8:d822", True),  # NAT64 of a public address
    ],
)
def test_only_public_unicast_addresses_pass_without_an_allowlist(address, public):
    policy = WebhookPolicy(resolver=resolver({"hooks.example": [address]}))
    if public:
        assert check(policy, "https://hooks.example/x").addresses == (address,)
    else:
        with pytest.raises(DestinationRefused) as caught:
            check(policy, "https://hooks.example/x")
        assert address not in str(caught.value)  # the refusal names no address


def test_allowlist_entries_networks_hosts_and_subdomains():
    answers = {"hooks.internal": ["10.9.8.7"], "a.corp.example": ["10.1.1.1"], "corp.example": ["10.1.1.2"], "other": ["10.2.0.1"]}
    policy = WebhookPolicy(["hooks.internal", "*.corp.example", "10.2.0.0/16"], resolver=resolver(answers))
    assert check(policy, "https://hooks.internal/x").addresses == ("10.9.8.7",)
    assert check(policy, "https://a.corp.example/x").addresses == ("10.1.1.1",)
    assert check(policy, "https://other:8443/x?y=1").connect_url("10.2.0.1") == "https://10.2.0.1:8443/x?y=1"
    with pytest.raises(DestinationRefused):
        check(policy, "https://corp.example/x")  # *.corp.example is the subdomains only
    with pytest.raises(DestinationRefused):
        check(policy, "https://10.3.0.1/x")
    # Every address a name resolves to must pass, not just one of them.
    mixed = WebhookPolicy(resolver=resolver({"mixed.example": ["93.184.216.34", "127.0.0.1"]}))
    with pytest.raises(DestinationRefused):
        check(mixed, "https://mixed.example/x")


def test_url_rules():
    policy = WebhookPolicy(resolver=resolver({"hooks.example": ["93.184.216.34"]}))
    destination = check(policy, "https://Hooks.Example./in")
    assert (destination.host, destination.port, destination.host_header) == ("hooks.example", 443, "hooks.example")
    for url in ["http://hooks.example/x", "ftp://hooks.example/x", "https://u:p@hooks.example/x", "https:///x", "https://hooks.example:99999/x"]:
        with pytest.raises(DestinationRefused):
            check(policy, url)
    with pytest.raises(DestinationUnresolved):  # DNS says nothing now: retried at delivery, refused at submit
        check(policy, "https://unknown.example/x")
    with pytest.raises(DestinationRefused):  # not a host name at all (the resolver's IDNA codec refuses it)
        check(WebhookPolicy(), "https://a..b.example/x")
    assert check(WebhookPolicy(allow_http=True, resolver=policy._resolve), "http://hooks.example/x").port == 80
    assert [parse_allow_entry(e)[0] for e in ["10.0.0.0/8", "::1", "a.b", "*.b.c"]] == ["network", "network", "host", "suffix"]
    assert parse_allow_entry("127.0.0.1")[1] == ipaddress.ip_network("127.0.0.1/32")
    with pytest.raises(ValueError):
        parse_allow_entry("not a host!")


def test_the_address_is_checked_again_at_connect_time(tmp_path):
    """A name allowlisted to a loopback receiver is delivered to that address with its own Host
    header; a name whose answer turned private after submit (DNS rebinding) is refused at the
    connect, gives up at once, and nothing reaches the receiver."""
    receiver = Receiver().start()
    answers = {"hooks.test": ["127.0.0.1"], "rebound.test": ["93.184.216.34"], "flaky.test": ["93.184.216.34"]}
    policy = WebhookPolicy(["hooks.test"], allow_http=True, resolver=resolver(answers))

    async def scenario() -> tuple[list[st.Delivery], list[st.Delivery]]:
        store = SqliteJobStore(tmp_path / "jobs.sqlite3", max_bytes=1 << 24, webhook_body=webhook_body)
        await store.open()
        # A cap far away: the unresolvable delivery must still be PENDING, retrying, when it is read.
        sender = WebhookSender(store, policy, [parse_secret(SECRET)], Backoff(1000, 0.1, 0.2), timeout=2, concurrency=2)
        sender.start()
        try:
            ids = []
            for name in ("hooks.test", "rebound.test", "flaky.test"):
                url = f"http://{name}:{receiver.port}/in"
                await policy.check(url)  # what SubmitJob checks: both pass
                now = time.time()
                record = st.JobRecord(
                    id=f"job-{name}", type="batch_search", state=st.QUEUED, spec=b"", idempotency_key=None,
                    request_id="r", traceparent="", attempts=0, done=0, total=1, result_count=0, error_code=None,
                    error_message=None, create_time=now, update_time=now, start_time=None, end_time=None,
                    expire_time=None, not_before=now, sequence=1,
                    webhook_url=url, webhook_events="job.succeeded",
                )  # fmt: skip
                await store.submit(record, 10)
                await store.claim(now)
                if name == "rebound.test":
                    answers[name] = ["127.0.0.1"]  # the name's answer changes after the check
                if name == "flaky.test":
                    del answers[name]  # DNS stops answering for it: a failed attempt, not the end
                await store.succeed(record.id, now, expire_time=now + 60)
                ids.append(record.id)
                sender.wake()
            for _ in range(200):
                found = [await store.deliveries(job_id, 5) for job_id in ids]
                if found[0] and found[0][0].state != st.PENDING and found[1] and found[1][0].state != st.PENDING \
                        and found[2] and found[2][0].attempts >= 2:
                    return found[0], found[1], found[2]
                await asyncio.sleep(0.02)
            raise AssertionError("deliveries not where expected")
        finally:
            await sender.stop()
            await store.close()

    try:
        delivered, refused, unresolved = asyncio.run(scenario())
    finally:
        receiver.stop()
    assert delivered[0].state == st.DELIVERED and delivered[0].attempts == 1
    [hook] = receiver.received
    assert hook.headers["host"] == f"hooks.test:{receiver.port}"
    assert Webhook(SECRET).verify(hook.body, hook.headers)["data"]["id"] == "job-hooks.test"
    assert refused[0].state == st.GAVE_UP and refused[0].attempts == 1 and refused[0].last_status == 0
    assert refused[0].last_error.startswith("destination refused")
    assert unresolved[0].state == st.PENDING and unresolved[0].last_error == "the webhook url's host did not resolve"
    wait_until(lambda: len(receiver.received) == 1, 1, 0.05, "nothing more arrived")
