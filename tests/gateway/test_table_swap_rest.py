"""LoadTable over REST (POST /v1/table:load), and the generation header on every response.

The swap itself is tested in tests/compute/test_table_swap.py; here: the route, its admin
scope, and that REST clients learn which generation answered, batched (GetItem) or not (Search).
"""

from __future__ import annotations

import numpy as np

from tests.gateway.test_auth import entry

READER, ADMIN = "reader-secret", "admin-secret"


def test_a_rest_client_swaps_the_table_and_every_response_names_its_generation(compute_factory, gateway_factory, tmp_path):
    tables = tmp_path / "tables"
    tables.mkdir()
    with open(tables / "next.npy", "wb") as file:
        np.save(file, np.random.default_rng(5).standard_normal((3000, 16)).astype(np.float32))
    compute = compute_factory(rows=2000, dim=16, table_load_dirs=[str(tables)])
    gateway = gateway_factory(
        compute.address, workers=1, auth="on", api_keys=[entry("reader", READER, "read", "search"), entry("ops", ADMIN, "admin")]
    )
    reader, admin = {"Authorization": f"Bearer {READER}"}, {"Authorization": f"Bearer {ADMIN}"}
    with gateway.client() as http:
        item = http.get("/v1/items/item-1", headers=reader)
        assert item.status_code == 200 and item.headers["offload-table-generation"] == "1"
        search = http.post("/v1/search", json={"vector": [1.0] * 16, "k": 2}, headers=reader)
        assert search.status_code == 200 and search.headers["offload-table-generation"] == "1"

        body = {"file": {"vectorsPath": str(tables / "next.npy")}}
        denied = http.post("/v1/table:load", json=body, headers=reader)
        assert denied.status_code == 403  # LoadTable needs the admin scope
        loaded = http.post("/v1/table:load", json=body, headers=admin)
        assert loaded.status_code == 200, loaded.text
        assert loaded.json()["table"]["generation"] == "2" and loaded.json()["previousGeneration"] == "1"
        assert loaded.json()["table"]["rows"] == "3000"

        item = http.get("/v1/items/item-2999", headers=reader)
        assert item.status_code == 200 and item.headers["offload-table-generation"] == "2"
        search = http.post("/v1/search", json={"vector": [1.0] * 16, "k": 2}, headers=reader)
        assert search.headers["offload-table-generation"] == "2"
        stats = http.get("/v1/stats", headers=reader).json()["cache"]
        assert stats["generation"] == "2" and stats["source"] == str(tables / "next.npy")

        refused = http.post("/v1/table:load", json={"synthetic": {"rows": "10", "dim": 4}}, headers=admin)
        assert refused.status_code == 400 and refused.json()["error"]["status"] == "FAILED_PRECONDITION"
        assert "dimension 4" in refused.json()["error"]["message"]
        invalid = http.post("/v1/table:load", json={}, headers=admin)
        assert invalid.status_code == 400 and invalid.json()["error"]["status"] == "INVALID_ARGUMENT"
