"""max_hop_count: the top-level Received: headers of a message, as received, against the limit."""

from __future__ import annotations

import pytest

from ingress_plugins import max_hop_count
from ingress_plugins.max_hop_count import TOO_MANY_HOPS

LOCAL = {"directory": {"domains": ["example.test"],
                       "users": [{"address": "alice@example.test", "password": "x"}]}}


def config(limit: int | None = None) -> dict:
    if limit is None:
        return LOCAL
    return {**LOCAL, "plugins": {"max_hop_count": {"limit": limit}}}


def hops(n: int, folded: bool = False) -> bytes:
    sep = b"\r\n\t" if folded else b" "
    return b"".join(b"Received: from h%d.example" % i + sep + b"by h%d.example; "
                    b"Mon, 1 Jan 2024 00:00:00 +0000\r\n" % (i + 1) for i in range(n))


def message(received: bytes, extra: bytes = b"") -> bytes:
    return received + b"From: a@example.org\r\nSubject: hops\r\n" + extra + b"\r\nbody\r\n"


def send(server, data: bytes) -> tuple[int, bytes]:
    with server.smtp() as client:
        client.ehlo("client.example.org")
        client.mail("a@example.org")
        client.rcpt("alice@example.test")
        reply = client.data(data)
        assert client.noop()[0] == 250  # the session goes on after a refusal
    return reply


@pytest.mark.parametrize("disabled", [(), ("max_hop_count",)])
def test_default_limit_is_20(ingress_server, disabled):
    server = ingress_server(config(), disabled=disabled)
    assert send(server, message(hops(19)))[0] == 250
    reply = send(server, message(hops(20)))
    if disabled:
        assert reply[0] == 250
    else:
        assert reply == (554, b"5.4.6 Too many hops")
    assert len(server.mailbox("alice@example.test")) == (2 if disabled else 1)


@pytest.mark.parametrize("disabled", [(), ("max_hop_count",)])
def test_configured_limit(ingress_server, disabled):
    server = ingress_server(config(3), disabled=disabled)
    assert send(server, message(hops(2)))[0] == 250
    assert send(server, message(hops(3)))[0] == (250 if disabled else 554)


def test_our_own_received_header_is_not_counted(ingress_server):
    server = ingress_server(config(1))
    assert send(server, message(b""))[0] == 250
    [stored] = server.mailbox("alice@example.test")
    assert stored.count(b"Received:") == 1  # added by received_header after the check


# Which headers count is the plugin's own logic: unit tests of its on_data hook (no server),
# with the core's Message as the core stores a received message.


@pytest.mark.parametrize(("limit", "refused"), [(4, True), (5, False)])
def test_folded_malformed_and_8bit_headers(ingress_plugin, limit, refused):
    plugin = ingress_plugin(max_hop_count, {"limit": limit})
    received = (hops(2, folded=True)
                + b"X-Caf\xc3\xa9: \xff\xfe 8-bit\r\n"
                + b"garbage line without a colon\r\n"
                + b"Received : from obsolete.example (space before the colon)\r\n"
                + b"received:from lower.example\r\n")
    reply = plugin.call("on_data", message=plugin.message(message(received)))
    assert reply == (TOO_MANY_HOPS if refused else None)


def test_received_headers_in_the_body_or_an_attached_message_do_not_count(ingress_plugin):
    plugin = ingress_plugin(max_hop_count, {"limit": 3})
    mime = (b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n")
    body = (b"\r\n--b\r\nContent-Type: message/rfc822\r\n\r\n" + hops(5)
            + b"Subject: inner\r\n\r\ninner\r\n--b--\r\n" + hops(5))
    data = hops(2) + b"From: a@example.org\r\n" + mime + body
    assert plugin.call("on_data", message=plugin.message(data)) is None
    assert plugin.call("on_data", message=plugin.message(hops(3) + data)) == TOO_MANY_HOPS
