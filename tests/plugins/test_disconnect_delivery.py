"""disconnect_delivery: a client that sends a complete message and closes without reading the
reply (legacy PHP mailers) gets it delivered exactly once when enabled, discarded when not.
Rude clients on real sockets: half-close, full close, and RST (SO_LINGER 0)."""

from __future__ import annotations

import fcntl
import re
import socket
import struct
import termios
import time

import pytest

USERS = {"domains": ["example.test"],
         "users": [{"address": "alice@example.test", "password": "alicepw"},
                   {"address": "bob@example.test", "password": "bobpw"}]}
ENVELOPE = (b"EHLO legacy.example\r\nMAIL FROM:<php@example.org>\r\n"
            b"RCPT TO:<alice@example.test>\r\nRCPT TO:<far@remote.test>\r\nDATA\r\n")
BODY = b"Subject: %s\r\n\r\nHello from a mailer that does not wait.\r\n.\r\nQUIT\r\n"


def config(enabled: bool) -> dict:
    return {"directory": USERS, "plugins": {"disconnect_delivery": {"enabled": enabled},
                                            "relay": {"whitelist": ["127.0.0.1"]}}}


def sent_out(sock: socket.socket) -> None:
    """Wait until the server's kernel has acknowledged everything we sent: a close with unread
    data, or with SO_LINGER 0, would otherwise throw away what is still in our send queue."""
    deadline = time.monotonic() + 10
    while struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]:
        assert time.monotonic() < deadline, "the server does not read"
        time.sleep(0.01)


def go_away(sock: socket.socket, how: str) -> None:
    """Leave at once, the way *how* says, without reading anything."""
    if how == "shutdown":  # half-close: FIN, the socket stays open but nothing is read
        sock.shutdown(socket.SHUT_WR)
        time.sleep(0.5)
    elif how == "rst":  # abortive close: RST
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def read_until(sock: socket.socket, marker: bytes) -> None:
    sock.settimeout(10)
    seen = b""
    while marker not in seen:
        chunk = sock.recv(4096)
        assert chunk, f"closed before {marker!r}: {seen!r}"
        seen += chunk


def php_mailer(server, subject: bytes, how: str) -> None:
    """Waits for the 354, then sends the message, its final dot and QUIT in one write, and
    closes without reading the 250."""
    sock = socket.create_connection((server.host, server.port), timeout=10)
    read_until(sock, b"220 ")
    sock.sendall(ENVELOPE)
    read_until(sock, b"354 ")
    sock.sendall(BODY % subject)
    go_away(sock, how)


def whole_session_in_one_write(server, subject: bytes, how: str) -> None:
    """Does not even read the greeting: the whole session in one write, then gone."""
    sock = socket.create_connection((server.host, server.port), timeout=10)
    sock.sendall(ENVELOPE + BODY % subject)
    go_away(sock, how)


CLIENTS = {"php": php_mailer, "one-write": whole_session_in_one_write}
HOWS = ("shutdown", "close", "rst")


def settle(server) -> None:
    """Stop the server: every session ends first, so nothing is still on its way."""
    assert server.stop() == 0


def delivered(server, subject: bytes) -> tuple[int, int]:
    """(copies in alice's mailbox, queue entries) of the message with *subject*."""
    mailbox = sum(b"Subject: " + subject + b"\r\n" in m for m in server.mailbox(
        "alice@example.test"))
    queued = sum(b"Subject: " + subject + b"\r\n" in m for _, m in server.queue_entries())
    return mailbox, queued


