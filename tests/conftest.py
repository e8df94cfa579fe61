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


HEAVY = os.environ.get("INGRESS_HEAVY") == "1"


def examples(n: int) -> int:
    """``max_examples`` for a property test: all *n* in the heavy environment (INGRESS_HEAVY=1,
    one tox environment), a quarter (at least 15) in the others, which run the same properties
    on the same strategies as a quick check on their interpreter."""
    return n if HEAVY else max(15, n // 4)


def pytest_collection_modifyitems(config, items):
    if HEAVY:
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


class TLSFiles:
    """A certificate for 127.0.0.1, ::1 and mx.test from a throwaway CA (trustme), written as PEM
    files, and client contexts that trust that CA."""

    def __init__(self, ca, directory: Path):
        cert = ca.issue_cert("127.0.0.1", "::1", "localhost", "mx.test")
        self.cert, self.key = directory / "cert.pem", directory / "key.pem"
        cert.private_key_and_cert_chain_pem.write_to_path(str(self.cert))
        cert.private_key_pem.write_to_path(str(self.key))
        self._ca = ca

    def server(self, implicit: bool = False) -> dict:
        """The ``[server]`` keys: the certificate, and an implicit TLS listener if asked."""
        keys = {"tls_cert": str(self.cert), "tls_key": str(self.key)}
        return {**keys, "listen_tls": ["127.0.0.1:0"]} if implicit else keys

    def context(self):
        import ssl

        context = ssl.create_default_context()
        self._ca.configure_trust(context)
        return context


@pytest.fixture(scope="session")
def tls_ca():
    trustme = pytest.importorskip("trustme")
    return trustme.CA()


@pytest.fixture
def tls(tls_ca, tmp_path) -> TLSFiles:
    directory = tmp_path / "tls"
    directory.mkdir()
    return TLSFiles(tls_ca, directory)


@pytest.fixture
def tls_certs(tls):
    """The same certificate as ``tls``, shaped as ``.server`` (the ``[server]`` keys that
    enable STARTTLS) and ``.client`` (an SSL context that trusts the CA)."""
    from types import SimpleNamespace

    return SimpleNamespace(server=tls.server(), client=tls.context())
