"""The README and .env.example document every setting of both processes (they drift otherwise)."""

from __future__ import annotations

import pytest

from compute.settings import ComputeSettings
from gateway.settings import GatewaySettings
from tests.conftest import ROOT

SETTINGS = [("OFFLOAD_COMPUTE_", ComputeSettings), ("OFFLOAD_GATEWAY_", GatewaySettings)]


@pytest.mark.parametrize("document", ["README.md", ".env.example"])
@pytest.mark.parametrize("prefix, settings", SETTINGS, ids=["compute", "gateway"])
def test_every_setting_is_documented(document, prefix, settings):
    text = (ROOT / document).read_text()
    missing = [f"{prefix}{name.upper()}" for name in settings.model_fields if f"{prefix}{name.upper()}" not in text]
    assert not missing, f"{document} does not mention {missing}"


def test_readme_gives_the_two_commands():
    text = (ROOT / "README.md").read_text()
    assert "make dev" in text and "make test" in text


def test_the_readme_client_example_runs(shared_compute):
    """The Python client example of the README, run as written against a real compute."""
    import asyncio

    text = (ROOT / "README.md").read_text()
    block = text.split("## Calling compute from Python")[1].split("```python")[1].split("```")[0]
    code = block.replace('"127.0.0.1:50051"', repr(shared_compute.address))
    imports = "\n".join(line for line in code.splitlines() if line.startswith(("import ", "from ")))
    body = "\n".join("    " + line for line in code.splitlines() if line.strip() and not line.startswith(("import ", "from ")))
    namespace: dict = {}
    exec(f"{imports}\n\nasync def example():\n{body}\n    return items\n", namespace)  # noqa: S102 - our own README
    items = asyncio.run(namespace["example"]())
    assert [item.id for item in items] == [f"item-{i}" for i in range(100)]
