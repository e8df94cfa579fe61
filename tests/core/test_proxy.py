"""server.proxy_protocol: PROXY protocol v1/v2 headers from trusted proxies, byte by byte over
raw sockets, and behind a real HAProxy (send-proxy, send-proxy-v2)."""

from __future__ import annotations

import email
import ipaddress
import json
import re
import smtplib
import socket
import struct
import subprocess
import sys
import time

import pytest

from ingress.testing import HAProxy, SMTPRaw, eventually

SIG2 = b"\r\n\r\n\x00\r\nQUIT\n"
CLIENT = "192.0.2.7"  # the client the header names; only it is whitelisted for relay
CLIENT6 = "2001:db8::7"
MESSAGE = b"From: a@example.org\r\nSubject: proxied\r\n\r\nbody\r\n.\r\n"


def v1(src=CLIENT, dst="198.51.100.1", sport=40000, dport=25, proto="TCP4") -> bytes:
    return f"PROXY {proto} {src} {dst} {sport} {dport}\r\n".encode()


def v2(src=CLIENT, dst="198.51.100.1", sport=40000, dport=25, command=1, family=None,
       tlv=b"") -> bytes:
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    body = s.packed + d.packed + struct.pack("!HH", sport, dport) + tlv
    if family is None:
        family = 0x11 if s.version == 4 else 0x21
    return SIG2 + bytes([0x20 | command, family]) + struct.pack("!H", len(body)) + body


def v2_local() -> bytes:
    return SIG2 + bytes([0x20, 0x00]) + struct.pack("!H", 0)


def config(proxies=("127.0.0.1",), timeout=5, **server) -> dict:
    return {
        "server": {"proxy_protocol": list(proxies), "proxy_timeout": timeout, **server},
        "directory": {"domains": ["example.test"],
                      "users": [{"address": "bob@example.test", "password": "pw"}]},
        "plugins": {
            "banner": {"text": "#HostName# ESMTP ip=#ConnectedIP#"},
            "relay": {"whitelist": [CLIENT, "2001:db8::/32", "127.0.0.2"]},
        },
    }


def banner_ip(text: str) -> str:
    return re.search(r"ip=(\S+)", text)[1]


def session(client: SMTPRaw) -> dict:
    """Banner, then EHLO, MAIL and a relayed RCPT: what the server saw and allowed."""
    code, text = client.reply()
    assert code == 220, text
    assert client.cmd("EHLO client.example")[0] == 250
    assert client.cmd("MAIL FROM:<a@example.org>")[0] == 250
    rcpt = client.cmd("RCPT TO:<someone@remote.example>")
    return {"ip": banner_ip(text), "relay": rcpt[0]}


def send_message(client: SMTPRaw) -> None:
    assert client.cmd("DATA")[0] == 354
    client.send(MESSAGE)
    assert client.reply()[0] == 250
    assert client.cmd("QUIT")[0] == 221


def received(server) -> str:
    (_, raw), = server.queue_entries()
    return email.message_from_bytes(raw)["Received"]


def no_reply_and_closed(client: SMTPRaw) -> bytes:
    """Everything the server sent until it closed the connection."""
    client.sock.settimeout(30)
    data = b""
    while True:
        try:
            chunk = client.sock.recv(4096)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


def proxy_lines(server) -> list[str]:
    return [line for line in server.log().splitlines() if "connection from proxy" in line]


@pytest.fixture
def proxied(ingress_server):
    return ingress_server(config())


# --- valid headers ----------------------------------------------------------------------------

