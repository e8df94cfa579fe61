"""The suite runs against the installed package (tox), not the source tree."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import ingress
import ingress_plugins
import ingress_schemas

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(os.environ.get("INGRESS_TEST_INSTALLED") != "1", reason="tox sets it")
def test_imports_come_from_site_packages():
    for module in (ingress, ingress_plugins, ingress_schemas):
        path = Path(module.__file__).resolve()
        assert "site-packages" in path.parts, path
        assert path.parent not in (ROOT / "ingress", ROOT / "plugins", ROOT / "schemas")


def test_schemas_ship_as_package_data():
    assert ingress_schemas.load("core")["properties"]["plugins"]
    assert ingress_schemas.load("banner")["properties"]["text"]
