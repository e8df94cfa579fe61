"""The SMTP core against a real server process, with real clients."""

from __future__ import annotations

import asyncio
import email
import re
import smtplib

import aiosmtplib
import pytest

from ingress.syntax import merge_size_keywords
from ingress.testing import SMTPRaw

LOCAL = {
    "directory": {
        "domains": ["example.test"],
        "users": [
            {"address": "alice@example.test", "password": "alicepw", "name": "Alice Example"},
            {"address": "bob@example.test", "password": "bobpw"},
        ],
        "aliases": {"team@example.test": ["alice@example.test", "bob@example.test",
                                          "carol@elsewhere.test"]},
        "lists": {"all@example.test": ["team@example.test"]},
    },
}
ENHANCED = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}( |$)")


@pytest.fixture
def server(ingress_server):
    return ingress_server(LOCAL)


def message(subject="test", body="Hello.\r\n"):
    return f"From: x@example.org\r\nTo: alice@example.test\r\nSubject: {subject}\r\n\r\n{body}"


def test_smtplib_delivers_to_maildir_with_return_path_first(server):
    with server.smtp() as client:
        client.sendmail("sender@example.org", ["alice@example.test"], message("one"))
    [stored] = server.mailbox("alice@example.test")
    assert stored.startswith(b"Return-Path: <sender@example.org>\r\n")
    parsed = email.message_from_bytes(stored)
    assert parsed["Subject"] == "one"
    assert parsed.get_payload() == "Hello.\r\n"
    assert not list(server.maildir.glob("*/*/tmp/*")), "tmp/ must be empty after delivery"


def test_aiosmtplib_delivers(server):
    async def send():
        await aiosmtplib.send(message("async"), sender="s@example.org",
                              recipients=["Bob@EXAMPLE.test"], hostname=server.host,
                              port=server.port)

    asyncio.run(send())
    [stored] = server.mailbox("bob@example.test")
    assert b"Subject: async" in stored


def test_ehlo_advertises_core_extensions(server):
    with server.smtp() as client:
        code, _ = client.ehlo("client.example.org")
        assert code == 250
        for keyword in ("pipelining", "8bitmime", "enhancedstatuscodes", "size"):
            assert client.has_extn(keyword), keyword
        assert not client.has_extn("starttls"), "no certificate configured"


def test_a_plugins_smaller_size_limit_is_the_one_advertised(ingress_server):
    server = ingress_server({**LOCAL, "server": {"plugin_modules": ["size_limit"]},
                             "plugins": {"size_limit": {}}})
    with server.smtp() as client:
        code, text = client.ehlo("client.example.org")
    assert code == 250 and client.esmtp_features["size"] == "1000", text
    assert [line for line in text.decode().splitlines() if line.upper().startswith("SIZE")] \
        == ["SIZE 1000"]


def test_merge_size_keywords():
    assert merge_size_keywords(["X", "SIZE 5000", "Y", "SIZE 1000", "size 3000"]) == \
        ["X", "SIZE 1000", "Y"]
    assert merge_size_keywords(["SIZE 0", "SIZE 700"]) == ["SIZE 700"]  # 0: no fixed limit
    assert merge_size_keywords(["SIZE", "SIZE 0"]) == ["SIZE"]
    assert merge_size_keywords(["SIZEX 1", "SIZE 9"]) == ["SIZEX 1", "SIZE 9"]
    assert merge_size_keywords(["SIZE\t50", " size 60", "SIZE x"]) == ["SIZE 50"]
    assert merge_size_keywords(["SIZE 9"]) == ["SIZE 9"]


def test_replies_after_the_greeting_carry_enhanced_codes(server):
    with server.raw() as raw:
        assert raw.reply()[0] == 220
        commands = ["EHLO c.example.org", "NOOP", "MAIL FROM:<a@example.org>",
                    "RCPT TO:<nobody@example.test>", "RCPT TO:<alice@example.test>",
                    "RSET", "VRFY alice", "EXPN team", "HELP", "FOO", "MAIL FROM:bad address",
                    "DATA", "RCPT TO:<x@y>", "HELO", "QUIT"]
        for command in commands:
            code, text = raw.cmd(command)
            if command.startswith("EHLO"):
                continue
            assert ENHANCED.match(text), (command, code, text)


def test_pipelined_transaction(server):
    with server.raw() as raw:
        raw.reply()
        raw.send(b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<alice@example.test>\r\n"
                 b"RCPT TO:<bob@example.test>\r\nDATA\r\n")
        assert [raw.reply()[0] for _ in range(5)] == [250, 250, 250, 250, 354]
        raw.send(b"Subject: piped\r\n\r\nbody\r\n.\r\nMAIL FROM:<b@example.org>\r\nQUIT\r\n")
        assert raw.reply()[0] == 250
        assert raw.reply()[0] == 250
        assert raw.reply()[0] == 221
    assert len(server.mailbox("alice@example.test")) == 1
    assert len(server.mailbox("bob@example.test")) == 1


