"""max_messages: after `limit` accepted messages in a session, the next MAIL gets 421 4.7.0 and
the connection is closed; the count is per connection and survives STARTTLS."""

from __future__ import annotations

import pytest

USERS = {"domains": ["example.test"],
         "users": [{"address": "alice@example.test", "password": "alicepw"}]}
CUT = (421, "4.7.0 Too many messages in this session")


def config(limit: int, **server) -> dict:
    return {"directory": USERS, "server": server,
            "plugins": {"max_messages": {"limit": limit}}}


def send_one(raw, subject: str = "m") -> None:
    assert raw.cmd("MAIL FROM:<a@example.org>")[0] == 250
    assert raw.cmd("RCPT TO:<alice@example.test>")[0] == 250
    assert raw.cmd("DATA")[0] == 354
    code, text = raw.cmd(f"Subject: {subject}\r\n\r\nbody\r\n.")
    assert code == 250, text


@pytest.mark.parametrize("disabled", [(), ("max_messages",)])
def test_the_mail_after_the_limit_is_refused_and_closed(ingress_server, disabled):
    server = ingress_server(config(2), disabled=disabled)
    with server.raw() as raw:
        raw.reply()
        assert raw.cmd("EHLO c")[0] == 250
        send_one(raw, "one")
        send_one(raw, "two")
        if disabled:
            send_one(raw, "three")
            assert raw.cmd("QUIT")[0] == 221
        else:
            assert raw.cmd("MAIL FROM:<a@example.org>") == CUT
            assert raw.closed_by_server()
    assert len(server.mailbox("alice@example.test")) == (3 if disabled else 2)


def test_pipelined_commands_after_the_refusal_are_not_processed(ingress_server):
    server = ingress_server(config(1))
    with server.raw() as raw:
        raw.reply()
        assert raw.cmd("EHLO c")[0] == 250
        send_one(raw)
        raw.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n"
                 b"Subject: pipelined\r\n\r\nbody\r\n.\r\n")
        assert raw.reply() == CUT
        assert raw.closed_by_server()
    assert len(server.mailbox("alice@example.test")) == 1


def test_transactions_that_were_not_accepted_do_not_count(ingress_server):
    server = ingress_server(config(1))
    with server.raw() as raw:
        raw.reply()
        assert raw.cmd("EHLO c")[0] == 250
        for _ in range(3):
            assert raw.cmd("MAIL FROM:<a@example.org>")[0] == 250
            assert raw.cmd("RCPT TO:<alice@example.test>")[0] == 250
            assert raw.cmd("RSET")[0] == 250
        send_one(raw)
        assert raw.cmd("MAIL FROM:<a@example.org>") == CUT


def test_the_count_is_per_connection(ingress_server):
    server = ingress_server(config(1))
    for _ in range(3):
        with server.raw() as raw:
            raw.reply()
            assert raw.cmd("EHLO c")[0] == 250
            send_one(raw)
            assert raw.cmd("QUIT")[0] == 221
    assert len(server.mailbox("alice@example.test")) == 3


def test_zero_is_unlimited(ingress_server):
    server = ingress_server(config(0))
    with server.raw() as raw:
        raw.reply()
        assert raw.cmd("EHLO c")[0] == 250
        for i in range(12):
            send_one(raw, str(i))
    assert len(server.mailbox("alice@example.test")) == 12


@pytest.mark.parametrize("disabled", [(), ("max_messages",)])
def test_the_count_survives_starttls(ingress_server, tls_certs, disabled):
    server = ingress_server(config(1, **tls_certs.server), disabled=disabled)
    with server.raw() as raw:
        raw.reply()
        assert raw.cmd("EHLO c")[0] == 250
        send_one(raw, "plaintext")
        assert raw.starttls(tls_certs.client, "mx.test")[0] == 220
        assert raw.cmd("EHLO c")[0] == 250
        if disabled:
            send_one(raw, "over tls")
        else:
            assert raw.cmd("MAIL FROM:<a@example.org>") == CUT
            assert raw.closed_by_server()
    assert len(server.mailbox("alice@example.test")) == (2 if disabled else 1)
