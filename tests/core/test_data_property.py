"""DATA framing as a property: whatever the bytes and however TCP splits them, the server stores
exactly what RFC 5321 says (dot-unstuffed, bare CR/LF as CRLF) and ends only at CRLF.CRLF."""

from __future__ import annotations

import re
import socket
import time

import pytest
from conftest import examples
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from ingress.testing import SMTPRaw, server_config, start_subprocess

TOKENS = [b"a", b"b", b".", b"..", b"\r", b"\n", b"\r\n", b"\r\n.", b" ", b"\x00", b"\xff"]


def expected_content(body: bytes) -> bytes:
    """Reference: split the stream into CRLF lines, drop one leading dot, make bare CR/LF CRLF."""
    stream = b"\r\n" + body + b"\r\n.\r\n"
    end = stream.find(b"\r\n.\r\n")
    assume(end == len(stream) - 5)  # the body itself must not contain the end marker
    lines = stream[2:end].split(b"\r\n") if end > 0 else []
    unstuffed = [line[1:] if line.startswith(b".") else line for line in lines]
    content = b"".join(line + b"\r\n" for line in unstuffed) if end > 0 else b""
    return re.sub(rb"\r\n|\r|\n", b"\r\n", content)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prop")
    config = server_config(tmp, {"directory": {"domains": ["example.test"], "domain_settings": {
        "example.test": {"catch_all": True}}}})
    running = start_subprocess(config, tmp)
    yield running
    running.stop()


@settings(max_examples=examples(60), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tokens=st.lists(st.sampled_from(TOKENS), max_size=40),
       cuts=st.lists(st.integers(min_value=1, max_value=7), max_size=12))
def test_stored_bytes_match_the_rfc(server, tokens, cuts):
    body = b"".join(tokens)
    expected = expected_content(body)
    wire = body + b"\r\n.\r\n"
    mailbox = f"p{time.monotonic_ns()}@example.test"
    with SMTPRaw(server.host, server.port) as raw:
        raw.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        raw.reply()
        for line in ("EHLO c", "MAIL FROM:<a@example.org>", f"RCPT TO:<{mailbox}>"):
            assert raw.cmd(line)[0] == 250
        assert raw.cmd("DATA")[0] == 354
        pos = 0
        for cut in cuts:  # split the write wherever hypothesis likes
            raw.send(wire[pos:pos + cut])
            pos += cut
            time.sleep(0.001)
        raw.send(wire[pos:])
        code, text = raw.reply()
        assert code == 250, text
        assert raw.cmd("QUIT")[0] == 221
    [stored] = server.mailbox(mailbox)
    content = stored.split(b"\r\n", 1)[1]  # after Return-Path
    content = content.split(b"\r\n", 1)[1] if content.startswith(b"Received:") else content
    assert content == expected
