"""dnsbl against a real ingress server (the installed entry point), real SMTP clients and a
local DNS server on 127.0.0.1 (dnslib): never the internet."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading

import pytest
from dnslib import QTYPE, RCODE, RR, TXT, A, DNSRecord
from dnslib.server import BaseResolver, DNSLogger, DNSServer

from ingress_dnsbl import dns

LOCAL = {"directory": {"domains": ["example.test"],
                       "domain_settings": {"example.test": {"catch_all": True}}}}
CLIENT = "1.0.0.127"  # 127.0.0.1 reversed: every test client connects from there


class BlockLists(BaseResolver):
    """Answers A queries from a table of names; records every question it was asked."""

    def __init__(self):
        self.answers: dict[str, str] = {}  # name -> A record
        self.servfail: set[str] = set()  # zones that answer SERVFAIL
        self.questions: list[str] = []
        self._lock = threading.Lock()

    def resolve(self, request, handler):
        name = str(request.q.qname).rstrip(".").lower()
        with self._lock:
            self.questions.append(name)
        reply = request.reply()
        if any(name.endswith("." + zone) for zone in self.servfail):
            reply.header.rcode = RCODE.SERVFAIL
        elif name in self.answers and request.q.qtype == QTYPE.A:
            reply.add_answer(RR(name, QTYPE.A, rdata=A(self.answers[name]), ttl=60))
        else:
            reply.header.rcode = RCODE.NXDOMAIN
        return reply


@pytest.fixture
def blocklists():
    """A DNS server on a free UDP port of 127.0.0.1; ``.resolver`` is its ``host:port``."""
    zones = BlockLists()
    server = DNSServer(zones, address="127.0.0.1", port=0,
                       logger=DNSLogger(prefix=False, logf=lambda _: None))
    # Not server.start_thread(): a shorter poll makes stopping quick.
    thread = threading.Thread(target=server.server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    zones.resolver = f"127.0.0.1:{server.server.server_address[1]}"
    yield zones
    server.stop()
    server.server.server_close()
    thread.join(10)


@pytest.fixture
def silent_resolver():
    """A UDP port that never answers."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{sock.getsockname()[1]}"


def dnsbl(**settings):
    return {**LOCAL, "plugins": {"dnsbl": settings}}


@pytest.mark.parametrize("enabled", [True, False])
def test_listed_client_is_refused_at_connect(ingress_server, blocklists, enabled):
    blocklists.answers[f"{CLIENT}.bl.test"] = "127.0.0.2"
    server = ingress_server(dnsbl(zones=["bl.test"], resolver=blocklists.resolver)
                            if enabled else LOCAL)
    with server.raw() as client:
        if enabled:
            assert client.reply() == (554, "5.7.1 127.0.0.1 listed by bl.test")
            assert client.closed_by_server()
        else:
            assert client.reply()[0] == 220
    assert blocklists.questions == ([f"{CLIENT}.bl.test"] if enabled else [])


def test_every_zone_is_asked_and_the_listing_one_is_named(ingress_server, blocklists):
    blocklists.answers[f"{CLIENT}.second.test"] = "127.0.0.4"
    server = ingress_server(dnsbl(zones=["first.test", "second.test."],
                                  resolver=blocklists.resolver))
    with server.raw() as client:
        assert client.reply() == (554, "5.7.1 127.0.0.1 listed by second.test")
    assert sorted(blocklists.questions) == [f"{CLIENT}.first.test", f"{CLIENT}.second.test"]


def test_client_not_listed_sends_mail(ingress_server, blocklists):
    blocklists.answers["2.0.0.127.bl.test"] = "127.0.0.2"  # someone else
    server = ingress_server(dnsbl(zones=["bl.test"], resolver=blocklists.resolver))
    with server.smtp() as client:
        client.sendmail("a@example.org", ["bob@example.test"], b"Subject: hi\r\n\r\nx\r\n")
    assert len(server.mailbox("bob@example.test")) == 1
    assert blocklists.questions == [f"{CLIENT}.bl.test"]