def test_dot_stuffing_is_undone(server):
    with server.raw() as raw:
        raw.reply()
        for line in ("EHLO c", "MAIL FROM:<a@example.org>", "RCPT TO:<alice@example.test>"):
            raw.cmd(line)
        assert raw.cmd("DATA")[0] == 354
        raw.send(b"Subject: dots\r\n\r\n..leading dot\r\n...\r\n.\r\n")
        assert raw.reply()[0] == 250
    [stored] = server.mailbox("alice@example.test")
    assert stored.endswith(b"\r\n\r\n.leading dot\r\n..\r\n")


@pytest.mark.parametrize("smuggle", [b"\n.\n", b"\r\n.\n", b"\n.\r\n", b"\r.\r\n", b"\r\n.\r"])
def test_only_crlf_dot_crlf_ends_data(server, smuggle):
    """No SMTP smuggling: a bare LF or CR never ends DATA; it stays data, stored as CRLF."""
    with server.raw() as raw:
        raw.reply()
        for line in ("EHLO c", "MAIL FROM:<a@example.org>", "RCPT TO:<alice@example.test>"):
            raw.cmd(line)
        assert raw.cmd("DATA")[0] == 354
        raw.send(b"Subject: smuggle\r\n\r\nbefore" + smuggle +
                 b"MAIL FROM:<evil@example.org>\r\nafter\r\n.\r\n")
        code, text = raw.reply()
        assert code == 250, text
        assert raw.cmd("QUIT")[0] == 221
    [stored] = server.mailbox("alice@example.test")
    assert b"MAIL FROM:<evil@example.org>\r\nafter\r\n" in stored
    assert b"\r\n" + b"\n" not in stored.replace(b"\r\n", b"")  # no bare LF left
    body = stored.split(b"\r\n\r\n", 1)[1]
    assert body.count(b"\r") == body.count(b"\n")


def test_aliases_and_lists_deliver_to_every_member(server):
    with server.smtp() as client:
        client.sendmail("s@example.org", ["all@example.test"], message("to the list"))
    assert len(server.mailbox("alice@example.test")) == 1
    assert len(server.mailbox("bob@example.test")) == 1
    [(envelope, stored)] = server.queue_entries()
    assert [r["address"] for r in envelope["recipients"]] == ["carol@elsewhere.test"]
    assert b"Subject: to the list" in stored


def test_unknown_local_mailbox_is_refused(server):
    with server.smtp() as client:
        client.ehlo()
        client.mail("s@example.org")
        assert client.rcpt("nobody@example.test")[:1] == (550,)
        assert client.rcpt("nobody@example.test")[1].startswith(b"5.1.1")


def test_queue_envelope_has_the_whole_transaction(ingress_server):
    server = ingress_server({"directory": {"domains": ["example.test"]},
                             "plugins": {"relay": {"whitelist": ["127.0.0.1"]}}})
    with server.smtp() as client:
        client.ehlo("client.example.org")
        client.sendmail("s@example.org", ["r1@remote.test", "r2@remote.test"],
                        message("relayed"), mail_options=["BODY=8BITMIME"])
    [(envelope, stored)] = server.queue_entries()
    assert envelope["mail_from"] == "s@example.org"
    assert envelope["mail_params"] == {"BODY": "8BITMIME", "SIZE": str(len(message("relayed")))}
    assert [r["address"] for r in envelope["recipients"]] == ["r1@remote.test", "r2@remote.test"]
    assert envelope["client_ip"] == "127.0.0.1"
    assert envelope["helo"] == "client.example.org"
    assert envelope["auth_user"] is None
    assert envelope["received_at"] and envelope["queued_at"]
    assert stored.startswith(b"Received: ")  # no Return-Path on relayed mail
    assert not list(server.queue.glob("tmp/*"))


def test_storage_error_answers_451_and_keeps_nothing(server):
    (server.maildir / "example.test").mkdir(parents=True)
    (server.maildir / "example.test" / "alice").write_text("a file where a mailbox should be")
    with server.smtp() as client:
        client.ehlo()
        client.mail("s@example.org")
        client.rcpt("bob@example.test")
        client.rcpt("alice@example.test")
        code, text = client.data(message("fails"))
        assert (code, text[:5]) == (451, b"4.3.0")
        assert client.noop()[0] == 250, "the session stays usable"
    assert server.all_messages() == []
    assert not list(server.maildir.glob("*/*/tmp/*"))


