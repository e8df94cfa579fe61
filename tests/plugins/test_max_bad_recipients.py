"""max_bad_recipients: RCPTs to non-existent local mailboxes, counted per connection."""

from __future__ import annotations

import smtplib
import ssl

import pytest

DIRECTORY = {"domains": ["example.test"],
             "users": [{"address": "alice@example.test", "password": "x"}]}


def config(limit: int | None = None, **server) -> dict:
    cfg = {"directory": DIRECTORY, "server": {"plugin_modules": ["deny_relay"], **server},
           "plugins": {"deny_relay": {}}}
    if limit is not None:
        cfg["plugins"]["max_bad_recipients"] = {"limit": limit}
    return cfg


def start(raw) -> None:
    raw.reply()
    raw.cmd("EHLO client.example.org")
    assert raw.cmd("MAIL FROM:<a@example.org>")[0] == 250


@pytest.mark.parametrize("disabled", [(), ("max_bad_recipients",)])
def test_the_limit_th_bad_recipient_gets_550_then_421(ingress_server, disabled):
    server = ingress_server(config(3), disabled=disabled)
    with server.raw() as raw:
        start(raw)
        for i in range(2):
            assert raw.cmd(f"RCPT TO:<nobody{i}@example.test>") == (
                550, "5.1.1 Mailbox unavailable")
        assert raw.cmd("RCPT TO:<alice@example.test>")[0] == 250  # good ones do not count
        assert raw.cmd("RCPT TO:<nobody2@example.test>") == (550, "5.1.1 Mailbox unavailable")
        if disabled:
            assert raw.cmd("NOOP")[0] == 250
        else:
            assert raw.reply() == (421, "4.7.0 Too many bad recipients")
            assert raw.closed_by_server()
    assert server.mailbox("alice@example.test") == []


def test_default_limit_is_20(ingress_server):
    server = ingress_server(config())
    with server.raw() as raw:
        start(raw)
        for i in range(19):
            assert raw.cmd(f"RCPT TO:<u{i}@example.test>")[0] == 550
        assert raw.cmd("NOOP")[0] == 250
        assert raw.cmd("RCPT TO:<u19@example.test>")[0] == 550
        assert raw.reply()[0] == 421


def test_zero_is_unlimited(ingress_server):
    server = ingress_server(config(0))
    with server.raw() as raw:
        start(raw)
        for i in range(30):
            assert raw.cmd(f"RCPT TO:<u{i}@example.test>")[0] == 550
        assert raw.cmd("RCPT TO:<alice@example.test>")[0] == 250
        assert raw.cmd("DATA")[0] == 354
        assert raw.cmd("Subject: x\r\n\r\nhi\r\n.")[0] == 250


def test_relay_denials_and_vrfy_do_not_count(ingress_server):
    server = ingress_server(config(2))
    with server.raw() as raw:
        start(raw)
        for i in range(5):
            assert raw.cmd(f"RCPT TO:<u{i}@elsewhere.test>") == (550, "5.7.1 Relaying denied")
        assert raw.cmd("RCPT TO:<bad-syntax@>")[0] == 501
        assert raw.cmd("VRFY nobody@example.test")[0] in (252, 550)
        assert raw.cmd("RCPT TO:<nobody@example.test>")[0] == 550
        assert raw.cmd("NOOP")[0] == 250
        assert raw.cmd("RCPT TO:<nobody2@example.test>")[0] == 550
        assert raw.reply() == (421, "4.7.0 Too many bad recipients")


def test_the_count_survives_rset_and_new_transactions(ingress_server):
    server = ingress_server(config(3))
    with server.raw() as raw:
        start(raw)
        assert raw.cmd("RCPT TO:<x1@example.test>")[0] == 550
        assert raw.cmd("RSET")[0] == 250
        assert raw.cmd("MAIL FROM:<a@example.org>")[0] == 250
        assert raw.cmd("RCPT TO:<x2@example.test>")[0] == 550
        assert raw.cmd("RCPT TO:<alice@example.test>")[0] == 250
        assert raw.cmd("DATA")[0] == 354
        assert raw.cmd("Subject: x\r\n\r\nhi\r\n.")[0] == 250
        assert raw.cmd("MAIL FROM:<a@example.org>")[0] == 250
        assert raw.cmd("RCPT TO:<x3@example.test>")[0] == 550
        assert raw.reply()[0] == 421
    assert len(server.mailbox("alice@example.test")) == 1


def test_a_new_connection_starts_from_zero(ingress_server):
    server = ingress_server(config(2))
    for _ in range(3):
        with server.raw() as raw:
            start(raw)
            assert raw.cmd("RCPT TO:<x@example.test>")[0] == 550
            assert raw.cmd("QUIT")[0] == 221


def test_the_count_survives_starttls(ingress_server, tmp_path):
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("mx.test", "127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    server = ingress_server(config(2, tls_cert=str(tmp_path / "cert.pem"),
                                   tls_key=str(tmp_path / "key.pem")))
    context = ssl.create_default_context()
    ca.configure_trust(context)
    with server.smtp() as client:
        client.ehlo("client.example.org")
        client.mail("a@example.org")
        assert client.rcpt("x1@example.test")[0] == 550
        client.starttls(context=context)
        client.ehlo("client.example.org")
        client.mail("a@example.org")
        assert client.rcpt("x2@example.test")[0] == 550
        assert client.noop() == (421, b"4.7.0 Too many bad recipients")  # already sent
        with pytest.raises(smtplib.SMTPServerDisconnected):
            client.noop()


def test_unknown_utf8_mailboxes_of_an_idn_count(ingress_server):
    directory = {"domains": ["bücher.example"],
                 "users": [{"address": "jörg@bücher.example", "password": "x"}]}
    server = ingress_server({"directory": directory,
                             "plugins": {"max_bad_recipients": {"limit": 3}}})
    with server.raw() as raw:
        raw.reply()
        raw.cmd("EHLO client.example.org")
        assert raw.cmd("MAIL FROM:<a@example.org> SMTPUTF8")[0] == 250
        assert raw.cmd("RCPT TO:<jo\u0308rg@xn--bcher-kva.example>")[0] == 250  # NFD: exists
        assert raw.cmd("RCPT TO:<jürgen@bücher.example>") == (550, "5.1.1 Mailbox unavailable")
        assert raw.cmd("RCPT TO:<jürgen@XN--BCHER-KVA.example>")[0] == 550
        assert raw.cmd("RCPT TO:<x@bücher.example>") == (550, "5.1.1 Mailbox unavailable")
        assert raw.reply() == (421, "4.7.0 Too many bad recipients")
        assert raw.closed_by_server()