@pytest.mark.parametrize("header,ip", [
    (v1(), CLIENT),
    (v1(src=CLIENT6, dst="2001:db8::1", proto="TCP6"), CLIENT6),
    (v2(), CLIENT),
    (v2(src=CLIENT6, dst="2001:db8::1"), CLIENT6),
    (v2(src="::ffff:192.0.2.7", dst="::ffff:198.51.100.1"), CLIENT),  # IPv4-mapped: IPv4
    (v1(src="::ffff:192.0.2.7", dst="::1", proto="TCP6"), CLIENT),
    (v2(tlv=b"\x04\x00\x01x\x05\x00\x03abc"), CLIENT),  # TLVs are skipped
], ids=["v1-tcp4", "v1-tcp6", "v2-tcp4", "v2-tcp6", "v2-mapped", "v1-mapped", "v2-tlv"])
def test_header_names_the_client(proxied, header, ip):
    with proxied.raw() as client:
        client.send(header)
        seen = session(client)
        assert seen == {"ip": ip, "relay": 250}
        send_message(client)
    literal = f"[{ip}]" if ":" not in ip else f"[IPv6:{ip}]"
    assert f"from client.example ({literal})" in " ".join(received(proxied).split())
    eventually(lambda: re.search(rf"session \S+ {re.escape(ip)} ended", proxied.log()),
               what="the session log line with the client address")
    assert "127.0.0.1 ended" not in proxied.log()


@pytest.mark.parametrize("header", [v1(proto="UNKNOWN"), b"PROXY UNKNOWN\r\n",
                                    b"PROXY UNKNOWN whatever follows\r\n", v2_local(),
                                    v2(family=0x00), v2(command=0)],
                         ids=["v1-unknown-full", "v1-unknown", "v1-unknown-junk", "v2-local",
                              "v2-unspec", "v2-local-with-addresses"])
def test_unknown_and_local_are_the_proxy_itself(proxied, header):
    with proxied.raw() as client:
        client.send(header)
        assert session(client) == {"ip": "127.0.0.1", "relay": 550}
    assert proxy_lines(proxied) == []


def test_header_and_commands_in_one_write(proxied):
    """Not one byte past the header is taken by it: the pipelined commands are served."""
    with proxied.raw() as client:
        client.send(v2() + b"EHLO client.example\r\nMAIL FROM:<a@example.org>\r\n"
                    b"RCPT TO:<x@remote.example>\r\n")
        assert banner_ip(client.reply()[1]) == CLIENT
        assert [client.reply()[0] for _ in range(3)] == [250, 250, 250]
    with proxied.raw() as client:
        client.send(v1() + b"NOOP\r\n")
        assert banner_ip(client.reply()[1]) == CLIENT
        assert client.reply()[0] == 250


@pytest.mark.parametrize("header", [v1(), v2(), v1(src=CLIENT6, dst="::1", proto="TCP6")],
                         ids=["v1", "v2", "v1-tcp6"])
def test_header_split_across_writes(proxied, header):
    with proxied.raw() as client:
        client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for piece in (header[:1], header[1:5], header[5:13], header[13:17], header[17:]):
            client.send(piece)
            time.sleep(0.05)
        assert session(client)["relay"] == 250


def test_nothing_is_sent_before_the_header(proxied):
    with proxied.raw() as client:
        client.sock.settimeout(0.5)
        with pytest.raises(TimeoutError):
            client.sock.recv(1)
        client.sock.settimeout(10)
        client.send(v1())
        assert banner_ip(client.reply()[1]) == CLIENT


# --- bad headers: closed without a reply, one log line ----------------------------------------

