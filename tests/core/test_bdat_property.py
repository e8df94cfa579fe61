"""BDAT as a property: however a message is split into chunks (empty ones included), and however
the chunks and their commands are split into TCP writes, the server stores the same bytes: the
message octet for octet, after the header fields it prepends."""

from __future__ import annotations

import re
import socket
import time

import pytest
from conftest import examples
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingress.testing import SMTPRaw, server_config, start_subprocess

# The octets DATA would treat specially, and some that are just octets.
TOKENS = [b"a", b"Subject: x", b":", b".", b"..", b"\r", b"\n", b"\r\n", b"\r\n.\r\n", b"\r\n.",
          b" ", b"\x00", b"\xff", b"BDAT 3 LAST\r\n", b"QUIT\r\n", b"\r\n\r\n"]
HEADER = re.compile(rb"([A-Za-z-]+:.*|[ \t].*)")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bdatprop")
    config = server_config(tmp, {"directory": {"domains": ["example.test"], "domain_settings": {
        "example.test": {"catch_all": True}}}})
    running = start_subprocess(config, tmp)
    yield running
    running.stop()
    assert "Traceback" not in running.log()


@settings(max_examples=examples(60), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tokens=st.lists(st.sampled_from(TOKENS), max_size=40),
       cuts=st.lists(st.integers(min_value=0, max_value=40), max_size=8),
       pipelined=st.booleans(),
       writes=st.lists(st.integers(min_value=1, max_value=9), max_size=10))
def test_any_split_into_chunks_stores_the_same_bytes(server, tokens, cuts, pipelined, writes):
    message = b"".join(tokens)
    bounds = [0, *sorted(min(c, len(message)) for c in cuts), len(message)]
    chunks = [message[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    commands = [b"BDAT %d%s\r\n%s" % (len(c), b" LAST" if i == len(chunks) - 1 else b"", c)
                for i, c in enumerate(chunks)]
    mailbox = f"p{time.monotonic_ns()}@example.test"
    with SMTPRaw(server.host, server.port) as raw:
        raw.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        raw.reply()
        for line in ("EHLO c", "MAIL FROM:<a@example.org> BODY=BINARYMIME",
                     f"RCPT TO:<{mailbox}>"):
            assert raw.cmd(line)[0] == 250
        if pipelined:  # every chunk at once, the writes cut wherever hypothesis likes
            wire, pos = b"".join(commands), 0
            for size in writes:
                raw.send(wire[pos:pos + size])
                pos += size
                time.sleep(0.001)
            raw.send(wire[pos:])
            replies = [raw.reply() for _ in chunks]
        else:
            replies = []
            for command in commands:
                raw.send(command)
                replies.append(raw.reply())
        for chunk, (code, text) in zip(chunks[:-1], replies, strict=False):
            assert (code, text) == (250, f"2.0.0 {len(chunk)} octets received")
        assert replies[-1][0] == 250 and "queued as" in replies[-1][1], replies[-1]
        assert raw.cmd("QUIT")[0] == 221
    [stored] = server.mailbox(mailbox)
    assert stored.endswith(message)
    prefix = stored[:len(stored) - len(message)]
    assert prefix.startswith(b"Return-Path: <a@example.org>\r\n") and prefix.endswith(b"\r\n")
    assert all(HEADER.fullmatch(line) for line in prefix[:-2].split(b"\r\n")), prefix
