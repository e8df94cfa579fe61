"""greylist against real ingress servers (the installed entry point), real SMTP clients and a
real Redis for the shared state."""

from __future__ import annotations

import asyncio
import smtplib
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from ingress_greylist import GREYLISTED as GREYLISTED_REPLY
from ingress_greylist import Greylist, network, triplet

GREYLISTED = (451, b"4.7.1 Greylisted, please try again later")
DIRECTORY = {"directory": {"domains": ["example.test"],
                           "users": [{"address": "bob@example.test", "password": "bobpw"},
                                     {"address": "carol@example.test", "password": "carolpw"}]}}


def greylist(state: str | None = None, **settings) -> dict:
    config = {**DIRECTORY, "plugins": {"greylist": settings}}
    if state:
        config["server"] = {"state": state}
    return config


def attempt(server, sender="alice@example.org", rcpt="bob@example.test",
            source: str | None = None) -> tuple[int, bytes]:
    """One delivery attempt: MAIL, RCPT and, if accepted, the message."""
    kwargs = {"source_address": (source, 0)} if source else {}
    with smtplib.SMTP(server.host, server.port, timeout=10, **kwargs) as client:
        client.ehlo()
        assert client.mail(sender)[0] == 250
        reply = client.rcpt(rcpt)
        if reply[0] == 250:
            assert client.data(b"Subject: hi\r\n\r\nhello\r\n")[0] == 250
        return reply


def greylisted_lines(server) -> list[str]:
    return [line for line in server.log().splitlines() if "greylist: greylisted" in line]


class Clock:
    def __init__(self):
        self.now = 1_000_000.0

    def __call__(self):
        return self.now


@pytest.mark.parametrize("enabled", [True, False])
def test_first_attempt_is_greylisted_and_a_retry_after_the_delay_passes(ingress_server,
                                                                        enabled):
    server = ingress_server(greylist(delay_seconds=1) if enabled else DIRECTORY)
    first = attempt(server)
    started = time.monotonic()
    if not enabled:
        assert first[0] == 250
        return
    assert first == GREYLISTED
    assert attempt(server) == GREYLISTED, "too early"
    time.sleep(max(0.0, 1.2 - (time.monotonic() - started)))
    assert attempt(server)[0] == 250
    assert attempt(server)[0] == 250, "a passed triplet passes at once"
    assert len(server.mailbox("bob@example.test")) == 2
    lines = greylisted_lines(server)
    assert len(lines) == 2, "one line per greylisted RCPT"
    assert "127.0.0.0/24 <alice@example.org> -> <bob@example.test> (first attempt)" in lines[0]


def test_an_early_retry_does_not_restart_the_clock(ingress_inprocess_server):
    clock = Clock()
    server = ingress_inprocess_server(greylist(delay_seconds=300),
                                      plugins={"greylist": Greylist(clock)})
    assert attempt(server) == GREYLISTED
    clock.now += 200
    assert attempt(server) == GREYLISTED
    clock.now += 100  # 300 s after the first attempt, 100 s after the early retry
    assert attempt(server)[0] == 250


def test_the_triplet_is_network_sender_and_recipient(ingress_inprocess_server):
    clock = Clock()
    server = ingress_inprocess_server(greylist(delay_seconds=60),
                                      plugins={"greylist": Greylist(clock)})
    assert attempt(server, "Alice@Example.ORG", "Bob@Example.TEST") == GREYLISTED
    assert attempt(server, "", "bob@example.test") == GREYLISTED  # <>
    clock.now += 60
    assert attempt(server, "carol@example.org") == GREYLISTED, "another sender: another triplet"
    assert attempt(server, "alice@example.org", "carol@example.test") == GREYLISTED
    # Same triplet: case does not matter, and 127.0.0.2 is in the same /24 as 127.0.0.1.
    assert attempt(server, "alice@EXAMPLE.org", "BOB@example.test", source="127.0.0.2")[0] == 250
    assert attempt(server, "", "bob@example.test")[0] == 250


def test_network_of_a_triplet():
    assert network("192.0.2.77") == "192.0.2.0/24"
    assert network("::ffff:192.0.2.77") == "192.0.2.0/24"
    assert network("2001:db8:1:2:3:4:5:6") == "2001:db8:1:2::/64"
    assert triplet("192.0.2.1", "Alice@Example.ORG", "Bob@X.test") == (
        "192.0.2.0/24", "alice@example.org", "bob@x.test")


def test_the_hook_alone_on_an_in_process_store(ingress_state):
    """A unit test of the hook with ingress_state: IPv6 clients count per /64."""
    clock = Clock()
    plugin = Greylist(clock)
    settings = {"delay_seconds": 60, "expire_seconds": 3600, "pass_seconds": 86400,
                "whitelist": [], "authenticated": False}
    transaction = SimpleNamespace(mail_from="Alice@Example.ORG")

    def rcpt(peer_ip):
        session = SimpleNamespace(peer_ip=peer_ip, auth_user=None, id="S1")
        return plugin.on_rcpt(session, transaction, SimpleNamespace(address="bob@example.test"),
                              settings, ingress_state)

    async def scenario():
        assert await rcpt("2001:db8:1:2::7") == GREYLISTED_REPLY
        clock.now += 60
        assert await rcpt("2001:db8:1:3::7") == GREYLISTED_REPLY, "another /64"
        assert await rcpt("2001:db8:1:2:ffff::1") is None, "the same /64, 60 s later"
        assert await rcpt("2001:db8:1:2::7") is None

    asyncio.run(scenario())


