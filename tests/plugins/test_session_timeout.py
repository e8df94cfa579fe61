"""session_timeout: an idle client gets 421 4.4.2 and is cut; disabled, idle sessions live on.
Real sockets and fractional minutes keep it fast; margins are generous."""

from __future__ import annotations

import time

import pytest

IDLE = 0.8  # seconds
MINUTES = IDLE / 60
WAIT = IDLE + 9
USERS = {"domains": ["example.test"],
         "users": [{"address": "alice@example.test", "password": "alicepw"}]}
CUT = (421, "4.4.2 mx.test Session timeout")


def config(enabled: bool = True, **plugins) -> dict:
    return {"directory": USERS, "server": {"plugin_modules": ["fake_auth"]},
            "plugins": {"session_timeout": {"enabled": enabled, "minutes": MINUTES},
                        "fake_auth": {}, **plugins}}


def waits_for_cut(raw) -> float:
    started = time.monotonic()
    raw.sock.settimeout(WAIT)
    assert raw.reply() == CUT
    elapsed = time.monotonic() - started
    assert raw.closed_by_server(WAIT), "the server closes the socket after the 421"
    return elapsed


def test_client_that_never_sends_anything(ingress_server):
    server = ingress_server(config())
    with server.raw() as raw:
        assert raw.reply()[0] == 220
        assert waits_for_cut(raw) >= IDLE * 0.9


def test_client_that_stops_between_commands(ingress_server):
    server = ingress_server(config())
    with server.raw() as raw:
        raw.reply()
        assert raw.cmd("EHLO c")[0] == 250
        assert raw.cmd("MAIL FROM:<a@example.org>")[0] == 250
        assert waits_for_cut(raw) >= IDLE * 0.9
    assert server.all_messages() == []


@pytest.mark.parametrize("enabled,disabled", [(False, ()), (True, ("session_timeout",))])
def test_off_idle_sessions_are_not_cut(ingress_server, enabled, disabled):
    server = ingress_server(config(enabled), disabled=disabled)
    with server.raw() as raw:
        raw.reply()
        assert raw.cmd("EHLO c")[0] == 250
        assert not raw.closed_by_server(3 * IDLE)
        assert raw._buffer == b""  # no 421 arrived either
        assert raw.cmd("NOOP")[0] == 250


def test_an_active_client_is_not_cut(ingress_server):
    """Commands more often than the timeout, for several timeouts in total."""
    server = ingress_server(config())
    with server.raw() as raw:
        raw.reply()
        started = time.monotonic()
        while time.monotonic() - started < 4 * IDLE:
            assert raw.cmd("NOOP")[0] == 250
            time.sleep(IDLE / 4)
        assert raw.cmd("QUIT")[0] == 221


def test_not_idle_while_354_is_outstanding(ingress_server):
    """Waiting for the DATA body is the command timer's business (default 120 s), not idle."""
    server = ingress_server(config())
    with server.raw() as raw:
        raw.reply()
        for line in ("EHLO c", "MAIL FROM:<a@example.org>", "RCPT TO:<alice@example.test>"):
            assert raw.cmd(line)[0] == 250
        assert raw.cmd("DATA")[0] == 354
        time.sleep(3 * IDLE)
        raw.send(b"Subject: slow but fine\r\n\r\nbody\r\n.\r\n")
        assert raw.reply()[0] == 250
    assert len(server.mailbox("alice@example.test")) == 1


def test_not_idle_while_334_is_outstanding(ingress_server):
    server = ingress_server(config())
    with server.raw() as raw:
        raw.reply()
        assert raw.cmd("EHLO c")[0] == 250
        assert raw.cmd("AUTH XPLAIN")[0] == 334
        time.sleep(3 * IDLE)
        assert raw.cmd("AGFsaWNlQGV4YW1wbGUudGVzdABhbGljZXB3")[0] == 235  # \0alice@...\0alicepw


def test_not_idle_with_a_partial_command_line(ingress_server):
    """Something was received since the last reply: the command timer (120 s) applies."""
    server = ingress_server(config())
    with server.raw() as raw:
        raw.reply()
        raw.send(b"NO")
        time.sleep(3 * IDLE)
        assert raw.cmd("OP")[0] == 250


def test_the_timer_restarts_after_each_reply(ingress_server):
    server = ingress_server(config())
    with server.raw() as raw:
        raw.reply()
        time.sleep(IDLE * 0.6)
        assert raw.cmd("NOOP")[0] == 250
        assert waits_for_cut(raw) >= IDLE * 0.9  # measured from the NOOP's reply
