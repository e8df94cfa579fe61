"""relay: nobody / local_users / local_domains / anyone, whitelist, authenticated users."""

from __future__ import annotations

import json
import re
import smtplib
import socket
import subprocess
import sys

import pytest

from ingress_plugins import relay as relay_plugin

DIRECTORY = {"domains": ["example.test"],
             "users": [{"address": "alice@example.test", "password": "alicepw"}]}
MODES = ["nobody", "local_users", "local_domains", "anyone"]
DENIED = (550, b"5.7.1 Relaying denied")


def config(**relay) -> dict:
    return {"directory": DIRECTORY, "plugins": {"relay": relay}}


def rcpt(client: smtplib.SMTP, sender: str, recipient: str) -> tuple[int, bytes]:
    client.rset()
    assert client.mail(sender)[0] == 250
    return client.rcpt(recipient)


def ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.parametrize("disabled", [(), ("relay",)])
@pytest.mark.parametrize("mode", MODES)
def test_open_relay_probe(ingress_server, mode, disabled):
    """Unauthenticated, external sender, external recipient: refused unless allow = anyone."""
    server = ingress_server(config(allow=mode), disabled=disabled)
    with server.smtp() as client:
        client.ehlo("probe.example.org")
        result = rcpt(client, "spammer@example.org", "victim@remote.test")
        if mode == "anyone" or disabled:
            assert result[0] == 250
            client.data("Subject: relayed\r\n\r\nx\r\n")
        else:
            assert result == DENIED
    assert len(server.queue_entries()) == (1 if mode == "anyone" or disabled else 0)


@pytest.mark.parametrize("mode", MODES)
def test_a_local_recipient_is_never_a_relay(ingress_server, mode):
    server = ingress_server(config(allow=mode))
    with server.smtp() as client:
        client.ehlo()
        assert rcpt(client, "someone@example.org", "alice@example.test")[0] == 250
        assert rcpt(client, "", "alice@example.test")[0] == 250


@pytest.mark.parametrize("disabled", [(), ("relay",)])
@pytest.mark.parametrize("mode", MODES)
def test_which_senders_may_relay_in_each_mode(ingress_server, mode, disabled):
    server = ingress_server(config(allow=mode), disabled=disabled)
    expected = {  # MAIL FROM: may it relay?
        "alice@example.test": mode in ("local_users", "local_domains", "anyone"),  # a user
        "Alice@EXAMPLE.test": mode in ("local_users", "local_domains", "anyone"),
        "nobody@example.test": mode in ("local_domains", "anyone"),  # local domain, no user
        "someone@example.org": mode == "anyone",
        "": mode == "anyone",  # the null sender
    }
    with server.smtp() as client:
        client.ehlo()
        for sender, allowed in expected.items():
            code, text = rcpt(client, sender, "friend@remote.test")
            if allowed or disabled:
                assert code == 250, (mode, sender)
            else:
                assert (code, text) == DENIED, (mode, sender)


@pytest.mark.parametrize("whitelist,allowed", [
    (["127.0.0.1"], True),
    (["127.0.0.0/8"], True),
    (["10.0.0.0/8", "127.0.0.1/32"], True),
    (["10.0.0.0/8", "::1"], False),
    (["192.0.2.0/24", "2001:db8::/32"], False),
])
def test_whitelist_ipv4(ingress_server, whitelist, allowed):
    server = ingress_server(config(whitelist=whitelist))
    with server.smtp() as client:
        client.ehlo()
        result = rcpt(client, "someone@example.org", "friend@remote.test")
        assert result[0] == 250 if allowed else result == DENIED