def wait_for_log(server, pattern: str, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not re.search(pattern, server.log()):
        assert time.monotonic() < deadline, f"no {pattern!r} in the log:\n{server.log()}"
        time.sleep(0.05)


@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize("client", CLIENTS)
def test_enabled_delivers_exactly_once(ingress_server, client, how):
    server = ingress_server(config(True))
    CLIENTS[client](server, b"rude", how)
    wait_for_log(server, r"accepted \w+ client=127\.0\.0\.1")
    settle(server)
    assert delivered(server, b"rude") == (1, 1)


# A client can only reset (RST) once the server's kernel has acknowledged its data, so a PHP-style
# client that sends the body and then resets races the server storing the message: if the store
# wins, the message was stored before the end of stream and stays (the contract's "one already
# stored stays"). That case cannot promise a discard, so it is not asserted here.
OFF_CASES = [(client, how) for client in CLIENTS for how in HOWS if (client, how) != ("php", "rst")]


@pytest.mark.parametrize("client,how", OFF_CASES)
@pytest.mark.parametrize("enabled,disabled", [(False, ()), (True, ("disconnect_delivery",))])
def test_off_discards_the_message(ingress_server, client, how, enabled, disabled):
    # A content filter's pause before the decision: the client's end of stream is in by then
    # (without it, a busy machine may deliver the FIN after the server decided).
    slowed = config(enabled)
    slowed["server"] = {"plugin_modules": ["slow_data"]}
    server = ingress_server(slowed, disabled=disabled)
    CLIENTS[client](server, b"rude", how)
    wait_for_log(server, r"client gone before storing: discarded")
    settle(server)
    assert delivered(server, b"rude") == (0, 0)
    assert server.all_messages() == [] and server.queue_entries() == []


@pytest.mark.parametrize("how", HOWS)
def test_everything_sent_is_processed_in_order(ingress_server, how):
    """Two messages and a RSET'd transaction in one write, then gone: both messages arrive,
    once each, in order, each with its own envelope."""
    server = ingress_server(config(True))
    sock = socket.create_connection((server.host, server.port), timeout=10)
    sock.sendall(
        b"EHLO legacy.example\r\nMAIL FROM:<one@example.org>\r\nRCPT TO:<alice@example.test>\r\n"
        b"DATA\r\nSubject: first\r\n\r\n1\r\n.\r\n"
        b"MAIL FROM:<x@example.org>\r\nRCPT TO:<alice@example.test>\r\nRSET\r\n"
        b"MAIL FROM:<two@example.org>\r\nRCPT TO:<bob@example.test>\r\n"
        b"RCPT TO:<alice@example.test>\r\nDATA\r\nSubject: second\r\n\r\n2\r\n.\r\nQUIT\r\n")
    go_away(sock, how)
    wait_for_log(server, r"session \w+ 127\.0\.0\.1 ended: 2 message")
    settle(server)
    alice = server.mailbox("alice@example.test")
    assert [m.split(b"Subject: ")[1][:6] for m in alice] == [b"first\r", b"second"]
    assert alice[0].startswith(b"Return-Path: <one@example.org>")
    assert alice[1].startswith(b"Return-Path: <two@example.org>")
    assert len(server.mailbox("bob@example.test")) == 1


@pytest.mark.parametrize("enabled", [True, False])
@pytest.mark.parametrize("how", HOWS)
def test_an_incomplete_message_is_never_delivered(ingress_server, enabled, how):
    server = ingress_server(config(enabled))
    sock = socket.create_connection((server.host, server.port), timeout=10)
    sock.sendall(ENVELOPE + b"Subject: cut\r\n\r\nno final dot\r\n.")
    go_away(sock, how)
    wait_for_log(server, r"session \w+ 127\.0\.0\.1 ended")
    settle(server)
    assert server.all_messages() == [] and server.queue_entries() == []


def test_a_large_message_then_rst(ingress_server):
    """Several megabytes, the final dot, then RST at once: nothing of it is lost."""
    server = ingress_server(config(True))
    sock = socket.create_connection((server.host, server.port), timeout=10)
    read_until(sock, b"220 ")
    sock.sendall(ENVELOPE)
    read_until(sock, b"354 ")
    body = b"".join(b"line %07d of a large message\r\n" % i for i in range(100_000))
    sock.sendall(b"Subject: large\r\n\r\n" + body + b".\r\n")
    sent_out(sock)
    go_away(sock, "rst")
    wait_for_log(server, r"session \w+ 127\.0\.0\.1 ended")
    settle(server)
    [stored] = server.mailbox("alice@example.test")
    assert stored.endswith(b"\r\n\r\n" + body)
