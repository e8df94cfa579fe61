"""ratelimit against a real ingress server (the installed entry point) and real SMTP clients."""

from __future__ import annotations

import subprocess
import sys

import pytest
from ingress.testing import SMTPRaw

from ingress_ratelimit import RateLimit, SlidingWindow, client_key

HOUR = 3600  # a window no test outlives: what is counted stays counted
LOCAL = {"directory": {"domains": ["example.test"],
                       "domain_settings": {"example.test": {"catch_all": True}}}}


def limits(**settings):
    return {"plugins": {"ratelimit": settings}}


class Clock:
    def __init__(self):
        self.now = 1000.0

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


def test_sliding_window_lets_a_client_in_as_its_oldest_connections_age(
        ingress_inprocess_server):
    clock = Clock()
    server = ingress_inprocess_server(limits(window_seconds=60, max_connections=2),
                                      plugins={"ratelimit": RateLimit(clock)})

    def greeting():
        with server.raw() as client:
            return client.reply()[0]

    assert greeting() == 220          # t=0
    clock.now += 30
    assert greeting() == 220          # t=30
    assert greeting() == 421          # two in the last minute
    clock.now += 31
    assert greeting() == 220          # t=61: the t=0 one is a window old
    assert greeting() == 421          # refusals were not counted, the t=30 one still is
    clock.now += 60
    assert greeting() == greeting() == 220


def test_window_keeps_bounded_memory():
    clock = Clock()
    window = SlidingWindow(clock)
    for i in range(1000):
        assert window.hit(f"192.0.2.{i}", 5, 60, max_keys=100)
    assert len(window) == 100
    assert window.hit("192.0.2.1", 1, 60, max_keys=100), "forgotten clients start again"
    clock.now += 61
    assert window.hit("198.51.100.1", 5, 60, max_keys=100)
    assert len(window) == 1, "clients idle for a whole window are forgotten"


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