@pytest.mark.skipif(not ipv6_loopback(), reason="::1 is not available on this machine")
@pytest.mark.parametrize("whitelist,allowed", [
    (["::1"], True),
    (["::1/128"], True),
    (["0:0:0:0:0:0:0:1"], True),
    (["::/0"], True),
    (["127.0.0.1", "2001:db8::/32"], False),
    (["::2"], False),
])
def test_whitelist_ipv6(ingress_server, whitelist, allowed):
    server = ingress_server({**config(whitelist=whitelist),
                             "server": {"listen": ["127.0.0.1:0", "[::1]:0"]}})
    [(host, port)] = [(h, p) for h, p, _ in server.listeners if h == "::1"]
    with smtplib.SMTP(host, port, timeout=10) as client:
        client.ehlo()
        result = rcpt(client, "someone@example.org", "friend@remote.test")
        assert result[0] == 250 if allowed else result == DENIED
    with server.smtp() as client:  # the same server over IPv4: ::/0 does not cover it
        client.ehlo()
        result = rcpt(client, "someone@example.org", "friend@remote.test")
        assert result[0] == 250 if "127.0.0.1" in whitelist else result == DENIED


@pytest.mark.parametrize("authenticated", [True, False])
def test_authenticated_users_relay_when_allowed(ingress_server, authenticated):
    server = ingress_server(config(allow="nobody", authenticated=authenticated))
    with server.smtp() as client:
        client.ehlo()
        assert rcpt(client, "alice@example.test", "friend@remote.test") == DENIED
        client.rset()
        assert client.login("alice@example.test", "alicepw")[0] == 235  # CRAM-MD5
        result = rcpt(client, "alice@example.test", "friend@remote.test")
        assert result[0] == 250 if authenticated else result == DENIED
        if authenticated:
            client.data("Subject: relayed\r\n\r\nx\r\n")
    entries = server.queue_entries()
    assert [envelope["auth_user"] for envelope, _ in entries] == (
        ["alice@example.test"] if authenticated else [])


def test_denials_are_per_recipient(ingress_server):
    server = ingress_server(config())
    with server.smtp() as client:
        client.ehlo()
        client.mail("someone@example.org")
        assert client.rcpt("friend@remote.test") == DENIED
        assert client.rcpt("alice@example.test")[0] == 250
        assert client.data("Subject: x\r\n\r\nx\r\n")[0] == 250
    assert len(server.mailbox("alice@example.test")) == 1
    assert server.queue_entries() == []


# --- configuration -------------------------------------------------------------------------------


def check_config(tmp_path, relay: dict) -> subprocess.CompletedProcess:
    path = tmp_path / "ingress.json"
    path.write_text(json.dumps({"plugins": {"relay": relay}}))
    return subprocess.run([sys.executable, "-m", "ingress", "check-config", str(path)],
                          capture_output=True, text=True, timeout=60)


def test_check_config_warns_that_anyone_is_an_open_relay(tmp_path):
    result = check_config(tmp_path, {"allow": "anyone"})
    assert result.returncode == 0, "a warning, not an error"
    assert re.search(r"/plugins/relay/allow: warning: .*open relay", result.stderr)
    for mode in ("nobody", "local_users", "local_domains"):
        result = check_config(tmp_path, {"allow": mode})
        assert result.returncode == 0 and "warning" not in result.stderr, mode


def test_the_server_logs_the_open_relay_warning_at_start(ingress_server):
    server = ingress_server({"plugins": {"relay": {"allow": "anyone"}}})
    assert "/plugins/relay/allow: warning: 'anyone' makes this an open relay" in server.log()


VALID = ["127.0.0.1", "10.0.0.0/8", "192.0.2.7/32", "0.0.0.0/0", "::1", "::", "::/0",
         "2001:db8::/32", "fe80::1:2:3:4/64", "1:2:3:4:5:6:7:8", "::ffff:192.0.2.1",
         "2001:DB8:0:0:0:0:0:1/128", "10.1.2.3/8"]
INVALID = ["", "localhost", "256.0.0.1", "1.2.3", "10.0.0.0/33", "1.2.3.4/", "::/129",
           "1::2::3", "1:2:3:4:5:6:7:8:9", "12345::", "10.0.0.0/8 ", " 10.0.0.1", "10.0.0.0/-1",
           "fe80::1%eth0"]


