"""max_bad_commands: replies 500, 501, 503, 504 and 535 count, policy refusals do not; the
limit-th bad command gets its own reply, then 421 4.7.0 Too many errors, then the close."""

from __future__ import annotations

import base64

import pytest

USERS = {"domains": ["example.test"],
         "users": [{"address": "alice@example.test", "password": "alicepw"}]}
CUT = (421, "4.7.0 Too many errors")
WRONG_PASSWORD = base64.b64encode(b"\0alice@example.test\0wrong").decode()


def config(limit: int, **server) -> dict:
    return {"directory": USERS,
            "server": {"plugin_modules": ["fake_auth", "reply_with"], **server},
            "plugins": {"max_bad_commands": {"limit": limit}, "fake_auth": {},
                        "reply_with": {}}}


def session(server):
    raw = server.raw()
    assert raw.reply()[0] == 220
    assert raw.cmd("EHLO c")[0] == 250
    return raw


# Each of these is one bad command: (command, its own reply code).
COUNTED = {
    "unknown verb": ("XYZZY", 500),
    "line too long": ("NOOP " + "x" * 600, 500),
    "syntax": ("HELO", 501),
    "bad sequence": ("RCPT TO:<alice@example.test>", 503),
    "unknown AUTH mechanism": ("AUTH NOPE", 504),
    "failed AUTH": (f"AUTH XPLAIN {WRONG_PASSWORD}", 535),
}


@pytest.mark.parametrize("what", COUNTED)
@pytest.mark.parametrize("disabled", [(), ("max_bad_commands",)])
def test_each_counted_reply_counts(ingress_server, what, disabled):
    command, code = COUNTED[what]
    server = ingress_server(config(1), disabled=disabled)
    with session(server) as raw:
        assert raw.cmd(command)[0] == code  # its own error reply first
        if disabled:
            assert raw.cmd("NOOP")[0] == 250
        else:
            assert raw.reply() == CUT
            assert raw.closed_by_server()


NOT_COUNTED = [
    "TURN",  # 502 not implemented
    "EXPN team@example.test",  # 502 EXPN not available
    "XREPLY 502 5.5.1 Not here",
    "XREPLY 530 5.7.0 Authentication required",
    "XREPLY 538 5.7.11 Encryption required for requested authentication mechanism",
    "XREPLY 550 5.7.1 Relaying denied",
    "XREPLY 551 5.1.6 User not local",
    "XREPLY 552 5.3.4 Message size exceeds fixed limit",
    "XREPLY 553 5.7.1 Sender address not owned by authenticated user",
    "XREPLY 554 5.4.6 Too many hops",
    "XREPLY 555 5.5.4 Unsupported parameter",
    "XREPLY 451 4.3.0 Temporary local problem",
    "XREPLY 452 4.5.3 Too many recipients",
]


def test_policy_refusals_do_not_count(ingress_server):
    server = ingress_server(config(1))
    with session(server) as raw:
        for command in NOT_COUNTED:
            assert raw.cmd(command)[0] >= 400, command
        assert raw.cmd("MAIL FROM:<a@example.org> FOO=bar")[0] == 555
        assert raw.cmd("MAIL FROM:<a@example.org>")[0] == 250
        assert raw.cmd("RCPT TO:<nobody@example.test>")[0] == 550
        assert raw.cmd("NOOP")[0] == 250


@pytest.mark.parametrize("disabled", [(), ("max_bad_commands",)])
def test_rset_does_not_reset_the_count(ingress_server, disabled):
    server = ingress_server(config(3), disabled=disabled)
    with session(server) as raw:
        for _ in range(2):
            assert raw.cmd("FOO")[0] == 500
            assert raw.cmd("RSET")[0] == 250
        assert raw.cmd("HELO")[0] == 501
        if disabled:
            assert raw.cmd("NOOP")[0] == 250
        else:
            assert raw.reply() == CUT
            assert raw.closed_by_server()


@pytest.mark.parametrize("disabled", [(), ("max_bad_commands",)])
def test_more_than_aiosmtpds_five_unknown_verbs(ingress_server, disabled):
    """aiosmtpd closes after 5 unknown verbs (BOGUS_LIMIT); our command loop does not: the
    default limit of 8 decides, and without the plugin nothing does."""
    server = ingress_server({"directory": USERS}, disabled=disabled)
    with session(server) as raw:
        for i in range(7):
            assert raw.cmd(f"BOGUS{i}")[0] == 500
        assert raw.cmd("NOOP")[0] == 250
        assert raw.cmd("BOGUS8")[0] == 500  # the 8th
        if disabled:
            for i in range(20):
                assert raw.cmd(f"MORE{i}")[0] == 500
            assert raw.cmd("NOOP")[0] == 250
        else:
            assert raw.reply() == CUT
            assert raw.closed_by_server()


def test_pipelined_bad_commands_stop_at_the_limit(ingress_server):
    server = ingress_server(config(3))
    with session(server) as raw:
        raw.send(b"FOO\r\nBAR\r\nBAZ\r\nQUX\r\nNOOP\r\n")
        assert [raw.reply()[0] for _ in range(3)] == [500, 500, 500]
        assert raw.reply() == CUT
        assert raw.closed_by_server()
        assert raw._buffer == b"", "nothing after the 421 was answered"


def test_zero_is_unlimited(ingress_server):
    server = ingress_server(config(0))
    with session(server) as raw:
        for i in range(30):
            assert raw.cmd(f"BOGUS{i}")[0] == 500
        assert raw.cmd("NOOP")[0] == 250


@pytest.mark.parametrize("disabled", [(), ("max_bad_commands",)])
def test_the_count_survives_starttls(ingress_server, tls_certs, disabled):
    server = ingress_server(config(3, **tls_certs.server), disabled=disabled)
    with session(server) as raw:
        assert raw.cmd("FOO")[0] == 500
        assert raw.cmd("BAR")[0] == 500
        assert raw.starttls(tls_certs.client, "mx.test")[0] == 220
        assert raw.cmd("EHLO c")[0] == 250
        assert raw.cmd("BAZ")[0] == 500
        if disabled:
            assert raw.cmd("NOOP")[0] == 250
        else:
            assert raw.reply() == CUT
            assert raw.closed_by_server()