@pytest.mark.parametrize("enabled", [True, False])
def test_check_at_rcpt_refuses_each_recipient_after_one_lookup(ingress_server, blocklists,
                                                               enabled):
    blocklists.answers[f"{CLIENT}.bl.test"] = "127.0.0.2"
    server = ingress_server(dnsbl(zones=["bl.test"], resolver=blocklists.resolver,
                                  check_at="rcpt") if enabled else LOCAL)
    with server.smtp() as client:
        client.ehlo()
        assert client.mail("a@example.org")[0] == 250
        first, second = client.rcpt("bob@example.test"), client.rcpt("carol@example.test")
        assert client.noop()[0] == 250
    if enabled:
        assert first == second == (554, b"5.7.1 127.0.0.1 listed by bl.test")
        assert blocklists.questions == [f"{CLIENT}.bl.test"]
    else:
        assert first[0] == second[0] == 250


def test_allow_list_is_not_looked_up(ingress_server, blocklists):
    blocklists.answers[f"{CLIENT}.bl.test"] = "127.0.0.2"
    server = ingress_server(dnsbl(zones=["bl.test"], resolver=blocklists.resolver,
                                  allow=["127.0.0.0/8"]))
    with server.raw() as client:
        assert client.reply()[0] == 220
    assert blocklists.questions == []


def test_timeout_fails_open_with_a_log_line(ingress_server, silent_resolver):
    server = ingress_server(dnsbl(zones=["bl.test"], resolver=silent_resolver,
                                  timeout_seconds=0.2))
    with server.raw() as client:
        assert client.reply()[0] == 220
    assert (f"dnsbl: bl.test lookup of 127.0.0.1 failed (no answer from {silent_resolver} "
            "within 0.2s); letting the client in") in server.log()


@pytest.mark.parametrize("answer,why", [
    (None, "SERVFAIL"),
    ("127.255.255.254", "answer 127.255.255.254 is not a listing"),
    ("192.0.2.80", "answer 192.0.2.80 is not a listing"),
])
def test_failures_and_error_answers_fail_open(ingress_server, blocklists, answer, why):
    if answer is None:
        blocklists.servfail.add("bl.test")
    else:
        blocklists.answers[f"{CLIENT}.bl.test"] = answer
    server = ingress_server(dnsbl(zones=["bl.test"], resolver=blocklists.resolver))
    with server.raw() as client:
        assert client.reply()[0] == 220
    assert f"dnsbl: bl.test lookup of 127.0.0.1 failed ({why})" in server.log()


def test_ipv6_client_is_looked_up_by_nibbles(ingress_server, blocklists):
    blocklists.answers[f"{'1.' + '0.' * 31}bl.test"] = "127.0.0.2"
    server = ingress_server(dnsbl(zones=["bl.test"], resolver=blocklists.resolver)
                            | {"server": {"listen": ["[::1]:0"]}})
    assert server.host == "::1"
    with server.raw() as client:
        assert client.reply() == (554, "5.7.1 ::1 listed by bl.test")


# --- the DNS codec ------------------------------------------------------------------------------


def test_reverse_name():
    assert dns.reverse_name("192.0.2.1") == "1.2.0.192"
    assert dns.reverse_name("::ffff:192.0.2.1") == "1.2.0.192"
    assert dns.reverse_name("2001:db8::567:89ab") == (
        "b.a.9.8.7.6.5.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2")


def test_codec_reads_compressed_answers_and_ignores_what_is_not_ours():
    query = dns.build_query("2.0.0.127.bl.test", 0x1234)
    parsed = DNSRecord.parse(query)
    assert str(parsed.q.qname) == "2.0.0.127.bl.test." and parsed.header.rd
    reply = parsed.reply()
    reply.add_answer(RR("2.0.0.127.bl.test", QTYPE.A, rdata=A("127.0.0.2")),
                     RR("2.0.0.127.bl.test", QTYPE.TXT, rdata=TXT("listed")))
    assert dns.parse_response(reply.pack(), query) == dns.Answer(0, ("127.0.0.2",))
    other = dns.build_query("3.0.0.127.bl.test", 0x1234)
    with pytest.raises(dns.DNSError):
        dns.parse_response(reply.pack(), other)
    with pytest.raises(dns.DNSError):
        dns.parse_response(reply.pack()[:-3], query)