def test_relay_denials_and_unknown_mailboxes_are_answered_first(ingress_server):
    server = ingress_server(greylist(delay_seconds=1))
    assert attempt(server, rcpt="friend@remote.test") == (550, b"5.7.1 Relaying denied")
    assert attempt(server, rcpt="nobody@example.test") == (550, b"5.1.1 Mailbox unavailable")
    assert greylisted_lines(server) == []
    assert attempt(server) == GREYLISTED, "a real local mailbox is greylisted"


def test_whitelisted_clients_are_never_greylisted(ingress_server):
    server = ingress_server(greylist(delay_seconds=300, whitelist=["192.0.2.0/24", "127.0.0.0/8"]))
    assert attempt(server)[0] == 250
    assert greylisted_lines(server) == []


@pytest.mark.parametrize("authenticated", [False, True])
def test_authenticated_sessions_are_skipped_unless_asked(ingress_server, authenticated):
    server = ingress_server(greylist(delay_seconds=300, authenticated=authenticated))
    with server.smtp() as client:
        client.ehlo()
        assert client.login("bob@example.test", "bobpw")[0] == 235  # CRAM-MD5
        client.mail("bob@example.test")
        reply = client.rcpt("carol@example.test")
    assert reply == GREYLISTED if authenticated else reply[0] == 250


def test_unretried_triplets_expire_and_passed_ones_last_pass_seconds(ingress_server):
    server = ingress_server(greylist(delay_seconds=0, expire_seconds=1, pass_seconds=1))
    assert attempt(server, rcpt="carol@example.test") == GREYLISTED
    assert attempt(server) == GREYLISTED
    time.sleep(1.3)
    assert attempt(server) == GREYLISTED, "forgotten after expire_seconds: a first attempt"
    assert attempt(server)[0] == 250
    assert attempt(server)[0] == 250
    time.sleep(1.3)
    assert attempt(server) == GREYLISTED, "passed for pass_seconds only"
    lines = greylisted_lines(server)
    assert len(lines) == 4 and all("(first attempt)" in line for line in lines)


def test_a_retry_that_reaches_another_node_passes(ingress_server, ingress_redis):
    config = greylist(ingress_redis.url, delay_seconds=1)
    node_a = ingress_server(config, name="a")
    node_b = ingress_server(config, name="b")
    assert attempt(node_a) == GREYLISTED
    started = time.monotonic()
    assert attempt(node_b) == GREYLISTED, "node B knows the triplet: too early"
    time.sleep(max(0.0, 1.2 - (time.monotonic() - started)))
    assert attempt(node_b)[0] == 250
    assert attempt(node_a)[0] == 250
    assert "(first attempt)" in greylisted_lines(node_a)[0]
    assert "(retry after" in greylisted_lines(node_b)[0]


def test_with_memory_state_each_node_greylists_on_its_own(ingress_server):
    node_a = ingress_server(greylist(delay_seconds=1), name="a")
    node_b = ingress_server(greylist(delay_seconds=1), name="b")
    assert attempt(node_a) == GREYLISTED
    time.sleep(1.2)
    assert attempt(node_b) == GREYLISTED
    assert "(first attempt)" in greylisted_lines(node_b)[0]


def test_redis_down_fails_closed_and_recovers(ingress_server, ingress_redis):
    server = ingress_server(greylist(ingress_redis.url, delay_seconds=0))
    assert attempt(server) == GREYLISTED
    ingress_redis.stop()
    for _ in range(3):
        code, text = attempt(server)
        assert (code, text[:5]) == (451, b"4.3.0")
    ingress_redis.start()
    assert attempt(server) == GREYLISTED, "the new Redis is empty: a first attempt"
    assert attempt(server)[0] == 250
    assert server.log().count("unavailable") == 1


def ingress(*args):
    return subprocess.run([sys.executable, "-m", "ingress", *args], capture_output=True,
                          text=True, timeout=60)


def test_installed_plugin_is_listed_and_its_config_checked(tmp_path):
    listed = ingress("plugins").stdout.splitlines()
    assert any(line.startswith("greylist\tentry point ingress-greylist") for line in listed)
    good = tmp_path / "good.toml"
    good.write_text("[plugins.greylist]\ndelay_seconds = 60\nwhitelist = ['192.0.2.0/24']\n")
    assert ingress("check-config", str(good)).returncode == 0
    bad = tmp_path / "bad.toml"
    bad.write_text("[plugins.greylist]\ndelay = 5\npass_seconds = 0\n")
    result = ingress("check-config", str(bad))
    assert result.returncode == 2
    assert f"{bad}: /plugins/greylist/delay: unknown key 'delay'" in result.stderr.splitlines()
    assert f"{bad}: /plugins/greylist/pass_seconds:" in result.stderr
    # Beyond the schema: the plugin's own check_settings, at check-config as at start.
    never = tmp_path / "never.toml"
    never.write_text("[plugins.greylist]\ndelay_seconds = 600\nexpire_seconds = 300\n")
    for result in (ingress("check-config", str(never)),
                   ingress("serve", "--config", str(never))):
        assert result.returncode == 2
        assert result.stderr.splitlines() == [
            f"{never}: /plugins/greylist/expire_seconds: 300 is not more than delay_seconds "
            "(600): no retry could ever pass"]
