"""Shared test setup. The server fixtures come from ``ingress.testing`` (a pytest plugin)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

HELPERS = Path(__file__).parent / "helpers"

# Plugin modules used by tests live in tests/helpers; servers started as subprocesses find them
# through PYTHONPATH, in-process ones through sys.path.
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(HELPERS), *filter(None, [os.environ.get("PYTHONPATH")])]
)
sys.path.insert(0, str(HELPERS))


def pytest_collection_modifyitems(config, items):
    if os.environ.get("INGRESS_HEAVY") == "1":
        return
    skip = pytest.mark.skip(reason="heavy test: set INGRESS_HEAVY=1 (one tox environment does)")
    for item in items:
        if "heavy" in item.keywords:
            item.add_marker(skip)


def need(tool: str) -> str:
    """The path of an external client, or skip (CI installs them: see .ci/run)."""
    path = shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/usr/bin:/sbin")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{tool} is not installed, and CI must run this test")
        pytest.skip(f"{tool} is not installed")
    return path


@pytest.fixture
def tls_certs(tmp_path):
    """A throwaway CA and a certificate for ``mx.test`` (trustme), written as PEM files.
    ``.server`` is the ``[server]`` config that enables STARTTLS, ``.client`` an SSL context
    that trusts the CA."""
    import ssl
    from types import SimpleNamespace

    import trustme

    ca = trustme.CA()
    issued = ca.issue_cert("mx.test")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    issued.private_key_pem.write_to_path(str(key))
    for i, pem in enumerate(issued.cert_chain_pems):
        pem.write_to_path(str(cert), append=i > 0)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return SimpleNamespace(server={"tls_cert": str(cert), "tls_key": str(key)}, client=client)