# --- as an installed plugin -----------------------------------------------------------------------


def ingress(*args):
    return subprocess.run([sys.executable, "-m", "ingress", *args], capture_output=True,
                          text=True, timeout=60)


def test_installed_plugin_is_listed_and_its_config_checked(tmp_path):
    listed = ingress("plugins").stdout.splitlines()
    assert any(line.startswith("dnsbl\tentry point ingress-dnsbl") for line in listed)
    good = tmp_path / "good.toml"
    good.write_text('[plugins.dnsbl]\nzones = ["zen.example"]\nresolver = "[::1]:5353"\n'
                    'check_at = "rcpt"\n')
    assert ingress("check-config", str(good)).returncode == 0, ingress("check-config", str(good))
    bad = tmp_path / "bad.toml"
    bad.write_text('[plugins.dnsbl]\nzone = ["zen.example"]\ncheck_at = "helo"\n')
    result = ingress("check-config", str(bad))
    assert result.returncode == 2
    assert f"{bad}: /plugins/dnsbl/zone: unknown key 'zone'" in result.stderr.splitlines()
    assert f"{bad}: /plugins/dnsbl/check_at:" in result.stderr


@pytest.mark.parametrize("option", ["send-proxy", "send-proxy-v2"])
def test_client_behind_haproxy_is_looked_up(ingress_server, blocklists, tmp_path, option):
    """Behind a real HAProxy that sends PROXY headers, the client (127.0.0.2) is looked up,
    not HAProxy (127.0.0.1)."""
    from ingress.testing import HAProxy

    blocklists.answers["2.0.0.127.bl.test"] = "127.0.0.2"
    blocklists.answers[f"{CLIENT}.bl.test"] = "127.0.0.2"  # HAProxy's address: must not matter
    server = ingress_server({**dnsbl(zones=["bl.test"], resolver=blocklists.resolver),
                             "server": {"proxy_protocol": ["127.0.0.1"]}})
    with HAProxy(tmp_path / "haproxy", [(server.host, server.port)], option) as proxy:
        with proxy.raw(source="127.0.0.2") as client:
            assert client.reply() == (554, "5.7.1 127.0.0.2 listed by bl.test")
        with proxy.raw(source="127.0.0.3") as client:
            assert client.reply()[0] == 220
    assert sorted(blocklists.questions) == ["2.0.0.127.bl.test", "3.0.0.127.bl.test"]


@pytest.mark.parametrize("resolver, message", [
    ("127.0.0.1:99999", "'127.0.0.1:99999': port 99999 is out of range (1-65535)"),
    ("127.0.0.1:0", "'127.0.0.1:0': port 0 is out of range (1-65535)"),
    ("::1:53", "'::1:53' is not host:port: write an IPv6 address in brackets, as in [::1]:25"),
])
def test_resolver_must_be_host_and_port(tmp_path, resolver, message):
    path = tmp_path / "c.toml"
    path.write_text(f'[plugins.dnsbl]\nresolver = "{resolver}"\n')
    result = ingress("check-config", str(path))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"{path}: /plugins/dnsbl/resolver: {message}"]


@pytest.mark.parametrize("entry", ["999.1.1.1", "10.0.0.0/33", "::1::2", "1.2.3.4%eth0"])
def test_an_allow_entry_that_is_no_network_is_a_config_error(tmp_path, entry):
    # It used to pass a loose pattern and be skipped at run time with a log line.
    path = tmp_path / "c.toml"
    path.write_text(f'[plugins.dnsbl]\nallow = ["192.0.2.1", "{entry}"]\n')
    result = ingress("check-config", str(path))
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert line.startswith(f"{path}: /plugins/dnsbl/allow/1: ")
