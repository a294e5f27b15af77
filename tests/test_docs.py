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
