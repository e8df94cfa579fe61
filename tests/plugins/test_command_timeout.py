"""command_timeout: a client that stalls inside a command gets 421 4.4.2 and is cut; one that
keeps sending is never cut. Real sockets, deliberately slow clients, fractional seconds."""

from __future__ import annotations

import fcntl
import socket
import struct
import termios
import time

import pytest

from ingress.testing import SMTPRaw

TIMEOUT = 0.5  # the configured command timeout, seconds (fractions are allowed)
WAIT = TIMEOUT + 9  # how long a test waits for the server to act: generous, never a tight window
USERS = {"domains": ["example.test"],
         "users": [{"address": "alice@example.test", "password": "alicepw"}]}
CUT = (421, "4.4.2 mx.test Command timeout")


def config(**extra) -> dict:
    return {"directory": USERS, "server": {"plugin_modules": ["fake_auth"]},
            "plugins": {"command_timeout": {"seconds": TIMEOUT}, "fake_auth": {},
                        "session_timeout": {"enabled": False}, **extra}}


def start_data(raw: SMTPRaw) -> None:
    assert raw.reply()[0] == 220
    for line in ("EHLO c", "MAIL FROM:<a@example.org>", "RCPT TO:<alice@example.test>"):
        assert raw.cmd(line)[0] == 250
    assert raw.cmd("DATA")[0] == 354


def cut_after_stall(raw: SMTPRaw) -> float:
    """Wait for the command timeout's 421 and the close; return how long it took."""
    started = time.monotonic()
    raw.sock.settimeout(WAIT)
    assert raw.reply() == CUT
    elapsed = time.monotonic() - started
    assert raw.closed_by_server(WAIT)
    return elapsed


def still_open(raw: SMTPRaw) -> bool:
    """No 421 arrives within three timeouts: the server did not cut the client."""
    return not raw.closed_by_server(3 * TIMEOUT) and raw._buffer == b""


@pytest.mark.parametrize("disabled", [(), ("command_timeout",)])
def test_partial_command_line(ingress_server, disabled):
    server = ingress_server(config(), disabled=disabled)
    with server.raw() as raw:
        raw.reply()
        assert raw.cmd("EHLO c")[0] == 250
        raw.send(b"MAIL FROM:<a@exam")
        if disabled:
            assert still_open(raw)
            raw.send(b"ple.org>\r\n")
            assert raw.reply()[0] == 250
        else:
            assert cut_after_stall(raw) >= TIMEOUT * 0.9


@pytest.mark.parametrize("disabled", [(), ("command_timeout",)])
def test_data_stalled_before_its_first_byte(ingress_server, disabled):
    server = ingress_server(config(), disabled=disabled)
    with server.raw() as raw:
        start_data(raw)
        if disabled:
            assert still_open(raw)
            raw.send(b"Subject: late\r\n\r\nstill fine\r\n.\r\n")
            assert raw.reply()[0] == 250
        else:
            assert cut_after_stall(raw) >= TIMEOUT * 0.9
    assert len(server.mailbox("alice@example.test")) == (1 if disabled else 0)


@pytest.mark.parametrize("disabled", [(), ("command_timeout",)])
def test_data_stalled_midway_is_never_delivered(ingress_server, disabled):
    server = ingress_server(config(), disabled=disabled)
    with server.raw() as raw:
        start_data(raw)
        raw.send(b"Subject: stalled\r\n\r\n" + b"line of the body\r\n" * 1000)
        if disabled:
            assert still_open(raw)
        else:
            cut_after_stall(raw)
    server.stop()  # every session ends: nothing can still be on its way to the mailbox
    assert server.all_messages() == [] and server.queue_entries() == []


def test_data_stalled_after_the_final_dot_line_started(ingress_server):
    """A body ended by CRLF '.' without the last CRLF is not complete: cut, not delivered."""
    server = ingress_server(config())
    with server.raw() as raw:
        start_data(raw)
        raw.send(b"Subject: almost\r\n\r\nbody\r\n.")
        cut_after_stall(raw)
    server.stop()
    assert server.all_messages() == []


def test_data_that_keeps_flowing_is_never_cut(ingress_server):
    """Slower than the timeout in total (about 4x), but never pausing as long as it."""
    server = ingress_server(config())
    with server.raw() as raw:
        start_data(raw)
        raw.send(b"Subject: trickle\r\n\r\n")
        started = time.monotonic()
        lines = 0
        while time.monotonic() - started < 4 * TIMEOUT:
            time.sleep(TIMEOUT / 5)
            raw.send(b"a slow line %d\r\n" % lines)
            lines += 1
        raw.send(b".\r\n")
        code, text = raw.reply()
        assert code == 250, text
        assert raw.cmd("QUIT")[0] == 221
    [stored] = server.mailbox("alice@example.test")
    assert stored.count(b"a slow line") == lines


