"""API keys, scopes declared on the RPCs, per-key rate limits, and who-did-what in compute's log."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from gateway.auth import digest_of
from gateway.settings import GatewaySettings
from offload.config import ConfigError, load
from tests.conftest import ROOT, clean_env, wait_until


def entry(key_id: str, key: str, *scopes: str) -> str:
    return f"{key_id}:{digest_of(key).hex()}:{','.join(scopes)}"


READER, SEARCHER, ADMIN = "reader-secret-1", "searcher-secret-2", "admin-secret-3"


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    """compute + a gateway with auth on: inline keys, a keys file, /metrics not open."""
    from tests.conftest import ComputeLauncher
    from tests.gateway.conftest import GatewayLauncher

    workdir = tmp_path_factory.mktemp("auth")
    keys_file = workdir / "keys.txt"
    keys_file.write_text(f"# keys of the test\n{entry('searcher', SEARCHER, 'read', 'search', 'jobs:read', 'jobs:write')}\n")
    computes, gateways = ComputeLauncher(workdir), GatewayLauncher(workdir)
    try:
        compute = computes()
        gateway = gateways(
            compute.address,
            workers=1,
            auth="on",
            api_keys=[entry("reader", READER, "read"), entry("ops", ADMIN, "admin")],
            api_keys_file=str(keys_file),
            auth_open_paths=["/readyz"],
            wait_ready=False,
        )
        gateway.wait_status("/readyz", 200)
        yield compute, gateway, keys_file
    finally:
        gateways.close()
        computes.close()


def test_no_or_unknown_key_is_401_with_the_error_body(secured):
    _, gateway, _ = secured
    with gateway.client() as http:
        missing = http.get("/v1/items/item-1")
        assert missing.status_code == 401 and missing.headers["www-authenticate"].startswith("Bearer")
        assert missing.json()["error"]["status"] == "UNAUTHENTICATED"
        assert missing.headers["x-request-id"]
        wrong = http.get("/v1/items/item-1", headers={"Authorization": "Bearer not-a-key"})
        assert wrong.status_code == 401 and wrong.json()["error"]["message"] == "the API key is not valid"
        assert http.get("/healthz").status_code == 200 and http.get("/readyz").status_code == 200  # open


def test_scopes_declared_on_the_rpc_decide_403(secured):
    _, gateway, _ = secured
    with gateway.client() as http:
        assert http.get("/v1/items/item-1", headers={"Authorization": f"Bearer {READER}"}).status_code == 200
        assert http.get("/v1/items/item-1", headers={"X-API-Key": READER}).status_code == 200
        denied = http.post("/v1/search", json={"vector": [1.0] * 16, "k": 3}, headers={"X-API-Key": READER})
        assert denied.status_code == 403
        assert denied.json()["error"] == {
            "code": 403, "status": "PERMISSION_DENIED", "message": "this API key lacks the scope(s) search",
            "request_id": denied.headers["x-request-id"],
        }
        allowed = http.post("/v1/search", json={"vector": [1.0] * 16, "k": 3}, headers={"X-API-Key": SEARCHER})
        assert allowed.status_code == 200 and len(allowed.json()["hits"]) == 3
        # Admin routes that are not open need the admin scope.
        assert http.get("/metrics").status_code == 401
        assert http.get("/metrics", headers={"X-API-Key": READER}).status_code == 403
        assert http.get("/metrics", headers={"X-API-Key": ADMIN}).status_code == 200


def test_the_keys_file_is_reloaded_without_a_restart(secured):
    _, gateway, keys_file = secured
    original = keys_file.read_text()
    newcomer = "newcomer-secret-4"
    try:
        keys_file.write_text(f"{entry('newcomer', newcomer, 'read')}\n")  # the searcher is revoked
        with gateway.client() as http:
            def switched() -> bool:
                return http.get("/v1/items/item-1", headers={"X-API-Key": newcomer}).status_code == 200

            wait_until(switched, 10, 0.2, "the new key accepted")
            assert http.get("/v1/items/item-1", headers={"X-API-Key": SEARCHER}).status_code == 401
            assert http.get("/v1/items/item-1", headers={"X-API-Key": READER}).status_code == 200  # inline keys stay
    finally:
        keys_file.write_text(original)
        time.sleep(1.2)


def test_the_key_id_reaches_compute_and_job_changes_are_audited(secured):
    compute, gateway, _ = secured
    with gateway.client() as http:
        submitted = http.post(
            "/v1/jobs", json={"batchSearch": {"k": 2, "itemIds": ["item-1"]}}, headers={"X-API-Key": SEARCHER}
        )
        assert submitted.status_code == 202, submitted.text
        job_id = submitted.json()["id"]

    def audit_lines() -> list[dict]:
        return [r for r in compute.log_records() if r.get("logger") == "compute.audit" and r.get("job_id") == job_id]

    wait_until(lambda: bool(audit_lines()), 10, 0.05, "the audit line")
    [line] = audit_lines()
    assert line["msg"] == "job submitted" and line["principal"] == "searcher"
    assert line["request_id"] == submitted.headers["x-request-id"]
    assert SEARCHER not in compute.log_text() and SEARCHER not in gateway.log_text()


def test_openapi_declares_the_security_and_scopes(secured):
    _, gateway, _ = secured
    with gateway.client() as http:
        assert http.get("/openapi.json").status_code == 401  # not an open path here
        doc = http.get("/openapi.json", headers={"X-API-Key": ADMIN}).json()
    search = doc["paths"]["/v1/search"]["post"]
    assert search["security"] == [{"apiKey": []}, {"bearer": []}] and search["x-required-scopes"] == ["search"]
    assert {"401", "403"} <= set(search["responses"])
    assert doc["components"]["securitySchemes"]["apiKey"] == {"type": "apiKey", "in": "header", "name": "X-API-Key"}


def test_rate_limits_count_per_key(compute, gateway_factory):
    gateway = gateway_factory(
        compute.address, workers=1, auth="on", api_keys=[entry("a", "key-a", "read"), entry("b", "key-b", "read")],
        rate_limit="3/minute", wait_ready=False,
    )
    with gateway.client() as http:
        codes = [http.get("/v1/stats", headers={"X-API-Key": "key-a"}).status_code for _ in range(4)]
        assert codes == [200, 200, 200, 429]
        limited = http.get("/v1/stats", headers={"X-API-Key": "key-a"})
        assert limited.status_code == 429 and 1 <= int(limited.headers["retry-after"]) <= 60
        assert limited.json()["error"]["status"] == "RESOURCE_EXHAUSTED"
        assert http.get("/v1/stats", headers={"X-API-Key": "key-b"}).status_code == 200  # its own count


def test_inline_keys_with_several_scopes_parse_from_plain_text(monkeypatch):
    monkeypatch.setenv("OFFLOAD_ENV_FILE", "")
    monkeypatch.setenv("OFFLOAD_GATEWAY_AUTH", "on")
    monkeypatch.setenv("OFFLOAD_GATEWAY_API_KEYS", f"{entry('a', 'ka', 'read', 'search')} {entry('b', 'kb', 'jobs:write')}")
    settings = load(GatewaySettings)
    assert [e.split(":")[0] for e in settings.api_keys] == ["a", "b"]
    assert settings.api_keys[0].endswith(":read,search")


def test_a_bad_keys_file_on_reload_keeps_the_keys_already_loaded(tmp_path):
    from gateway.auth import KeyRing

    path = tmp_path / "keys.txt"
    path.write_text(entry("a", "ka", "read") + "\n")
    ring = KeyRing([], path)
    assert ring.lookup("ka").key_id == "a"
    path.write_text("a:not-a-hash:read\n")
    os.utime(path, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    ring._checked = 0  # as if a second had passed
    assert ring.lookup("ka").key_id == "a"  # refused and logged; the old keys stay
    path.unlink()
    ring._checked = 0
    assert ring.lookup("ka").key_id == "a"  # a missing file is not "no keys"


def test_beyond_loopback_keys_are_required_unless_auth_is_off(monkeypatch):
    monkeypatch.setenv("OFFLOAD_ENV_FILE", "")
    monkeypatch.setenv("OFFLOAD_GATEWAY_HOST", "0.0.0.0")
    with pytest.raises(ConfigError) as caught:
        load(GatewaySettings)
    assert "refusing to serve on '0.0.0.0' without API keys" in caught.value.lines[0]
    monkeypatch.setenv("OFFLOAD_GATEWAY_AUTH", "off")
    assert not load(GatewaySettings).auth_enabled
    monkeypatch.delenv("OFFLOAD_GATEWAY_AUTH")
    monkeypatch.setenv("OFFLOAD_GATEWAY_API_KEYS", "ops:1234:admin")
    with pytest.raises(ConfigError) as caught:
        load(GatewaySettings)
    assert "the hash must be 64 hex digits" in caught.value.lines[0]


def test_new_key_command_makes_a_working_entry():
    result = subprocess.run(
        [sys.executable, "-m", "gateway.auth", "new", "ci-bot", "read", "search"],
        cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 0, result.stderr
    key = result.stderr.split(": ", 1)[1].strip()
    line = result.stdout.strip()
    assert line.startswith("ci-bot:") and line.endswith(":read,search") and key not in line
    assert line.split(":")[1] == digest_of(key).hex()


def test_bearer_jwts_signed_with_a_shared_key(compute, gateway_factory, tmp_path):
    import jwt

    secret = b"s" * 48
    (tmp_path / "jwt.key").write_bytes(secret)
    gateway = gateway_factory(
        compute.address, workers=1, auth="on", jwt_secret_file=str(tmp_path / "jwt.key"), jwt_audience="offload",
        wait_ready=False,
    )
    now = int(time.time())

    def token(**claims) -> str:
        return jwt.encode({"sub": "svc-1", "aud": "offload", "exp": now + 60, "scope": "read search", **claims}, secret, "HS256")

    with gateway.client() as http:
        def call(path: str, bearer: str, **kwargs):
            return http.request(kwargs.pop("method", "GET"), path, headers={"Authorization": f"Bearer {bearer}"}, **kwargs)

        assert call("/v1/items/item-1", token()).status_code == 200
        assert call("/v1/search", token(), method="POST", json={"vector": [1.0] * 16, "k": 2}).status_code == 200
        denied = call("/v1/jobs", token())
        assert denied.status_code == 403 and "jobs:read" in denied.json()["error"]["message"]
        assert call("/v1/items/item-1", token(exp=now - 120)).json()["error"]["message"] == "the token has expired"
        assert call("/v1/items/item-1", token(aud="elsewhere")).json()["error"]["message"] == "the token is not for this service"
        forged = jwt.encode({"sub": "x", "aud": "offload", "exp": now + 60}, b"t" * 48, "HS256")
        assert call("/v1/items/item-1", forged).status_code == 401
        unsigned = jwt.encode({"sub": "x", "aud": "offload", "exp": now + 60}, None, "none")
        assert call("/v1/items/item-1", unsigned).status_code == 401


def test_bearer_jwts_signed_with_the_keys_of_a_jwks_file(compute, gateway_factory, tmp_path):
    import json

    import jwt
    from cryptography.hazmat.primitives.asymmetric import rsa

    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(private.public_key()))
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [{**public_jwk, "kid": "k1", "alg": "RS256", "use": "sig"}]}))
    gateway = gateway_factory(
        compute.address, workers=1, auth="on", jwt_jwks_file=str(tmp_path / "jwks.json"), jwt_audience="offload",
        wait_ready=False,
    )
    claims = {"sub": "auth0|svc 2", "aud": "offload", "exp": int(time.time()) + 60, "scp": "read search"}
    good = jwt.encode(claims, private, "RS256", headers={"kid": "k1"})
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    bad = jwt.encode(claims, other, "RS256", headers={"kid": "k1"})
    with gateway.client() as http:
        assert http.get("/v1/items/item-1", headers={"Authorization": f"Bearer {good}"}).status_code == 200
        assert http.get("/v1/items/item-1", headers={"Authorization": f"Bearer {bad}"}).status_code == 401
        search = http.post("/v1/search", json={"vector": [1.0] * 16, "k": 1}, headers={"Authorization": f"Bearer {good}"})
        assert search.status_code == 200  # scp as a space-separated string
        not_a_jwt_key = http.get("/v1/items/item-1", headers={"Authorization": "Bearer a.b.c"})
        assert not_a_jwt_key.status_code == 401 and not_a_jwt_key.json()["error"]["message"] == "the token is not valid"
    # The subject travels to compute percent-encoded: gRPC metadata is printable ASCII.
    from offload.context import from_headers

    assert from_headers(None, None, None, "jwt:auth0|svc%202").principal == "jwt:auth0|svc%202"
    assert from_headers(None, None, None, "jwt:has space").principal == ""
