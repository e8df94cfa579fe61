"""STARTTLS and implicit TLS listeners, with real certificates (trustme) and real clients."""

from __future__ import annotations

import asyncio
import email
import smtplib
import ssl

import aiosmtplib
import pytest

USERS = {"domains": ["example.test"], "users": [{"address": "alice@example.test",
                                                 "password": "alicepw"}]}
MESSAGE = "From: a@example.org\r\nSubject: tls\r\n\r\nbody\r\n"


@pytest.fixture
def server(ingress_server, tls):
    return ingress_server({"server": tls.server(implicit=True), "directory": USERS})


class TLSClient:
    """A client TLS session over memory BIOs on an already connected socket, so that the test
    decides exactly which bytes leave in which write."""

    def __init__(self, sock, context: ssl.SSLContext, first: bytes = b""):
        """Handshake; the client's last handshake flight and *first* (application data) leave
        in ONE write, as a fast client may send them."""
        self.sock = sock
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname="127.0.0.1")
        for _ in range(20):
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self.sock.sendall(self.outgoing.read())
                self._receive()
        self.send(first)

    def _receive(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("closed by the server")
        self.incoming.write(data)

    def send(self, data: bytes) -> None:
        if data:
            self.tls.write(data)
        self.sock.sendall(self.outgoing.read())

    def reply(self) -> bytes:
        """One complete (possibly multi-line) reply."""
        data = b""
        for _ in range(100):
            try:
                data += self.tls.read(65536)
            except ssl.SSLWantReadError:
                pass
            lines = data.split(b"\r\n")
            if data.endswith(b"\r\n") and lines[-2][3:4] == b" ":
                return data
            self._receive()
        return data


def test_starttls_is_offered_only_with_a_certificate(ingress_server, server):
    with server.smtp() as client:
        client.ehlo()
        assert client.has_extn("starttls")
    plain = ingress_server({"directory": USERS}, name="plain")
    with plain.smtp() as client:
        client.ehlo()
        assert not client.has_extn("starttls")
        assert client.docmd("STARTTLS")[0] == 502


def test_smtplib_starttls_delivers_and_resets_the_session(server, tls):
    with server.smtp() as client:
        client.ehlo("before.example")
        client.mail("a@example.org")
        code, text = client.starttls(context=tls.context())
        assert (code, text) == (220, b"2.0.0 Ready to start TLS")
        # RFC 3207 4.2: the server forgets HELO and the transaction.
        assert client.docmd("MAIL", "FROM:<a@example.org>")[0] == 503
        client.ehlo("after.example")
        assert not client.has_extn("starttls"), "not offered twice"
        assert client.docmd("STARTTLS")[0] == 503
        client.sendmail("a@example.org", ["alice@example.test"], MESSAGE)
    [stored] = server.mailbox("alice@example.test")
    received = email.message_from_bytes(stored)["Received"]
    assert "from after.example" in received and "with ESMTPS" in received


def test_starttls_syntax_and_sequence(server):
    with server.raw() as raw:
        raw.reply()
        assert raw.cmd("STARTTLS")[0] == 503  # before EHLO
        raw.cmd("EHLO c")
        assert raw.cmd("STARTTLS now")[:2] == (501, "5.5.4 Syntax: STARTTLS")
        assert raw.cmd("NOOP")[0] == 250


def test_implicit_tls_listener(server, tls):
    with smtplib.SMTP_SSL(server.host, server.tls_port, context=tls.context(),
                          timeout=10) as client:
        client.ehlo("implicit.example")
        assert not client.has_extn("starttls")
        assert client.docmd("STARTTLS")[0] == 503
        client.sendmail("a@example.org", ["alice@example.test"], MESSAGE)
    [stored] = server.mailbox("alice@example.test")
    assert "with ESMTPS" in email.message_from_bytes(stored)["Received"]


def test_aiosmtplib_starttls_and_implicit_tls(server, tls):
    async def send():
        await aiosmtplib.send(MESSAGE, sender="a@example.org", recipients=["alice@example.test"],
                              hostname=server.host, port=server.port, start_tls=True,
                              tls_context=tls.context())
        await aiosmtplib.send(MESSAGE, sender="a@example.org", recipients=["alice@example.test"],
                              hostname=server.host, port=server.tls_port, use_tls=True,
                              tls_context=tls.context())

    asyncio.run(send())
    assert len(server.mailbox("alice@example.test")) == 2


def test_plaintext_pipelined_after_starttls_is_discarded(server, tls):
    """CVE-2021-38371 / CVE-2024-34083: commands sent in the same write as STARTTLS must never
    be answered, neither in plaintext nor inside TLS."""
    with server.raw() as raw:
        raw.reply()
        raw.cmd("EHLO c")
        raw.send(b"STARTTLS\r\nRSET\r\n")
        assert raw.reply()[0] == 220
        assert raw._buffer == b"", "nothing after 220 in plaintext"
        reply = TLSClient(raw.sock, tls.context(), b"EHLO inside\r\n").reply()
        assert reply.startswith(b"250-mx.test Hello inside"), reply  # not the RSET's 250


def test_plaintext_transaction_injected_before_tls_is_forgotten(server, tls):
    with server.raw() as raw:
        raw.reply()
        raw.cmd("EHLO c")
        raw.send(b"STARTTLS\r\nEHLO evil\r\nMAIL FROM:<evil@example.org>\r\n"
                 b"RCPT TO:<alice@example.test>\r\n")
        assert raw.reply()[0] == 220
        client = TLSClient(raw.sock, tls.context(), b"EHLO inside\r\n")
        assert client.reply().startswith(b"250-mx.test Hello inside")
        client.send(b"RCPT TO:<alice@example.test>\r\n")
        assert client.reply().startswith(b"503 5.5.1"), "the plaintext MAIL was dropped"
        client.send(b"DATA\r\n")
        assert client.reply().startswith(b"503 5.5.1")
    assert server.all_messages() == []


def test_plaintext_after_the_220_breaks_the_handshake(server):
    with server.raw() as raw:
        raw.reply()
        raw.cmd("EHLO c")
        assert raw.cmd("STARTTLS")[0] == 220
        raw.send(b"RSET\r\nMAIL FROM:<evil@example.org>\r\n")
        assert raw.closed_by_server(), "the server gives up on a failed handshake"
        assert b"250" not in raw._buffer
    with server.smtp() as client:  # and keeps serving
        assert client.noop()[0] == 250


def test_first_command_in_the_same_write_as_the_handshake_end(server, tls):
    """A fast client may send its first command with its last handshake message; it must be
    answered (the STARTTLS discard must happen before the handshake, not after it)."""
    for _ in range(5):
        with server.raw() as raw:
            raw.reply()
            raw.cmd("EHLO c")
            assert raw.cmd("STARTTLS")[0] == 220
            raw.sock.settimeout(10)
            client = TLSClient(raw.sock, tls.context(), b"EHLO fast\r\n")
            assert client.reply().startswith(b"250-mx.test Hello fast")