def test_a_slow_command_line_that_keeps_coming_is_not_cut(ingress_server):
    server = ingress_server(config())
    with server.raw() as raw:
        raw.reply()
        started = time.monotonic()
        for byte in b"NOOP just taking my time" * 2:
            raw.send(bytes([byte]))
            time.sleep(TIMEOUT / 5)
            if time.monotonic() - started > 3 * TIMEOUT:
                break
        assert raw.cmd("")[0] == 250


@pytest.mark.parametrize("disabled", [(), ("command_timeout",)])
def test_auth_exchange_stalled_after_334(ingress_server, disabled):
    server = ingress_server(config(), disabled=disabled)
    with server.raw() as raw:
        raw.reply()
        assert raw.cmd("EHLO c")[0] == 250
        assert raw.cmd("AUTH XPLAIN")[0] == 334
        if disabled:
            assert still_open(raw)
        else:
            assert cut_after_stall(raw) >= TIMEOUT * 0.9


def test_never_fires_between_commands(ingress_server):
    server = ingress_server(config())
    with server.raw() as raw:
        raw.reply()
        assert raw.cmd("EHLO c")[0] == 250
        assert still_open(raw)  # idle, not inside a command
        assert raw.cmd("NOOP")[0] == 250


def test_the_session_timer_takes_over_after_the_command(ingress_server):
    """After a slow command completes, the idle timer (not the command timer) applies."""
    server = ingress_server(config(session_timeout={"minutes": 3 * TIMEOUT / 60}))
    with server.raw() as raw:
        raw.reply()
        raw.send(b"NO")
        time.sleep(TIMEOUT / 2)
        assert raw.cmd("OP")[0] == 250
        started = time.monotonic()
        raw.sock.settimeout(WAIT + 3 * TIMEOUT)
        assert raw.reply() == (421, "4.4.2 mx.test Session timeout")
        assert time.monotonic() - started >= 3 * TIMEOUT * 0.9


@pytest.mark.parametrize("disabled", [(), ("command_timeout",)])
def test_a_client_that_never_reads_its_replies_is_cut(ingress_server, disabled):
    """Pipelining commands without reading a single reply fills the socket buffers until the
    server waits on the client: that wait runs on the command timer too, and the connection
    is reset (a 421 could not reach it), so it cannot hold its slot forever."""
    server = ingress_server(config(), disabled=disabled)
    sock = socket.create_connection((server.host, server.port))
    try:
        # 150,000 HELPs ask for about 16 MB of replies: more than both sockets buffer, so the
        # server must wait for us to read before it has answered them all.
        sock.sendall(b"HELP\r\n" * 150_000)
        unread, since = -1, time.monotonic()
        # until what waits for us stops growing for 2 s (<= 40 s; a busy machine can pause
        # the server for a second without it having stopped)
        for _ in range(400):
            now_unread = struct.unpack("i", fcntl.ioctl(sock, termios.FIONREAD, b"\0" * 4))[0]
            if now_unread != unread:
                unread, since = now_unread, time.monotonic()
            elif time.monotonic() - since > 2:
                break
            time.sleep(0.1)
        else:
            pytest.fail("the server never stopped sending")
        time.sleep(TIMEOUT + 2)  # past the command timeout, still not reading anything
        sock.setblocking(True)
        sock.settimeout(3 * TIMEOUT)
        replies = 0
        try:
            while chunk := sock.recv(1 << 20):  # what the server sent before the cut
                replies += chunk.count(b"\n")
            cut = True
        except ConnectionResetError:
            cut = True
        except TimeoutError:  # reading was a sign of life: the server went on and waits
            cut = False
        assert replies > 1000
        assert cut != bool(disabled)
    finally:
        sock.close()


@pytest.mark.parametrize("disabled", [(), ("command_timeout",)])
def test_a_tls_handshake_stalled_after_starttls_is_cut(ingress_server, tls_certs, disabled):
    """After '220 Ready to start TLS' the client owes the handshake: on the command timer. The
    cut is a plain close (a plaintext 421 cannot go into a TLS handshake)."""
    cfg = config()
    cfg["server"].update(tls_certs.server)
    server = ingress_server(cfg, disabled=disabled)
    with server.raw() as raw:
        raw.reply()
        assert raw.cmd("EHLO c")[0] == 250
        assert raw.cmd("STARTTLS")[0] == 220
        if disabled:  # only the 60-second TLS handshake timeout would end it
            assert still_open(raw)
        else:
            assert raw.closed_by_server(WAIT)
            assert raw._buffer == b""


