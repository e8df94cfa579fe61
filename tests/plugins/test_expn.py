"""expn: EXPN lists the members of an alias or list when enabled, 502 otherwise."""

from __future__ import annotations

import pytest

DIRECTORY = {
    "domains": ["example.test", "other.test"],
    "users": [{"address": "alice@example.test", "password": "pw", "name": "Alice Example"},
              {"address": "bob@example.test", "password": "pw"}],
    "aliases": {"team@example.test": ["alice@example.test", "bob@example.test",
                                      "carol@elsewhere.test"],
                "solo@example.test": ["alice@example.test"],
                "sales@other.test": ["bob@example.test"]},
    "lists": {"all@example.test": ["team@example.test", "dave@elsewhere.test"],
              "sales@example.test": ["alice@example.test"]},
}
NOT_AVAILABLE = (502, "5.5.1 EXPN not available")


def config(enabled: bool) -> dict:
    return {"directory": DIRECTORY, "plugins": {"expn": {"enabled": enabled}}}


@pytest.mark.parametrize("disabled", [(), ("expn",)])
def test_enabled(ingress_server, disabled):
    server = ingress_server(config(True), disabled=disabled)
    with server.raw() as raw:
        raw.reply()
        raw.send("EXPN team@example.test\r\n")
        if disabled:
            assert raw.reply() == NOT_AVAILABLE
            return
        lines = [raw._line() for _ in range(3)]
        assert lines == [b"250-2.1.5 <alice@example.test>", b"250-2.1.5 <bob@example.test>",
                         b"250 2.1.5 <carol@elsewhere.test>"]
        assert raw.cmd("EXPN <ALL@example.test>") == (
            250, "2.1.5 <team@example.test>\n2.1.5 <dave@elsewhere.test>")  # not recursive
        assert raw.cmd("EXPN solo@example.test") == (250, "2.1.5 <alice@example.test>")
        assert raw.cmd("EXPN team") == (
            250, "2.1.5 <alice@example.test>\n2.1.5 <bob@example.test>\n"
                 "2.1.5 <carol@elsewhere.test>")
        assert raw.cmd("EXPN sales")[:2] == (553, "5.1.4 List ambiguous")
        for other in ("alice@example.test", "nobody@example.test", "x@example.org", "nobody"):
            assert raw.cmd(f"EXPN {other}")[:2] == (550, "5.1.1 Not an alias or list"), other


def test_smtplib(ingress_server):
    server = ingress_server(config(True))
    with server.smtp() as client:  # smtplib sends "expn" in lower case
        assert client.expn("solo@example.test") == (250, b"2.1.5 <alice@example.test>")


def test_disabled_by_default(ingress_server):
    server = ingress_server({"directory": DIRECTORY})
    with server.raw() as raw:
        raw.reply()
        assert raw.cmd("EXPN team@example.test") == NOT_AVAILABLE
        assert raw.cmd("EXPN nobody@example.test") == NOT_AVAILABLE
