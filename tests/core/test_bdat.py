"""CHUNKING and BINARYMIME (RFC 3030): BDAT over real sockets, byte by byte.

smtplib and aiosmtplib have no BDAT, so the chunks are written with a raw socket; a real Postfix
as the sending client is in test_bdat_postfix.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import smtplib
import socket
import time
import urllib.request

import aiosmtplib
import pytest

from ingress import Reply, hookimpl
from ingress.testing import SMTPRaw

USERS = {"domains": ["example.test"],
         "users": [{"address": "alice@example.test", "password": "alicepw"},
                   {"address": "bob@example.test", "password": "bobpw"}]}
# Bare LF and CR, a lone dot line, a dot-stuffed-looking line, NUL and 8-bit octets: BDAT
# stores all of it as sent (DATA would have changed every one of these).
MESSAGE = (b"From: a@example.org\r\nSubject: chunked\r\nX-Raw: bare\nLF and bare\rCR\r\n\r\n"
           b"line one\r\n.\r\n..two dots\r\n\x00\xff\xfe binary\r\n.")
HEADER = re.compile(rb"([A-Za-z-]+:.*|[ \t].*)")


@pytest.fixture
def server(ingress_server):
    return ingress_server({"directory": USERS})


def content(stored: bytes, sent: bytes) -> bytes:
    """*stored* must be *sent* with only header fields prepended (Return-Path, Received)."""
    assert stored.endswith(sent), stored[-200:]
    prefix = stored[:len(stored) - len(sent)]
    assert prefix.startswith(b"Return-Path: <"), prefix
    assert prefix.endswith(b"\r\n")
    assert all(HEADER.fullmatch(line) for line in prefix[:-2].split(b"\r\n")), prefix
    return stored[len(prefix):]


def envelope(raw: SMTPRaw, rcpt: str = "alice@example.test", mail: str = "") -> None:
    assert raw.reply()[0] == 220
    code, text = raw.cmd("EHLO client.test")
    assert code == 250 and "CHUNKING" in text.split("\n"), text
    assert raw.cmd(f"MAIL FROM:<a@example.org>{mail}")[0] == 250
    assert raw.cmd(f"RCPT TO:<{rcpt}>")[0] == 250


def bdat(raw: SMTPRaw, data: bytes, last: bool = False) -> tuple[int, str]:
    raw.send(b"BDAT %d%s\r\n" % (len(data), b" LAST" if last else b"") + data)
    return raw.reply()


def send_chunks(raw: SMTPRaw, chunks: list[bytes]) -> tuple[int, str]:
    """Every chunk but the last gets ``250 2.0.0 <n> octets received``; returns the reply to
    the last."""
    for chunk in chunks[:-1]:
        assert bdat(raw, chunk) == (250, f"2.0.0 {len(chunk)} octets received")
    return bdat(raw, chunks[-1], last=True)


def queued(reply: tuple[int, str]) -> bool:
    return reply[0] == 250 and re.fullmatch(r"2\.0\.0 OK: queued as \w+", reply[1]) is not None


def test_ehlo_offers_chunking_and_binarymime_to_smtplib_and_aiosmtplib(server):
    with server.smtp() as client:
        client.ehlo("client.test")
        assert client.has_extn("chunking") and client.has_extn("binarymime")

    async def extensions():
        async with aiosmtplib.SMTP(hostname=server.host, port=server.port) as client:
            await client.ehlo()
            return client.esmtp_extensions

    found = asyncio.run(extensions())
    assert "chunking" in found and "binarymime" in found


@pytest.mark.parametrize("split", [
    "inside-crlf-dot-crlf", "inside-a-header", "one-octet-chunks", "whole"])
def test_the_message_is_stored_octet_for_octet_however_it_is_chunked(server, split):
    cut = {"inside-crlf-dot-crlf": [MESSAGE.index(b"\r\n.\r\n") + 1,
                                    MESSAGE.index(b"\r\n.\r\n") + 3],
           "inside-a-header": [5, MESSAGE.index(b"chunked") + 3],
           "one-octet-chunks": list(range(1, len(MESSAGE))),
           "whole": []}[split]
    bounds = [0, *cut, len(MESSAGE)]
    chunks = [MESSAGE[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    with server.raw() as raw:
        envelope(raw)
        assert queued(send_chunks(raw, chunks))
        assert raw.cmd("QUIT")[0] == 221
    [stored] = server.mailbox("alice@example.test")
    assert content(stored, MESSAGE) == MESSAGE


def test_bdat_0_last_ends_the_message_and_alone_makes_an_empty_one(server):
    with server.raw() as raw:
        envelope(raw)
        assert bdat(raw, b"Subject: zero\r\n\r\nbody\r\n") == (250, "2.0.0 23 octets received")
        assert queued(bdat(raw, b"", last=True))
        assert raw.cmd("MAIL FROM:<a@example.org>")[0] == 250
        assert raw.cmd("RCPT TO:<bob@example.test>")[0] == 250
        assert queued(bdat(raw, b"", last=True))
        assert raw.cmd("QUIT")[0] == 221
    [stored] = server.mailbox("alice@example.test")
    assert content(stored, b"Subject: zero\r\n\r\nbody\r\n")
    [empty] = server.mailbox("bob@example.test")
    assert empty.startswith(b"Return-Path: <a@example.org>\r\n")


def test_pipelined_chunks_in_one_write(server):
    """The whole transaction, three chunks and QUIT in one write: one reply each, in order."""
    parts = [b"Subject: piped\r\n", b"\r\nBDAT 99 LAST looks like a command\r\n", b"end\r\n"]
    with server.raw() as raw:
        assert raw.reply()[0] == 220
        raw.send(b"EHLO client.test\r\nMAIL FROM:<a@example.org> BODY=BINARYMIME\r\n"
                 b"RCPT TO:<alice@example.test>\r\n"
                 + b"".join(b"BDAT %d%s\r\n%s" % (len(p), b" LAST" if i == 2 else b"", p)
                            for i, p in enumerate(parts))
                 + b"QUIT\r\n")
        replies = [raw.reply() for _ in range(7)]
        assert [code for code, _ in replies] == [250, 250, 250, 250, 250, 250, 221]
        assert replies[3][1] == f"2.0.0 {len(parts[0])} octets received"
        assert replies[4][1] == f"2.0.0 {len(parts[1])} octets received"
        assert queued(replies[5])
    [stored] = server.mailbox("alice@example.test")
    assert content(stored, b"".join(parts))


def test_a_chunk_of_10_mb(server):
    body = bytes(range(256)) * (10 * 1024 * 1024 // 256)
    message = b"Subject: big\r\n\r\n" + body
    with server.raw() as raw:
        envelope(raw)
        raw.sock.settimeout(60)
        assert queued(bdat(raw, message, last=True))
        assert raw.cmd("QUIT")[0] == 221
    [stored] = server.mailbox("alice@example.test")
    assert content(stored, message) == message


@pytest.mark.parametrize("arg", ["abc", "", "-5", "5x", "5 LAST x", "5 NOTLAST", "+5", "0x10",
                                 "\u0665"])
def test_a_bad_size_gets_501_and_nothing_is_read(server, arg):
    with server.raw() as raw:
        envelope(raw)
        # Were anything read after the command, the NOOP would be swallowed.
        raw.send(f"BDAT {arg}\r\nNOOP\r\n".encode())
        assert raw.reply() == (501, "5.5.4 Syntax: BDAT <size> [LAST]")
        assert raw.reply() == (250, "2.0.0 OK")
        assert queued(bdat(raw, b"Subject: after\r\n\r\nok\r\n", last=True))
    assert len(server.mailbox("alice@example.test")) == 1


@pytest.mark.parametrize("before", ["nothing", "mail"])
def test_bdat_out_of_order_reads_its_octets_before_503(server, before):
    """Octets that look like commands must not run: they belong to the refused chunk."""
    octets = b"NOOP\r\nRSET\r\n"
    with server.raw() as raw:
        assert raw.reply()[0] == 220
        assert raw.cmd("EHLO client.test")[0] == 250
        if before == "mail":
            assert raw.cmd("MAIL FROM:<a@example.org>")[0] == 250
            assert raw.cmd("RCPT TO:<nobody@example.test>")[0] == 550
        raw.send(b"BDAT %d\r\n" % len(octets) + octets + b"HELP\r\n")
        expected = "Need RCPT command first" if before == "mail" else "Need MAIL command first"
        assert raw.reply() == (503, f"5.5.1 {expected}")
        assert raw.reply()[0] == 214  # the HELP after the octets, not a NOOP
        assert raw.cmd("QUIT")[0] == 221


def test_data_after_bdat_and_data_after_binarymime_get_503(server):
    with server.raw() as raw:
        envelope(raw)
        assert bdat(raw, b"Subject: x\r\n")[0] == 250
        assert raw.cmd("DATA") == (503, "5.5.1 DATA not allowed after BDAT")
        assert queued(bdat(raw, b"\r\nbody\r\n", last=True))
    with server.smtp() as client:
        client.ehlo("client.test")
        assert client.mail("a@example.org", ["BODY=BINARYMIME"])[0] == 250
        assert client.rcpt("bob@example.test")[0] == 250
        assert client.docmd("DATA") == (503, b"5.5.1 BODY=BINARYMIME requires BDAT")
        assert client.rset()[0] == 250
        client.sendmail("a@example.org", ["bob@example.test"], b"Subject: 8bit\r\n\r\nok\r\n",
                        mail_options=["BODY=8BITMIME"])
    assert [b"Subject: x\r\n\r\nbody\r\n" in m for m in server.mailbox("alice@example.test")] \
        == [True]
    assert len(server.mailbox("bob@example.test")) == 1


def test_rset_discards_the_chunks(server):
    with server.raw() as raw:
        envelope(raw)
        assert bdat(raw, b"Subject: dropped\r\n" + b"x" * (2 << 20))[0] == 250
        spool = server.queue / "spool"
        assert len(list(spool.glob("*"))) == 1  # over 1 MiB: on disk
        assert raw.cmd("RSET")[0] == 250
        assert not any(spool.glob("*"))  # thrown away at once
        assert raw.cmd("MAIL FROM:<b@example.org>")[0] == 250
        assert raw.cmd("RCPT TO:<alice@example.test>")[0] == 250
        assert queued(bdat(raw, b"Subject: kept\r\n\r\nbody\r\n", last=True))
    [stored] = server.mailbox("alice@example.test")
    assert content(stored, b"Subject: kept\r\n\r\nbody\r\n")
    assert b"dropped" not in stored


def test_the_size_limit_counts_every_chunk_and_answers_on_the_last(ingress_server):
    server = ingress_server({"directory": USERS, "plugins": {
        "max_message_size": {"kb": 1, "base64_allowance": False}}})
    with server.raw() as raw:
        envelope(raw)
        assert bdat(raw, b"Subject: big\r\n\r\n" + b"x" * 600) == (250, "2.0.0 616 octets received")
        assert bdat(raw, b"y" * 600) == (250, "2.0.0 600 octets received")  # over: not kept
        assert bdat(raw, b"z" * 10, last=True) == (552, "5.3.4 Message size exceeds fixed limit")
        # the session goes on, in step
        assert raw.cmd("MAIL FROM:<a@example.org>")[0] == 250
        assert raw.cmd("RCPT TO:<alice@example.test>")[0] == 250
        assert queued(bdat(raw, b"Subject: small\r\n\r\n" + b"x" * 900, last=True))
    [stored] = server.mailbox("alice@example.test")
    assert b"Subject: small" in stored


def test_a_chunk_that_owes_octets_gets_the_command_timeout(ingress_server):
    server = ingress_server({"directory": USERS, "plugins": {
        "command_timeout": {"seconds": 1}, "session_timeout": {"enabled": False}}})
    with server.raw() as raw:
        envelope(raw)
        raw.send(b"BDAT 100 LAST\r\nSubject: short\r\n\r\nonly part of it\r\n")
        raw.sock.settimeout(15)
        assert raw.reply() == (421, "4.4.2 mx.test Command timeout")
        assert raw.closed_by_server(15)
    server.stop()
    assert server.all_messages() == [] and server.queue_entries() == []


def test_the_minimum_data_rate_applies_to_each_chunk(ingress_server):
    """A chunk trickled at a few octets/s against a minimum of 1,000 octets/s after a grace of
    1 s: cut, though it never pauses as long as the command timeout."""
    server = ingress_server({"directory": USERS, "plugins": {
        "command_timeout": {"seconds": 1, "min_data_rate": 1000},
        "session_timeout": {"enabled": False}}})
    with server.raw() as raw:
        envelope(raw)
        assert bdat(raw, b"Subject: fast first chunk\r\n")[0] == 250
        raw.send(b"BDAT 60 LAST\r\n")
        raw.sock.settimeout(0.25)
        reply = b""
        for _ in range(60):
            try:
                raw.send(b"x")
                reply = raw.sock.recv(1000)
            except TimeoutError:
                continue
            except OSError:
                break
            break
        assert reply.startswith(b"421 4.4.2 mx.test Command timeout"), reply
    server.stop()
    assert "command timeout (data rate)" in server.log()
    assert server.all_messages() == []


@pytest.mark.parametrize("enabled", [True, False])
def test_bdat_last_then_close_is_handled_like_data_then_close(ingress_server, enabled):
    server = ingress_server({"directory": USERS, "plugins": {
        "disconnect_delivery": {"enabled": enabled}}})
    message = b"Subject: gone\r\n\r\nsent and closed\r\n"
    sock = socket.create_connection((server.host, server.port), timeout=10)
    sock.sendall(b"EHLO legacy.example\r\nMAIL FROM:<a@example.org>\r\n"
                 b"RCPT TO:<alice@example.test>\r\nBDAT %d LAST\r\n%sQUIT\r\n"
                 % (len(message), message))
    sock.shutdown(socket.SHUT_WR)
    sock.close()
    pattern = r"accepted \w+ client" if enabled else r"client gone before storing: discarded"
    deadline = time.monotonic() + 10
    while not re.search(pattern, server.log()):
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.05)
    assert server.stop() == 0
    assert len(server.mailbox("alice@example.test")) == (1 if enabled else 0)


class Observer:
    """Records what every on_data plugin sees, and the verbs; refuses BDAT when told."""

    def __init__(self):
        self.messages: list[bytes] = []
        self.verbs: list[str] = []
        self.refuse = False

    @hookimpl
    def on_command(self, verb):
        self.verbs.append(verb)
        if verb == "BDAT" and self.refuse:
            return Reply(550, "5.7.1", "no chunks today")
        return None

    @hookimpl
    def on_data(self, message):
        self.messages.append(b"".join(message.chunks()))


def test_every_on_data_plugin_sees_the_chunked_message(ingress_inprocess_server):
    observer = Observer()
    server = ingress_inprocess_server({"directory": USERS, "plugins": {"observer": {}}},
                                      plugins={"observer": observer})
    with server.raw() as raw:
        envelope(raw)
        assert queued(send_chunks(raw, [b"Subject: seen\r\n", b"\r\nbody\r\n"]))
        assert raw.cmd("QUIT")[0] == 221
    assert observer.messages == [b"Subject: seen\r\n\r\nbody\r\n"]
    assert observer.verbs.count("BDAT") == 2
    [stored] = server.mailbox("alice@example.test")
    assert content(stored, b"Subject: seen\r\n\r\nbody\r\n")


def test_dsn_and_metrics_after_bdat_as_after_data(ingress_server):
    server = ingress_server({"directory": USERS, "server": {"metrics_listen": "127.0.0.1:0"}})
    message = b"Subject: reported\r\n\r\nbody\r\n"
    with server.raw() as raw:
        assert raw.reply()[0] == 220
        assert raw.cmd("EHLO client.test")[0] == 250
        assert raw.cmd("MAIL FROM:<alice@example.test> RET=HDRS")[0] == 250
        assert raw.cmd("RCPT TO:<bob@example.test> NOTIFY=SUCCESS")[0] == 250
        assert queued(send_chunks(raw, [message[:5], message[5:]]))
        assert raw.cmd("QUIT")[0] == 221
    [stored] = server.mailbox("bob@example.test")
    assert content(stored, message)
    [report] = server.mailbox("alice@example.test")  # the success DSN
    assert report.startswith(b"Return-Path: <>\r\n")
    assert b"Action: delivered" in report and b"Subject: reported" in report
    with urllib.request.urlopen(server.metrics_url, timeout=10) as response:
        text = response.read().decode()
    assert re.search(r"^ingress_messages_accepted_total 1(\.0)?$", text, re.M), text
    assert re.search(rf"^ingress_bytes_accepted_total {len(message)}(\.0)?$", text, re.M)


def test_a_plugin_refusing_bdat_still_reads_its_octets(ingress_inprocess_server):
    observer = Observer()
    observer.refuse = True
    server = ingress_inprocess_server({"directory": USERS, "plugins": {"observer": {}}},
                                      plugins={"observer": observer})
    with server.raw() as raw:
        envelope(raw)
        raw.send(b"BDAT 6 LAST\r\nHELP\r\nNOOP\r\n")
        assert raw.reply() == (550, "5.7.1 no chunks today")
        assert raw.reply() == (250, "2.0.0 OK")  # the NOOP; the HELP was the chunk
        assert raw.cmd("QUIT")[0] == 221
    assert server.all_messages() == []


def test_smtplib_binarymime_is_a_known_body_value(server):
    with server.smtp() as client:
        client.ehlo("client.test")
        assert client.mail("a@example.org", ["BODY=BINARYMIME"])[0] == 250
        client.rset()
        code, text = client.mail("a@example.org", ["BODY=BINARY"])
        assert (code, text) == (501, b"5.5.4 BODY must be 7BIT, 8BITMIME or BINARYMIME")
    with pytest.raises(smtplib.SMTPSenderRefused):
        with server.smtp() as client:
            client.sendmail("a@example.org", ["alice@example.test"], b"x",
                            mail_options=["BODY=OTHER"])


def vm_hwm(pid: int) -> int:
    """Peak resident memory of process *pid*, in bytes."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise KeyError("VmHWM")


