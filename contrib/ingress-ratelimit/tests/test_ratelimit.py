"""ratelimit against a real ingress server (the installed entry point) and real SMTP clients."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest
from ingress.state import MemoryBackend
from ingress.testing import SMTPRaw, eventually

from ingress_ratelimit import RateLimit, client_key, hit

HOUR = 3600  # a window no test outlives: what is counted stays counted
LOCAL = {"directory": {"domains": ["example.test"],
                       "domain_settings": {"example.test": {"catch_all": True}}}}


def limits(**settings):
    return {"plugins": {"ratelimit": settings}}


class Clock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self):
        return self.now


@pytest.mark.parametrize("enabled", [True, False])
def test_connections_over_the_limit_get_421_and_are_closed(ingress_server, enabled):
    config = limits(window_seconds=HOUR, max_connections=2) if enabled else {}
    server = ingress_server(config)
    for _ in range(2):
        with server.raw() as client:
            assert client.reply()[0] == 220
    with server.raw() as client:
        if enabled:
            assert client.reply() == (421, "4.7.0 mx.test Too many connections from 127.0.0.1, "
                                           "try again later")
            assert client.closed_by_server()
        else:
            assert client.reply()[0] == 220
    if enabled:
        assert "refusing connection from 127.0.0.1" in server.log()


@pytest.mark.parametrize("enabled", [True, False])
def test_messages_over_the_limit_get_450_across_connections(ingress_server, enabled):
    config = limits(window_seconds=HOUR, max_messages=2, max_connections=0) if enabled else {}
    server = ingress_server({**LOCAL, **config})
    with server.smtp() as client:
        client.sendmail("a@example.org", ["one@example.test"], b"Subject: 1\r\n\r\nx\r\n")
        client.ehlo()
        assert client.mail("a@example.org")[0] == 250
        assert client.rset()[0] == 250
        third = client.mail("a@example.org")
    with server.smtp() as client:
        client.ehlo()
        fourth = client.mail("a@example.org")
        if enabled:
            assert client.noop()[0] == 250, "the session stays open"
    assert len(server.mailbox("one@example.test")) == 1
    if enabled:
        assert third == fourth == (450, b"4.7.1 Too many messages from 127.0.0.1, "
                                        b"try again later")
    else:
        assert third[0] == fourth[0] == 250


def test_allow_list_is_never_limited(ingress_server):
    server = ingress_server(limits(window_seconds=HOUR, max_connections=1, max_messages=1,
                                   allow=["10.0.0.0/8", "127.0.0.0/8", "::1"]))
    for _ in range(3):
        with server.smtp() as client:
            client.ehlo()
            assert client.mail("a@example.org")[0] == 250


def test_limits_are_counted_per_client(ingress_server):
    server = ingress_server({"server": {"listen": ["127.0.0.1:0", "[::1]:0"]},
                             **limits(window_seconds=HOUR, max_connections=1)})
    [v6_port] = [port for host, port, _ in server.listeners if host == "::1"]
    with server.raw() as client:
        assert client.reply()[0] == 220
    with server.raw() as client:
        assert client.reply()[0] == 421
    with SMTPRaw("::1", v6_port) as client:
        assert client.reply()[0] == 220, "::1 is another client than 127.0.0.1"


def test_sliding_window_lets_a_client_in_as_its_counted_connections_age(
        ingress_inprocess_server):
    clock = Clock(1200.0)  # the start of a window of 60 s
    server = ingress_inprocess_server(limits(window_seconds=60, max_connections=2),
                                      plugins={"ratelimit": RateLimit(clock)})

    def greetings(n):
        codes = []
        for _ in range(n):
            with server.raw() as client:
                codes.append(client.reply()[0])
        return codes

    assert greetings(3) == [220, 220, 421]
    clock.now += 60      # a new window: the previous one's two still count in full
    assert greetings(1) == [421]
    clock.now += 30      # half of the previous window is still inside the last minute
    assert greetings(2) == [220, 421], "1 carried + 1 new; the refusal before was not counted"
    clock.now += 30      # the window with one connection is now the previous one
    assert greetings(2) == [220, 421]
    clock.now += 120     # nothing in the last two windows
    assert greetings(2) == [220, 220]


def test_counts_expire_and_memory_stays_bounded():
    clock = Clock()
    backend = MemoryBackend(clock=clock)
    state = backend.store("ratelimit")

    async def scenario():
        for i in range(1000):
            assert await hit(state, f"conn:192.0.2.{i}", 5, 60, clock())
        assert len(backend) == 1000
        clock.now += 121
        assert await hit(state, "conn:198.51.100.1", 5, 60, clock())
        assert len(backend) == 1, "counts two windows old are forgotten"

    asyncio.run(scenario())


def test_limits_hold_across_nodes_and_workers_on_redis(ingress_server, ingress_redis):
    config = {**LOCAL, "server": {"state": ingress_redis.url},
              **limits(window_seconds=HOUR, max_connections=3, max_messages=2)}
    node_a = ingress_server(config, name="a")
    node_b = ingress_server({**config, "server": {"state": ingress_redis.url, "workers": 2}},
                            name="b")
    with node_a.smtp() as client:
        client.ehlo()
        assert client.mail("a@example.org")[0] == 250
    with node_b.smtp() as client:
        client.ehlo()
        assert client.mail("a@example.org")[0] == 250
        client.rset()
        assert client.mail("a@example.org") == (450, b"4.7.1 Too many messages from "
                                                     b"127.0.0.1, try again later")
    with node_a.raw() as client:
        assert client.reply()[0] == 220  # the third connection of the window
    for node in (node_a, node_b):
        with node.raw() as client:
            assert client.reply()[0] == 421
    eventually(lambda: "refusing connection from 127.0.0.1" in node_b.log(), what="log line")


def test_with_memory_state_each_node_counts_on_its_own(ingress_server):
    config = limits(window_seconds=HOUR, max_connections=1)
    node_a, node_b = ingress_server(config, name="a"), ingress_server(config, name="b")
    for node in (node_a, node_b):
        with node.raw() as client:
            assert client.reply()[0] == 220
    with node_a.raw() as client:
        assert client.reply()[0] == 421


def test_client_key():
    assert client_key("192.0.2.7", 64) == "192.0.2.7"
    assert client_key("::ffff:192.0.2.7", 64) == "192.0.2.7"
    assert client_key("2001:db8:1:2:3:4:5:6", 64) == "2001:db8:1:2::/64"
    assert client_key("2001:db8:1:2:3:4:5:6", 128) == "2001:db8:1:2:3:4:5:6/128"


def ingress(*args):
    return subprocess.run([sys.executable, "-m", "ingress", *args], capture_output=True,
                          text=True, timeout=60)


def test_installed_plugin_is_listed_and_its_config_checked(tmp_path):
    listed = ingress("plugins").stdout.splitlines()
    assert any(line.startswith("ratelimit\tentry point ingress-ratelimit") for line in listed)
    good = tmp_path / "good.toml"
    good.write_text("[plugins.ratelimit]\nwindow_seconds = 30\nallow = ['192.0.2.0/24']\n")
    assert ingress("check-config", str(good)).returncode == 0
    bad = tmp_path / "bad.toml"
    bad.write_text("[plugins.ratelimit]\nmax_conections = 5\nwindow_seconds = 0\n")
    result = ingress("check-config", str(bad))
    assert result.returncode == 2
    assert f"{bad}: /plugins/ratelimit/max_conections: unknown key 'max_conections'" in (
        result.stderr.splitlines())
    assert f"{bad}: /plugins/ratelimit/window_seconds:" in result.stderr
