"""received_header: all / unauthenticated / none, and always one when the message has none."""

from __future__ import annotations

import email
import re

import pytest

USERS = {
    "domains": ["example.test"],
    "users": [{"address": "alice@example.test", "password": "alicepw"}],
}
PLAIN = "From: a@example.org\r\nSubject: s\r\n\r\nbody\r\n"
EARLIER = "Received: from earlier.example by relay.example; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
WITH_RECEIVED = EARLIER + PLAIN


def config(mode: str) -> dict:
    return {"directory": USERS, "plugins": {"received_header": {"append": mode}}}


def send(server, body: str, rcpts=("alice@example.test",), auth=False) -> bytes:
    with server.smtp() as client:
        client.ehlo("client.example.org")
        if auth:
            code, _ = client.login("alice@example.test", "alicepw")  # CRAM-MD5 (auth plugin)
            assert code == 235
        client.sendmail("a@example.org", list(rcpts), body)
    return server.mailbox("alice@example.test")[-1]


def received(stored: bytes) -> list[str]:
    return email.message_from_bytes(stored).get_all("Received") or []


def test_format(ingress_server):
    server = ingress_server(config("all"))
    [header] = received(send(server, PLAIN))
    pattern = (r"from client\.example\.org \(\[127\.0\.0\.1\]\) by mx\.test with ESMTP "
               r"id [0-9A-F]+ for <alice@example\.test>; "
               r"[A-Z][a-z]{2}, \d{2} [A-Z][a-z]{2} \d{4} \d{2}:\d{2}:\d{2} \+0000")
    assert re.fullmatch(pattern, " ".join(header.split())), header


def test_no_for_clause_with_several_recipients(ingress_server):
    server = ingress_server({**config("all"), "directory": {**USERS, "domains": ["example.test"],
                            "users": USERS["users"] + [{"address": "b@example.test",
                                                        "password": "x"}]}})
    [header] = received(send(server, PLAIN, rcpts=("alice@example.test", "b@example.test")))
    assert " for " not in header


@pytest.mark.parametrize("mode,auth,added", [
    ("all", False, True), ("all", True, True),
    ("unauthenticated", False, True), ("unauthenticated", True, False),
    ("none", False, False), ("none", True, False),
])
def test_modes(ingress_server, mode, auth, added):
    server = ingress_server(config(mode))
    headers = received(send(server, WITH_RECEIVED, auth=auth))
    assert len(headers) == (2 if added else 1)
    if added:
        assert "by mx.test with ESMTPA" in headers[0] if auth else "with ESMTP id" in headers[0]


@pytest.mark.parametrize("mode", ["none", "unauthenticated"])
def test_a_message_without_received_always_gets_one(ingress_server, mode):
    server = ingress_server(config(mode))
    assert len(received(send(server, PLAIN, auth=True))) == 1


def test_the_header_comes_from_the_plugin(ingress_server):
    server = ingress_server(config("all"), disabled=("received_header",))
    assert received(send(server, PLAIN)) == []


@pytest.mark.parametrize("tls, user, smtputf8, protocol", [
    (False, None, True, "UTF8SMTP"), (True, None, True, "UTF8SMTPS"),
    (False, "alice@example.test", True, "UTF8SMTPA"), (True, "alice@example.test", True,
                                                       "UTF8SMTPSA"),
    (True, "alice@example.test", False, "ESMTPSA"),
])
def test_smtputf8_transactions_say_utf8smtp(ingress_plugin, tls, user, smtputf8, protocol):
    from ingress_plugins import received_header

    plugin = ingress_plugin(received_header, {"append": "all"})
    session = plugin.session(helo="client.test", tls=tls, auth_user=user)
    transaction = plugin.transaction("jörg@bücher.example" if smtputf8 else "a@example.org",
                                     {"SMTPUTF8": None} if smtputf8 else {},
                                     recipients=("用户@例子.广告",))
    plugin.call("on_data", session=session, transaction=transaction,
                message=plugin.message(PLAIN))
    [(name, value)] = transaction.added_headers
    assert name == "Received" and f" with {protocol} id " in value
    assert value.startswith("from client.test ([192.0.2.1]) by mx.test")
    assert " for <用户@例子.广告>;" in value
