"""vrfy: VRFY answered from the directory when enabled, 252 otherwise."""

from __future__ import annotations

import pytest

DIRECTORY = {
    "domains": ["example.test", "other.test", "catch.test"],
    "users": [
        {"address": "alice@example.test", "password": "pw", "name": "Alice Example"},
        {"address": "bob@example.test", "password": "pw"},
        {"address": "bob@other.test", "password": "pw"},
    ],
    "aliases": {"team@example.test": ["alice@example.test", "bob@example.test"]},
    "domain_settings": {"catch.test": {"catch_all": True}},
}
CANNOT = (252, b"2.5.2 Cannot VRFY user, but will accept message and attempt delivery")


def config(enabled: bool) -> dict:
    return {"directory": DIRECTORY, "plugins": {"vrfy": {"enabled": enabled}}}


@pytest.mark.parametrize("disabled", [(), ("vrfy",)])
def test_enabled(ingress_server, disabled):
    server = ingress_server(config(True), disabled=disabled)
    expected = {
        "alice@example.test": (250, b"2.1.5 Alice Example <alice@example.test>"),
        "<ALICE@Example.Test>": (250, b"2.1.5 Alice Example <alice@example.test>"),
        "bob@example.test": (250, b"2.1.5 <bob@example.test>"),
        "alice": (250, b"2.1.5 Alice Example <alice@example.test>"),
        "bob": (553, b"5.1.4 User ambiguous"),
        "team@example.test": (250, b"2.1.5 <team@example.test>"),
        "anything@catch.test": (250, b"2.1.5 <anything@catch.test>"),
        "nobody@example.test": (550, b"5.1.1 User unknown"),
        "nobody": (550, b"5.1.1 User unknown"),
        "someone@example.org": (550, b"5.1.1 User unknown"),
    }
    with server.smtp() as client:  # smtplib sends "vrfy" in lower case
        client.ehlo()
        for address, reply in expected.items():
            assert client.verify(address) == (CANNOT if disabled else reply), address


def test_disabled_by_default(ingress_server):
    server = ingress_server({"directory": DIRECTORY})
    with server.raw() as raw:
        raw.reply()
        assert raw.cmd("VRFY alice@example.test") == (CANNOT[0], CANNOT[1].decode())
        assert raw.cmd("VRFY nobody@example.test")[0] == 252


def test_explicitly_disabled(ingress_server):
    server = ingress_server(config(False))
    with server.smtp() as client:
        assert client.verify("alice@example.test") == CANNOT
