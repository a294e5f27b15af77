"""A service the gateway routes to but compute does not serve (its module not listed) is not
silent: /readyz says which, the log says what to fix, and its routes answer a clear 501."""

from __future__ import annotations

from tests.conftest import wait_until


def test_an_unserved_routed_service_fails_readiness_and_names_the_fix(compute_factory, gateway_factory):
    compute = compute_factory(extra_operation_modules=[])  # built-ins only: no TestingService
    gateway = gateway_factory(compute.address, wait_ready=False)  # routes TestingService too
    with gateway.client() as http:
        ready = http.get("/readyz")
        assert ready.status_code == 503
        assert ready.json() == {
            "status": "not ready",
            "compute": False,
            "event_loop": True,
            "unserved_services": ["offload.testing.v1.TestingService"],
        }
        assert http.get("/v1/items/item-3").status_code == 200  # served services keep working
        response = http.get("/v1/testing/fail/NOT_FOUND")
        assert response.status_code == 501
        assert response.json()["error"]["message"] == "compute does not serve this RPC (see the gateway's /readyz and log)"

    def logged() -> bool:
        return "compute does not serve services this gateway routes to" in gateway.log_text()

    wait_until(logged, 10, 0.05, "the unserved-services log line")
    line = next(l for l in gateway.log_text().splitlines() if "compute does not serve services" in l)
    assert "OFFLOAD_COMPUTE_EXTRA_OPERATION_MODULES" in line and "offload.testing.v1.TestingService" in line


def test_ready_when_compute_serves_every_routed_service(stack):
    _, gateway = stack
    with gateway.client() as http:
        assert http.get("/readyz").json() == {"status": "ready", "compute": True, "event_loop": True}