@pytest.mark.parametrize("garbage", [
    b"\x00\x01\x02\xff\xfe garbage\r\n",
    b"HELO \x00\x00\r\n",
    b"\xc3\xa9\xc3\xa9\r\n",
    b"\r\n",
    b"MAIL\r\n",
    b"RCPT TO:<a@b>\r\n",
    b"DATA\r\n",
    b"AUTH PLAIN\r\n",
    b"STARTTLS\r\n",
    b"MAIL FROM:<a@b> SIZE=abc\r\n",
    b"EHLO\r\n",
])
def test_bad_input_gets_a_proper_code_and_the_server_stays_up(server, garbage):
    with server.raw() as raw:
        raw.reply()
        raw.send(garbage)
        code, text = raw.reply()
        assert 500 <= code < 600 and ENHANCED.match(text), (code, text)
        assert raw.cmd("NOOP")[0] == 250
    with server.smtp() as client:
        client.sendmail("s@example.org", ["alice@example.test"], message())


def test_ten_kilobyte_command_line(server):
    with server.raw() as raw:
        raw.reply()
        assert raw.cmd(b"MAIL FROM:<" + b"a" * 10_000 + b"@example.org>") == (
            500, "5.5.2 Line too long")
        assert raw.cmd(b"X" * 200_000 + b"\r\n" + b"NOOP")[0] == 500
        assert raw.reply()[0] == 250  # the NOOP after it was read as its own command
        assert raw.cmd("EHLO ok")[0] == 250


def test_commands_out_of_sequence(server):
    with server.raw() as raw:
        raw.reply()
        assert raw.cmd("MAIL FROM:<a@example.org>")[0] == 503  # before EHLO
        raw.cmd("EHLO c")
        assert raw.cmd("RCPT TO:<alice@example.test>")[0] == 503
        assert raw.cmd("DATA")[0] == 503
        raw.cmd("MAIL FROM:<a@example.org>")
        assert raw.cmd("MAIL FROM:<a@example.org>")[0] == 503
        assert raw.cmd("DATA")[0] == 503  # no recipient yet
        assert raw.cmd("RCPT TO:<alice@example.test>")[0] == 250


def test_mail_and_rcpt_syntax(server):
    with server.raw() as raw:
        raw.reply()
        raw.cmd("EHLO c")
        assert raw.cmd("MAIL FROM:<not an address>")[:2] == (501, "5.1.7 Bad sender address syntax")
        assert raw.cmd("MAIL FROM:<a@example.org> FOO=bar")[0] == 555
        assert raw.cmd("MAIL FROM:<a@example.org> SIZE=1 SIZE=2")[0] == 501
        assert raw.cmd("MAIL FROM:<>")[0] == 250  # the null sender
        assert raw.cmd("RCPT TO:<>")[0] == 501
        assert raw.cmd("RCPT TO:<@route.example:alice@example.test>")[0] == 250
        assert raw.cmd("RCPT TO:<ALICE@Example.Test>")[0] == 250


def test_client_that_vanishes_mid_data_leaves_nothing(server):
    raw = SMTPRaw(server.host, server.port)
    raw.reply()
    for line in ("EHLO c", "MAIL FROM:<a@example.org>", "RCPT TO:<alice@example.test>", "DATA"):
        raw.cmd(line)
    raw.send(b"Subject: partial\r\n\r\nno final dot")
    raw.close()
    with server.smtp() as client:  # still serving, and nothing was stored
        assert client.noop()[0] == 250
    assert server.all_messages() == []


def test_swaks(server):
    import subprocess

    from conftest import need

    swaks = need("swaks")
    result = subprocess.run(
        [swaks, "--server", f"{server.host}:{server.port}", "--to", "alice@example.test",
         "--from", "s@example.org", "--header", "Subject: via swaks", "--body", "hi"],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    [stored] = server.mailbox("alice@example.test")
    assert b"Subject: via swaks" in stored


def test_smtp_source(server):
    import subprocess

    from conftest import need

    source = need("smtp-source")
    result = subprocess.run(
        [source, "-c", "-m", "20", "-s", "4", "-l", "2048", "-f", "s@example.org",
         "-t", "bob@example.test", f"{server.host}:{server.port}"],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(server.mailbox("bob@example.test")) == 20


def test_sigterm_exits_zero(server):
    with server.smtp() as client:
        client.noop()
    assert server.stop() == 0
    assert "listening on" not in server.log()  # the ready line goes to stdout
    with pytest.raises(OSError):
        smtplib.SMTP(server.host, server.port, timeout=2)