BAD = {
    "smtp-instead": (b"EHLO client.example\r\n", "not a PROXY protocol header"),
    "v1-lowercase": (b"proxy TCP4 192.0.2.7 198.51.100.1 1 2\r\n", "not a PROXY protocol header"),
    "v1-protocol": (v1(proto="UDP4"), "unknown protocol"),
    "v1-tcp64": (v1(proto="TCP64"), "unknown protocol"),
    "v1-family": (v1(src=CLIENT6, proto="TCP4"), "bad TCP4 addresses"),
    "v1-address": (v1(src="192.0.2.300"), "bad TCP4 addresses"),
    "v1-port": (v1(sport=65536), "bad port"),
    "v1-port-zero-lead": (b"PROXY TCP4 192.0.2.7 198.51.100.1 0040 25\r\n", "bad port"),
    "v1-fields": (b"PROXY TCP4 192.0.2.7 198.51.100.1 40000\r\n", "wrong number of fields"),
    "v1-double-space": (b"PROXY TCP4  192.0.2.7 198.51.100.1 1 2\r\n", "wrong number"),
    "v1-bare-lf": (v1()[:-2] + b"\n", "not ended by CRLF"),
    "v1-binary": (b"PROXY TCP4 \xff\r\n", "non-ASCII"),
    "v2-signature": (b"\r\n\r\n\x00\r\nQUIX\n" + bytes(4), "not a PROXY protocol header"),
    "v2-version": (SIG2 + b"\x11\x11\x00\x0c" + bytes(12), "version 1"),
    "v2-command": (SIG2 + b"\x22\x11\x00\x0c" + bytes(12), "unknown command 2"),
    "v2-family": (SIG2 + b"\x21\x41\x00\x0c" + bytes(12), "unknown family 0x41"),
    "v2-short": (SIG2 + b"\x21\x21\x00\x0c" + bytes(12), "too short for its addresses"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_malformed_header_closes_without_reply(proxied, name):
    header, reason = BAD[name]
    with proxied.raw() as client:
        client.send(header)
        assert no_reply_and_closed(client) == b""
    eventually(lambda: proxy_lines(proxied), what="the log line")
    (line,) = proxy_lines(proxied)
    assert "connection from proxy 127.0.0.1 closed" in line and reason in line, line
    assert "Traceback" not in proxied.log()


def test_truncated_header(proxied):
    for header in (v1()[:20], v2()[:20], v2()[:10]):
        with proxied.raw() as client:
            client.send(header)
            client.sock.shutdown(socket.SHUT_WR)
            assert no_reply_and_closed(client) == b""
    eventually(lambda: len(proxy_lines(proxied)) == 3, what="three log lines")
    assert all("closed before the PROXY header ended" in x for x in proxy_lines(proxied))


def test_oversized_v1_closes_as_soon_as_it_is_known(ingress_server):
    """107 bytes without CRLF cannot be a v1 header: closed then, not at proxy_timeout."""
    server = ingress_server(config(timeout=600))
    with server.raw() as client:
        client.send(b"PROXY TCP4 " + b"1" * 96)  # 107 bytes
        assert client.closed_by_server(timeout=60)
        assert client._buffer == b""
    with server.raw() as client:
        client.send(b"PROXY UNKNOWN " + b"x" * 20000 + b"\r\n")
        assert no_reply_and_closed(client) == b""
    eventually(lambda: len(proxy_lines(server)) == 2, what="two log lines")
    assert all("longer than 107 bytes" in x for x in proxy_lines(server))


def test_slow_header_times_out(ingress_server):
    server = ingress_server(config(timeout=1))
    started = time.monotonic()
    with server.raw() as client:
        assert no_reply_and_closed(client) == b""
    assert time.monotonic() - started >= 0.9  # not before proxy_timeout
    with server.raw() as client:
        client.send(v1()[:10])
        assert no_reply_and_closed(client) == b""
    eventually(lambda: len(proxy_lines(server)) == 2, what="two log lines")
    first, second = proxy_lines(server)
    assert "connection from proxy 127.0.0.1 closed: no PROXY header within 1s" in first
    assert "incomplete PROXY header after 1s" in second


# --- untrusted addresses ----------------------------------------------------------------------

def test_proxy_line_from_an_untrusted_address_is_an_unknown_command(ingress_server):
    server = ingress_server(config(proxies=["192.0.2.1", "::1"]))
    with server.raw() as client:
        code, text = client.reply()  # plain SMTP: the banner comes first
        assert code == 220 and banner_ip(text) == "127.0.0.1"
        assert client.cmd(v1()[:-2]) == (500, "5.5.2 Syntax error, command unrecognized")
        assert client.cmd("EHLO client.example")[0] == 250
        assert client.cmd("MAIL FROM:<a@example.org>")[0] == 250
        assert client.cmd("RCPT TO:<x@remote.example>")[0] == 550
    with server.raw() as client:  # a binary header is no command either
        assert client.reply()[0] == 220
        client.send(v2() + b"\r\n")
        assert client.reply()[0] == 500
    assert proxy_lines(server) == []


def test_without_proxy_protocol_nothing_changes(ingress_server):
    server = ingress_server(config(proxies=[]))
    with server.raw() as client:
        assert client.reply()[0] == 220
        assert client.cmd(v1()[:-2])[0] == 500


# --- TLS --------------------------------------------------------------------------------------

def test_implicit_tls_header_precedes_handshake_and_starttls_keeps_it(ingress_server, tls):
    server = ingress_server({**config(), "server": {**config()["server"],
                                                   **tls.server(implicit=True)}})
    with socket.create_connection((server.host, server.tls_port), timeout=10) as sock:
        sock.sendall(v2())
        with tls.context().wrap_socket(sock, server_hostname="127.0.0.1") as tls_sock:
            client = SMTPRaw.__new__(SMTPRaw)
            client.sock, client._buffer = tls_sock, b""
            assert session(client) == {"ip": CLIENT, "relay": 250}
    with server.raw() as client:  # STARTTLS on the plain listener
        client.send(v1(src=CLIENT6, dst="::1", proto="TCP6"))
        assert banner_ip(client.reply()[1]) == CLIENT6
        assert client.cmd("EHLO client.example")[0] == 250
        assert client.starttls(tls.context(), "127.0.0.1")[0] == 220
        assert client.cmd("EHLO client.example")[0] == 250
        assert client.cmd("MAIL FROM:<a@example.org>")[0] == 250
        assert client.cmd("RCPT TO:<x@remote.example>")[0] == 250
        send_message(client)
    assert f"[IPv6:{CLIENT6}]" in received(server)


def test_bad_header_on_the_tls_listener(ingress_server, tls):
    server = ingress_server({**config(), "server": {**config()["server"],
                                                   **tls.server(implicit=True)}})
    with server.raw(server.tls_port) as client:
        client.send(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # a ClientHello, no header
        assert no_reply_and_closed(client) == b""
    eventually(lambda: proxy_lines(server), what="the log line")
    assert "not a PROXY protocol header" in proxy_lines(server)[0]


# --- config -----------------------------------------------------------------------------------

def check_config(tmp_path, server: dict) -> subprocess.CompletedProcess:
    path = tmp_path / "ingress.json"
    path.write_text(json.dumps({"server": server}))
    return subprocess.run([sys.executable, "-m", "ingress", "check-config", str(path)],
                          capture_output=True, text=True, timeout=60)


def test_check_config(tmp_path):
    good = ["127.0.0.1", "10.0.0.0/8", "10.1.2.3/8", "::1", "2001:db8::/32", "::ffff:10.0.0.1"]
    assert check_config(tmp_path, {"proxy_protocol": good, "proxy_timeout": 0.5}).returncode == 0
    bad = ["localhost", "10.0.0.0/33", "1.2.3", " 10.0.0.1", "fe80::1%eth0", "::/129", ""]
    result = check_config(tmp_path, {"proxy_protocol": ["127.0.0.1", *bad]})
    assert result.returncode == 2
    for i, entry in enumerate(bad, start=1):
        assert f"ingress.json: /server/proxy_protocol/{i}: {entry!r} is not an IP address or " \
               "CIDR network" in result.stderr, result.stderr
    assert "/server/proxy_protocol/0" not in result.stderr
    for timeout in (0, -1, "5"):
        result = check_config(tmp_path, {"proxy_timeout": timeout})
        assert result.returncode == 2 and "/server/proxy_timeout: " in result.stderr


def test_defaults(tmp_path):
    from ingress import config as config_mod

    server = config_mod.load(None).server
    assert server["proxy_protocol"] == [] and server["proxy_timeout"] == 5


# --- behind a real HAProxy --------------------------------------------------------------------

@pytest.mark.parametrize("option", ["send-proxy", "send-proxy-v2"])
def test_behind_haproxy(ingress_server, tmp_path, option):
    """The client connects to HAProxy from 127.0.0.2; ingress sees only HAProxy (127.0.0.1),
    and only 127.0.0.2 may relay."""
    cfg = config()
    cfg["plugins"]["relay"]["whitelist"] = ["127.0.0.2"]
    server = ingress_server(cfg)
    with HAProxy(tmp_path / "haproxy", [(server.host, server.port)], option) as haproxy:
        with haproxy.raw(source="127.0.0.2") as client:
            assert session(client) == {"ip": "127.0.0.2", "relay": 250}
            send_message(client)
        with haproxy.raw(source="127.0.0.3") as client:
            assert session(client) == {"ip": "127.0.0.3", "relay": 550}
    assert "from client.example ([127.0.0.2])" in " ".join(received(server).split())
    # the session's end is logged once the server has seen the client go: wait for it
    eventually(lambda: re.search(r"session \S+ 127\.0\.0\.3 ended", server.log()),
               what="the end of the session from 127.0.0.3 in the log")
    log = server.log()
    assert re.search(r"accepted \S+ client=127\.0\.0\.2 ", log), log
    assert "127.0.0.1 ended" not in log and proxy_lines(server) == []


def test_haproxy_without_header_is_refused(ingress_server, tmp_path):
    """A trusted proxy that forgets send-proxy: its connections are closed, never served as
    coming from the proxy."""
    server = ingress_server(config(timeout=1))
    with HAProxy(tmp_path / "haproxy", [(server.host, server.port)], "") as haproxy:
        with haproxy.raw(source="127.0.0.2") as client:
            assert no_reply_and_closed(client) == b""
    eventually(lambda: proxy_lines(server), what="the log line")
    assert "no PROXY header within 1s" in proxy_lines(server)[0]


def test_haproxy_smtp_health_check(ingress_server, tmp_path):
    """option smtpchk with send-proxy-v2: the checks come as LOCAL, are served as sessions of
    the proxy's own address, and mark the server up."""
    server = ingress_server(config())
    with HAProxy(tmp_path / "haproxy", [(server.host, server.port)],
                 "send-proxy-v2 check inter 200ms", ("option smtpchk EHLO lb.example",)):
        eventually(lambda: len(re.findall(r"session \S+ 127\.0\.0\.1 ended", server.log())) >= 2,
                   what="two health checks")
    assert proxy_lines(server) == []
    assert "Traceback" not in server.log()


def test_smtplib_through_haproxy(ingress_server, tmp_path):
    server = ingress_server(config())
    with HAProxy(tmp_path / "haproxy", [(server.host, server.port)], "send-proxy-v2") as proxy:
        with smtplib.SMTP(proxy.host, proxy.port, timeout=10,
                          source_address=("127.0.0.2", 0)) as client:
            client.sendmail("a@example.org", ["bob@example.test"], MESSAGE[:-3])
    (message,) = server.mailbox("bob@example.test")
    assert b"[127.0.0.2]" in message


def test_asyncio_event_loop(ingress_server, tls):
    """The header is read the same way without uvloop (plain and implicit TLS listeners)."""
    server = ingress_server({**config(), "server": {**config()["server"],
                                                   **tls.server(implicit=True)}},
                            args=("--no-uvloop",))
    with server.raw() as client:
        for piece in (v2()[:7], v2()[7:20], v2()[20:]):
            client.send(piece)
            time.sleep(0.05)
        assert session(client) == {"ip": CLIENT, "relay": 250}
    with socket.create_connection((server.host, server.tls_port), timeout=10) as sock:
        sock.sendall(v1(src=CLIENT6, dst="::1", proto="TCP6"))
        with tls.context().wrap_socket(sock, server_hostname="127.0.0.1") as tls_sock:
            client = SMTPRaw.__new__(SMTPRaw)
            client.sock, client._buffer = tls_sock, b""
            assert session(client) == {"ip": CLIENT6, "relay": 250}
    with server.raw() as client:
        client.send(b"PROXY TCP4 " + b"1" * 96)
        assert no_reply_and_closed(client) == b""
    eventually(lambda: proxy_lines(server), what="the log line")
    assert "longer than 107 bytes" in proxy_lines(server)[0]