# --- min_data_rate -----------------------------------------------------------------------------

TRICKLE = TIMEOUT / 4  # a byte every 0.125 s: 8 octets/s, never a pause near the command timeout


def trickle(raw: SMTPRaw, data: bytes) -> tuple[tuple[int, str], int]:
    """Send *data* one byte every TRICKLE seconds until a reply arrives; return the reply and
    how many bytes were sent."""
    sent = 0
    for byte in data:
        try:
            raw.send(bytes([byte]))
        except (BrokenPipeError, ConnectionResetError):
            break
        sent += 1
        raw.sock.settimeout(TRICKLE)
        try:
            chunk = raw.sock.recv(65536)
        except TimeoutError:
            continue
        raw._buffer += chunk
        break
    raw.sock.settimeout(WAIT)
    return raw.reply(), sent


@pytest.mark.parametrize("disabled", [(), ("command_timeout",)])
def test_a_body_below_the_minimum_data_rate_is_cut(ingress_server, disabled):
    """8 octets/s against a minimum of 1,000 octets/s after a grace of `seconds`: cut with the
    command timeout's 421 once the grace is over, though the data never pauses; not stored."""
    server = ingress_server(config(command_timeout={"seconds": TIMEOUT, "min_data_rate": 1000}),
                            disabled=disabled)
    with server.raw() as raw:
        start_data(raw)
        started = time.monotonic()
        body = b"Subject: slow\r\n\r\n" + b"x" * 30 + b"\r\n.\r\n"  # at most 6.5 s
        reply, sent = trickle(raw, body)
        if disabled:
            assert reply[0] == 250 and sent == len(body)
        else:
            assert reply == CUT and sent < len(body)
            assert time.monotonic() - started >= TIMEOUT * 0.9  # not before the grace
            assert raw.closed_by_server(WAIT)
    server.stop()
    if not disabled:
        assert "command timeout (data rate)" in server.log()
        assert server.all_messages() == [] and server.queue_entries() == []


def test_a_fast_body_is_served_with_a_minimum_data_rate(ingress_server):
    server = ingress_server(config(command_timeout={"seconds": TIMEOUT, "min_data_rate": 1000}))
    with server.raw() as raw:
        start_data(raw)
        raw.send(b"Subject: fast\r\n\r\n" + b"a line of a message body\r\n" * 4000 + b".\r\n")
        assert raw.reply()[0] == 250
        # and a second message on the same connection: the rate counts per body
        for line in ("MAIL FROM:<a@example.org>", "RCPT TO:<alice@example.test>"):
            assert raw.cmd(line)[0] == 250
        assert raw.cmd("DATA")[0] == 354
        raw.send(b"Subject: fast again\r\n\r\nshort\r\n.\r\n")
        assert raw.reply()[0] == 250
        assert raw.cmd("QUIT")[0] == 221
    assert len(server.mailbox("alice@example.test")) == 2


def test_a_slow_but_flowing_body_is_served_without_a_minimum_data_rate(ingress_server):
    """min_data_rate = 0 (the default): the same trickle, 3 times as long as `seconds`,
    finishes its body and is stored."""
    server = ingress_server(config(command_timeout={"seconds": TIMEOUT, "min_data_rate": 0}))
    body = b"Subject: slow\r\n\r\nok\r\n.\r\n"  # 24 octets: about 3 s
    with server.raw() as raw:
        start_data(raw)
        reply, sent = trickle(raw, body)
        assert reply[0] == 250 and sent == len(body)
        assert raw.cmd("QUIT")[0] == 221
    [stored] = server.mailbox("alice@example.test")
    assert stored.endswith(b"\r\nok\r\n")


def test_the_minimum_data_rate_does_not_apply_outside_a_body(ingress_server):
    """A command line sent byte by byte is on the command timer only, not on the data rate."""
    server = ingress_server(config(command_timeout={"seconds": TIMEOUT, "min_data_rate": 1000}))
    with server.raw() as raw:
        raw.reply()
        line = b"NOOP taking my time\r\n"
        assert trickle(raw, line) == ((250, "2.0.0 OK"), len(line))