@pytest.mark.heavy
@pytest.mark.parametrize("chunk", [1 << 20, 200 << 20], ids=["1MB-chunks", "one-chunk"])
def test_200_mb_in_bdat_chunks_keeps_the_server_under_64_mb(ingress_server, chunk):
    server = ingress_server({"directory": USERS})
    total = 200 << 20
    block = bytes(range(256)) * 4096  # 1 MiB, every octet value
    digest = hashlib.sha256()
    with server.raw() as raw:
        envelope(raw)
        raw.sock.settimeout(120)
        sent = 0
        while sent < total:
            size = min(chunk, total - sent)
            last = sent + size == total
            raw.send(b"BDAT %d%s\r\n" % (size, b" LAST" if last else b""))
            for offset in range(0, size, len(block)):
                piece = block[: min(len(block), size - offset)]
                piece = bytes([sent // len(block) % 256]) + piece[1:]  # blocks differ
                raw.send(piece)
                digest.update(piece)
                sent += len(piece)
            reply = raw.reply()
            assert queued(reply) if last else reply[0] == 250, reply
        assert raw.cmd("QUIT")[0] == 221
    peak = vm_hwm(server.pid)
    [path] = server.all_messages()
    stored = hashlib.sha256()
    with open(path, "rb") as f:
        head = f.read(4096)
        start = head.index(b"\r\n\x00\x01\x02\x03") + 2  # after the prepended header fields
        f.seek(start)
        while data := f.read(1 << 20):
            stored.update(data)
    assert stored.hexdigest() == digest.hexdigest()
    print(f"peak RSS with {chunk} octet chunks: {peak / (1 << 20):.1f} MiB")
    assert peak < 64 << 20, peak