def test_whitelist_entries_are_validated(tmp_path):
    # Two check-config runs, not one per entry: check-config reports every schema error, each
    # with its own pointer, so one list of all the invalid entries (after a valid one) must name
    # each of their indexes, and no other; one list of all the valid entries must pass.
    result = check_config(tmp_path, {"whitelist": VALID})
    assert result.returncode == 0, result.stderr
    result = check_config(tmp_path, {"whitelist": ["127.0.0.1", *INVALID]})
    assert result.returncode == 2, result.stderr
    named = set(map(int, re.findall(r"/plugins/relay/whitelist/(\d+): ", result.stderr)))
    for index, entry in enumerate(INVALID, start=1):
        assert index in named, (entry, result.stderr)
    assert named == set(range(1, len(INVALID) + 1)), result.stderr


def test_whitelist_pattern_agrees_with_ipaddress():
    """What the schema lets through, the plugin can parse (it would fail closed otherwise)."""
    import ipaddress
    import random

    import ingress_schemas

    pattern = re.compile(ingress_schemas.load("relay")["properties"]["whitelist"]["items"][
        "pattern"])
    rng = random.Random(6)
    samples = VALID + INVALID
    for _ in range(3000):
        parts = [f"{rng.getrandbits(16):x}" for _ in range(rng.randint(0, 8))]
        cut = rng.randint(0, len(parts))
        text = ":".join(parts) if rng.random() < 0.5 else (
            ":".join(parts[:cut]) + "::" + ":".join(parts[cut:]))
        samples.append(text + (f"/{rng.randint(0, 130)}" if rng.random() < 0.3 else ""))
        octets = [str(rng.randint(0, 300)) for _ in range(4)]
        samples.append(".".join(octets) + (f"/{rng.randint(0, 34)}" if rng.random() < .5 else ""))
    for text in samples:
        if pattern.search(text):
            ipaddress.ip_network(text, strict=False)  # must not raise


def test_anyone_turns_off_per_domain_statistics(ingress_plugin):
    for mode in MODES:
        relay = ingress_plugin(relay_plugin, {"allow": mode})
        assert relay.call("per_domain_statistics", config=relay.config) is (
            False if mode == "anyone" else None)


# SMTPUTF8 (PROTOCOL.md 2): a domain is local in its A-label and its U-label form alike.

IDN = {"directory": {"domains": ["bücher.example"]}}


@pytest.mark.parametrize("recipient", ["x@bücher.example", "x@XN--BCHER-KVA.example",
                                       "x@BÜCHER.example"])
def test_either_form_of_a_local_idn_is_never_a_relay(ingress_plugin, recipient):
    from ingress_plugins import relay

    plugin = ingress_plugin(relay, {"allow": "nobody"}, config=IDN)
    session = plugin.session(helo="client.test")
    transaction = plugin.transaction("a@elsewhere.test", session=session)
    assert plugin.call("on_rcpt", session=session, transaction=transaction,
                       recipient=plugin.recipient(recipient)) is None
    assert plugin.call("on_rcpt", session=session, transaction=transaction,
                       recipient=plugin.recipient("x@bücher.elsewhere")) == relay.DENIED


@pytest.mark.parametrize("sender", ["jörg@xn--bcher-kva.example", "jörg@Bücher.example"])
def test_local_domains_sender_in_either_form(ingress_plugin, sender):
    from ingress_plugins import relay

    plugin = ingress_plugin(relay, {"allow": "local_domains"}, config=IDN)
    session = plugin.session(helo="client.test")
    transaction = plugin.transaction(sender, {"SMTPUTF8": None}, session=session)
    assert plugin.call("on_rcpt", session=session, transaction=transaction,
                       recipient=plugin.recipient("y@例子.广告")) is None
    assert plugin.call("may_relay", session=session, transaction=transaction,
                       address="y@例子.广告") is True
