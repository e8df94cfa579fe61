"""auth: PLAIN, LOGIN and CRAM-MD5 against the directory, and the "disable ... for non-SSL"
switches; with smtplib, aiosmtplib, swaks and a byte-level client."""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import hmac
import os
import re
import smtplib
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import aiosmtplib
import argon2
import bcrypt
import pytest

from ingress.testing import eventually
from ingress_plugins.auth import cram_md5_digest

ARGON2 = argon2.PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1).hash("argonpw")
BCRYPT = bcrypt.hashpw(b"bcryptpw", bcrypt.gensalt(4)).decode()
USERS = [
    {"address": "alice@example.test", "password": "alicepw", "name": "Alice Example"},
    {"address": "argon@example.test", "password_hash": ARGON2},
    {"address": "crypt@example.test", "password_hash": BCRYPT},
]
DIRECTORY = {"domains": ["example.test"], "users": USERS}
HASH_ONLY = {"domains": ["example.test"], "users": USERS[1:]}
ALL = ("PLAIN", "LOGIN", "CRAM-MD5")
SWITCH = {"PLAIN": "disable_plain_without_tls", "LOGIN": "disable_login_without_tls",
          "CRAM-MD5": "disable_cram_md5_without_tls"}
ENCRYPTION_REQUIRED = (538, "5.7.11 Encryption required for requested authentication mechanism")


def config(directory=DIRECTORY, server=None, **switches) -> dict:
    return {"directory": directory, "server": server or {},
            "plugins": {"auth": switches}}


def open_switches() -> dict:
    return {name: False for name in SWITCH.values()}


def b64(text: str | bytes) -> str:
    return base64.b64encode(text.encode() if isinstance(text, str) else text).decode()


def advertised(client: smtplib.SMTP) -> list[str]:
    return client.esmtp_features.get("auth", "").upper().split()


def login(client: smtplib.SMTP, mechanism: str, user: str, password: str) -> tuple[int, bytes]:
    """AUTH with one given mechanism (smtplib's login() picks one itself)."""
    client.user, client.password = user, password
    method = {"PLAIN": client.auth_plain, "LOGIN": client.auth_login,
              "CRAM-MD5": client.auth_cram_md5}[mechanism]
    try:
        return client.auth(mechanism, method)
    except smtplib.SMTPAuthenticationError as exc:
        return exc.smtp_code, exc.smtp_error


def raw_auth_plain(raw, user: str, password: str, authzid: str = "") -> tuple[int, str]:
    return raw.cmd("AUTH PLAIN " + b64("\0".join((authzid, user, password))))


# --- advertising and the TLS switches ------------------------------------------------------------


@pytest.mark.parametrize("disabled", [(), ("auth",)])
def test_defaults_on_plaintext_offer_only_cram_md5(ingress_server, disabled):
    server = ingress_server(config(), disabled=disabled)
    with server.smtp() as client:
        client.ehlo()
        if disabled:
            assert not client.has_extn("auth")
            assert client.docmd("AUTH", "PLAIN")[0] == 502
            return
        assert advertised(client) == ["CRAM-MD5"]
        for mechanism in ("PLAIN", "LOGIN"):
            code, text = client.docmd("AUTH", mechanism)
            assert (code, text.decode()) == ENCRYPTION_REQUIRED
        assert client.login("alice@example.test", "alicepw")[0] == 235  # smtplib: CRAM-MD5


@pytest.mark.parametrize("disabled", [(), ("auth",)])
def test_mail_from_auth_parameter_is_accepted_when_well_formed(ingress_server, disabled):
    """RFC 4954 5: ``AUTH=<>`` or an xtext mailbox on MAIL FROM (relays such as Dovecot's
    submission service send it); checked for syntax, never trusted."""
    server = ingress_server(config(), disabled=disabled)
    with server.smtp() as client:
        client.ehlo()
        code, text = client.mail("bob@example.org", ["AUTH=<>"])
        if disabled:
            assert (code, text) == (555, b"5.5.4 MAIL parameter AUTH not supported")
            return
        assert code == 250, text
        client.rset()
        for value in ("alice@example.test", "b+2Bc@example.test", "alice"):
            assert client.mail("bob@example.org", [f"AUTH={value}"])[0] == 250, value
            client.rset()
        for value in ("a+2@example.test", "a+2b@example.test", "a+@b"):  # not xtext
            code, text = client.mail("bob@example.org", [f"AUTH={value}"])
            assert (code, text) == (501, b"5.5.4 Malformed AUTH parameter: not xtext"), value
        assert not client.sendmail("bob@example.org", ["alice@example.test"],
                                   b"Subject: relayed\r\n\r\nhi\r\n",
                                   mail_options=["AUTH=<>"])


def test_mail_from_auth_parameter_is_passed_on_as_empty(ingress_server):
    """What a client asserts with AUTH= is not vouched for: the relay queue's envelope holds
    AUTH=<> (RFC 4954 5), whatever the client sent."""
    server = ingress_server(config())
    with server.smtp() as client:
        client.ehlo()
        assert client.login("alice@example.test", "alicepw")[0] == 235  # may relay
        assert not client.sendmail("alice@example.test", ["carol@elsewhere.test"],
                                   b"Subject: relayed\r\n\r\nhi\r\n",
                                   mail_options=["AUTH=ceo@example.test"])
    [(envelope, _)] = server.queue_entries()
    assert envelope["mail_params"]["AUTH"] == "<>"


@pytest.mark.parametrize("mechanism", ALL)
def test_each_switch_hides_and_refuses_only_its_mechanism(ingress_server, mechanism):
    switches = {**open_switches(), SWITCH[mechanism]: True}
    server = ingress_server(config(**switches))
    with server.smtp() as client:
        client.ehlo()
        assert advertised(client) == [m for m in ALL if m != mechanism]
        code, text = client.docmd("AUTH", mechanism)
        assert (code, text.decode()) == ENCRYPTION_REQUIRED
    for other in ALL:
        if other != mechanism:
            with server.smtp() as client:
                client.ehlo()
                assert login(client, other, "alice@example.test", "alicepw")[0] == 235, other


def test_switches_off_everything_works_on_plaintext(ingress_server):
    server = ingress_server(config(**open_switches()))
    for mechanism in ALL:
        with server.smtp() as client:
            client.ehlo()
            assert advertised(client) == list(ALL)
            assert login(client, mechanism, "alice@example.test", "alicepw") == (
                235, b"2.7.0 Authentication successful")


@pytest.mark.parametrize("implicit", [False, True], ids=["starttls", "implicit-tls"])
def test_with_tls_every_mechanism_is_offered(ingress_server, tls, implicit):
    server = ingress_server(config(server=tls.server(implicit=True),
                                   **{name: True for name in SWITCH.values()}))
    for mechanism in ALL:
        if implicit:
            client = smtplib.SMTP_SSL(server.host, server.tls_port, context=tls.context(),
                                      timeout=10)
        else:
            client = server.smtp()
            client.ehlo()
            assert client.esmtp_features.get("auth") is None, "all three disabled in plaintext"
            client.starttls(context=tls.context())
        with client:
            client.ehlo()
            assert advertised(client) == list(ALL)
            assert login(client, mechanism, "alice@example.test", "alicepw")[0] == 235


def test_cram_md5_is_offered_only_when_a_user_has_a_plaintext_password(ingress_server, tls):
    server = ingress_server(config(directory=HASH_ONLY, server=tls.server(implicit=True)))
    with smtplib.SMTP_SSL(server.host, server.tls_port, context=tls.context(),
                          timeout=10) as client:
        client.ehlo()
        assert advertised(client) == ["PLAIN", "LOGIN"]
        assert client.docmd("AUTH", "CRAM-MD5")[:1] == (504,)
        assert login(client, "PLAIN", "argon@example.test", "argonpw")[0] == 235


# --- credentials ---------------------------------------------------------------------------------


CREDENTIALS = [
    # mechanism, user, password, expected code
    ("PLAIN", "alice@example.test", "alicepw", 235),
    ("PLAIN", "ALICE@Example.Test", "alicepw", 235),
    ("PLAIN", "alice@example.test", "wrong", 535),
    ("PLAIN", "nobody@example.test", "alicepw", 535),
    ("PLAIN", "argon@example.test", "argonpw", 235),
    ("PLAIN", "argon@example.test", "wrong", 535),
    ("PLAIN", "crypt@example.test", "bcryptpw", 235),
    ("LOGIN", "alice@example.test", "alicepw", 235),
    ("LOGIN", "alice@example.test", "wrong", 535),
    ("LOGIN", "nobody@example.test", "x", 535),
    ("LOGIN", "argon@example.test", "argonpw", 235),
    ("LOGIN", "crypt@example.test", "wrong", 535),
    ("CRAM-MD5", "alice@example.test", "alicepw", 235),
    ("CRAM-MD5", "alice@example.test", "wrong", 535),
    ("CRAM-MD5", "nobody@example.test", "alicepw", 535),
    ("CRAM-MD5", "argon@example.test", "argonpw", 535),  # hash only: no shared secret
    ("CRAM-MD5", "crypt@example.test", "bcryptpw", 535),
]


def test_credentials_against_the_directory(ingress_server, tls):
    server = ingress_server(config(server=tls.server(implicit=True), failure_delay=0))
    for mechanism, user, password, expected in CREDENTIALS:
        with smtplib.SMTP_SSL(server.host, server.tls_port, context=tls.context(),
                              timeout=10) as client:
            client.ehlo()
            code, text = login(client, mechanism, user, password)
            assert code == expected, (mechanism, user, password, code, text)
            if code == 535:
                assert text == b"5.7.8 Authentication credentials invalid"


def test_aiosmtplib_login_over_starttls_and_implicit_tls(ingress_server, tls):
    server = ingress_server(config(server=tls.server(implicit=True)))

    async def run():
        async with aiosmtplib.SMTP(hostname=server.host, port=server.port, start_tls=True,
                                   tls_context=tls.context()) as client:
            assert (await client.login("alice@example.test", "alicepw")).code == 235
            await client.sendmail("alice@example.test", ["alice@example.test"],
                                  "Subject: aio\r\n\r\nx\r\n")
        for name in ("auth_plain", "auth_login", "auth_crammd5"):
            async with aiosmtplib.SMTP(hostname=server.host, port=server.tls_port, use_tls=True,
                                       tls_context=tls.context()) as client:
                await client.ehlo()
                response = await getattr(client, name)("alice@example.test", "alicepw")
                assert response.code == 235, name

    asyncio.run(run())
    assert len(server.mailbox("alice@example.test")) == 1


def swaks(server, *args: str) -> subprocess.CompletedProcess:
    from conftest import need

    return subprocess.run(
        [need("swaks"), "--server", f"{server.host}:{server.port}", "--from",
         "alice@example.test", "--to", "alice@example.test", "--auth-user", "alice@example.test",
         "--quit-after", "AUTH", *args],
        capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("mechanism", ALL)
def test_swaks_over_starttls(ingress_server, tls, mechanism):
    server = ingress_server(config(server=tls.server(), failure_delay=0,
                                   **{name: True for name in SWITCH.values()}))
    result = swaks(server, "--tls", "--auth", mechanism, "--auth-password", "alicepw")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "235 2.7.0" in result.stdout
    result = swaks(server, "--tls", "--auth", mechanism, "--auth-password", "wrong")
    assert result.returncode != 0 and "535 5.7.8" in result.stdout


def test_swaks_in_plaintext_gets_only_cram_md5(ingress_server):
    server = ingress_server(config())
    result = swaks(server, "--auth", "CRAM-MD5", "--auth-password", "alicepw")
    assert result.returncode == 0 and "235 2.7.0" in result.stdout, result.stdout
    result = swaks(server, "--auth", "PLAIN", "--auth-password", "alicepw")
    assert result.returncode != 0
    assert "235" not in result.stdout


# --- the exchange, as the contract words it ------------------------------------------------------


@pytest.mark.parametrize("disabled", [(), ("auth",)])
def test_exchange_replies(ingress_server, disabled):
    settings = config(**open_switches(), failure_delay=0)
    settings["plugins"]["max_bad_commands"] = {"limit": 0}  # this test makes many errors on purpose
    server = ingress_server(settings, disabled=disabled)
    with server.raw() as raw:
        raw.reply()
        assert raw.cmd("AUTH PLAIN")[0] == 503  # before EHLO
        raw.cmd("EHLO c")
        if disabled:
            assert raw.cmd("AUTH PLAIN")[0] == 502
            return
        assert raw.cmd("AUTH PLAIN") == (334, "")
        assert raw.cmd("*") == (501, "5.7.0 Authentication cancelled")
        assert raw.cmd("AUTH LOGIN") == (334, b64("Username:"))
        assert raw.cmd("*") == (501, "5.7.0 Authentication cancelled")
        assert raw.cmd("AUTH PLAIN not^base64")[:2] == (501, "5.5.2 Cannot decode response")
        assert raw.cmd("AUTH LOGIN") == (334, b64("Username:"))
        assert raw.cmd("%%%")[:2] == (501, "5.5.2 Cannot decode response")
        assert raw.cmd(f"AUTH PLAIN {b64('no separators')}")[0] == 501
        assert raw.cmd(f"AUTH CRAM-MD5 {b64('alice@example.test 00')}")[0] == 501  # server first
        assert raw.cmd("AUTH XFOO")[:2] == (504, "5.5.4 Unrecognized authentication type")
        assert raw_auth_plain(raw, "alice@example.test", "alicepw", authzid="bob@example.test")[
            :2] == (535, "5.7.8 Authentication credentials invalid")
        raw.cmd("MAIL FROM:<a@example.org>")
        assert raw.cmd("AUTH PLAIN")[:2] == (
            503, "5.5.1 AUTH not allowed during a mail transaction")
        raw.cmd("RSET")
        assert raw.cmd("AUTH LOGIN " + b64("alice@example.test")) == (334, b64("Password:"))
        assert raw.cmd(b64("alicepw")) == (235, "2.7.0 Authentication successful")
        assert raw.cmd("AUTH PLAIN")[:2] == (503, "5.5.1 Already authenticated")
        assert raw.cmd("NOOP")[0] == 250


def test_plain_without_initial_response_and_with_own_authzid(ingress_server):
    server = ingress_server(config(**open_switches()))
    with server.raw() as raw:
        raw.reply()
        raw.cmd("EHLO c")
        assert raw.cmd("AUTH PLAIN") == (334, "")
        assert raw.cmd(b64("alice@example.test\0alice@example.test\0alicepw"))[0] == 235


def test_cram_md5_rfc_2195_example():
    challenge = b"<1896.697170952@postoffice.reston.mci.net>"
    assert cram_md5_digest("tanstaaftanstaaf", challenge) == "b913a602c7eda7a495b4e6e7334d3890"


def test_cram_md5_exchange_with_the_rfc_2195_challenge(ingress_inprocess_server, monkeypatch):
    """The RFC's own exchange through a real server whose challenge is fixed to the RFC's."""
    import ingress_plugins.auth

    monkeypatch.setattr(ingress_plugins.auth, "new_challenge",
                        lambda hostname: b"<1896.697170952@postoffice.reston.mci.net>")
    server = ingress_inprocess_server(config(directory={"domains": ["example.test"], "users": [
        {"address": "tim@example.test", "password": "tanstaaftanstaaf"}]}))
    with server.raw() as raw:
        raw.reply()
        raw.cmd("EHLO c")
        assert raw.cmd("AUTH CRAM-MD5") == (
            334, "PDE4OTYuNjk3MTcwOTUyQHBvc3RvZmZpY2UucmVzdG9uLm1jaS5uZXQ+")
        assert raw.cmd(b64("tim@example.test b913a602c7eda7a495b4e6e7334d3890"))[0] == 235


def test_cram_md5_challenge_is_fresh_and_names_the_server(ingress_server):
    server = ingress_server(config())
    challenges = set()
    for _ in range(3):
        with server.raw() as raw:
            raw.reply()
            raw.cmd("EHLO c")
            code, text = raw.cmd("AUTH CRAM-MD5")
            assert code == 334
            challenge = base64.b64decode(text)
            assert challenge.startswith(b"<") and challenge.endswith(b"@mx.test>")
            challenges.add(challenge)
            digest = hmac.new(b"alicepw", challenge, "md5").hexdigest()
            assert raw.cmd(b64(f"alice@example.test {digest}"))[0] == 235
    assert len(challenges) == 3


# --- state, brute force, timing ------------------------------------------------------------------


def test_starttls_forgets_the_authentication(ingress_server, tls):
    server = ingress_server(config(server=tls.server()))
    with server.smtp() as client:
        client.ehlo()
        assert client.login("alice@example.test", "alicepw")[0] == 235  # CRAM-MD5, plaintext
        client.starttls(context=tls.context())
        client.ehlo()
        assert login(client, "PLAIN", "alice@example.test", "alicepw")[0] == 235, (
            "a second AUTH would be 503 if the plaintext authentication had survived")


@pytest.mark.parametrize("mechanism", ["PLAIN", "CRAM-MD5"])
def test_brute_force_gets_535_each_time_and_the_session_stays_consistent(ingress_server,
                                                                         mechanism):
    # Five attempts per session: below the default bad-command limit (8) of max_bad_commands,
    # which counts 535 and would end the session at the 8th.
    server = ingress_server(config(**open_switches(), failure_delay=0))
    for _session in range(3):
        with server.smtp() as client:
            client.ehlo()
            for attempt in range(5):
                code, text = login(client, mechanism, "alice@example.test", f"guess{attempt}")
                assert (code, text) == (535, b"5.7.8 Authentication credentials invalid")
                assert client.noop()[0] == 250
            client.mail("alice@example.test")
            assert client.rcpt("someone@remote.test")[0] == 550, "still not authenticated"
            client.rset()
            assert login(client, mechanism, "alice@example.test", "alicepw")[0] == 235
            client.mail("alice@example.test")
            assert client.rcpt("someone@remote.test")[0] == 250, "authenticated relays"


@pytest.mark.parametrize("disabled", [(), ("auth",)])
def test_unknown_and_known_users_cost_one_hash_check_each(ingress_inprocess_server, monkeypatch,
                                                          disabled):
    """No timing oracle: every PLAIN/LOGIN attempt performs exactly one slow hash verification,
    whether the user exists, has a plaintext password or a hash, or got the password right."""
    import ingress.directory

    calls = []
    real = ingress.directory._check_hash

    def counting(password_hash, password):
        calls.append(password_hash)
        return real(password_hash, password)

    monkeypatch.setattr(ingress.directory, "_check_hash", counting)
    if disabled:
        monkeypatch.setenv("INGRESS_DISABLE_PLUGINS", ",".join(disabled))
    server = ingress_inprocess_server(config(**open_switches(), failure_delay=0))
    attempts = [
        ("PLAIN", "nobody@example.test", "x", "$argon2"),  # the dummy hash
        ("PLAIN", "alice@example.test", "wrong", "$argon2"),  # plaintext user: the dummy too
        ("PLAIN", "alice@example.test", "alicepw", "$argon2"),
        ("PLAIN", "argon@example.test", "wrong", ARGON2),  # its own hash
        ("LOGIN", "nobody@example.test", "x", "$argon2"),
        ("LOGIN", "crypt@example.test", "wrong", BCRYPT),
    ]
    for mechanism, user, password, hashed in attempts:
        with server.smtp() as client:
            client.ehlo()
            calls.clear()
            code, _ = login(client, mechanism, user, password)
            if disabled:
                assert code == 502 and calls == []
            else:
                assert code == (235 if password == "alicepw" else 535)
                assert len(calls) == 1 and calls[0].startswith(hashed), (mechanism, user, calls)


# --- failure_delay and the password check pool ---------------------------------------------------

DELAY = 1.0  # the assertions are lower bounds the contract demands, never upper ones, so a
# shorter delay is as strict; it stays twice the 0.5 s command_timeout of the test below


def timed_failure(server, mechanism: str, user: str, password: str) -> tuple[int, str, float]:
    """One failing AUTH on a fresh session: the reply and the seconds from just before the AUTH
    command (PLAIN) or the client's last answer to a 334 (LOGIN, CRAM-MD5) went out."""
    with server.raw() as raw:
        raw.sock.settimeout(30)
        raw.reply()
        raw.cmd("EHLO c")
        if mechanism == "PLAIN":
            started = time.monotonic()
            code, text = raw_auth_plain(raw, user, password)
        elif mechanism == "LOGIN":
            assert raw.cmd("AUTH LOGIN")[0] == 334
            assert raw.cmd(b64(user))[0] == 334
            started = time.monotonic()
            code, text = raw.cmd(b64(password))
        else:
            code, challenge = raw.cmd("AUTH CRAM-MD5")
            assert code == 334
            digest = hmac.new(password.encode(), base64.b64decode(challenge), "md5").hexdigest()
            started = time.monotonic()
            code, text = raw.cmd(b64(f"{user} {digest}"))
        return code, text, time.monotonic() - started


FAILURES = [
    ("PLAIN", "nobody@example.test", "x"),  # unknown user: the dummy hash
    ("PLAIN", "alice@example.test", "wrong"),  # plaintext user
    ("PLAIN", "argon@example.test", "wrong"),
    ("PLAIN", "crypt@example.test", "wrong"),
    ("LOGIN", "nobody@example.test", "x"),
    ("LOGIN", "argon@example.test", "wrong"),
    ("LOGIN", "crypt@example.test", "wrong"),
    ("CRAM-MD5", "nobody@example.test", "x"),
    ("CRAM-MD5", "alice@example.test", "wrong"),
    ("CRAM-MD5", "argon@example.test", "argonpw"),  # hash only: no shared secret
]


def test_every_failure_is_answered_no_sooner_than_failure_delay(ingress_server):
    server = ingress_server(config(**open_switches(), failure_delay=DELAY))
    with concurrent.futures.ThreadPoolExecutor(len(FAILURES)) as threads:
        results = list(threads.map(lambda case: timed_failure(server, *case), FAILURES))
    for case, (code, text, seconds) in zip(FAILURES, results, strict=True):
        assert (code, text) == (535, "5.7.8 Authentication credentials invalid"), case
        assert seconds >= DELAY, (case, seconds)


def test_acting_as_someone_else_is_delayed_too(ingress_server):
    server = ingress_server(config(**open_switches(), failure_delay=DELAY))
    with server.raw() as raw:
        raw.reply()
        raw.cmd("EHLO c")
        started = time.monotonic()
        code, _ = raw_auth_plain(raw, "alice@example.test", "alicepw", authzid="argon@example.test")
        assert code == 535 and time.monotonic() - started >= DELAY


def test_failure_after_starttls_is_delayed_too(ingress_server, tls):
    server = ingress_server(config(server=tls.server(), failure_delay=DELAY))
    with server.raw() as raw:
        raw.sock.settimeout(30)
        raw.reply()
        raw.cmd("EHLO c")
        assert raw.starttls(tls.context(), server_hostname="mx.test")[0] == 220
        raw.cmd("EHLO c")
        started = time.monotonic()
        assert raw_auth_plain(raw, "crypt@example.test", "wrong")[0] == 535
        assert time.monotonic() - started >= DELAY
        assert raw_auth_plain(raw, "crypt@example.test", "bcryptpw")[0] == 235


def test_success_is_not_delayed(ingress_server):
    """With a failure_delay of 30 s, right passwords are answered at once: well before 15 s
    (the client would time out at 20 s), by every mechanism and hash type."""
    server = ingress_server(config(**open_switches(), failure_delay=30))
    successes = [("PLAIN", "alice@example.test", "alicepw"),
                 ("PLAIN", "argon@example.test", "argonpw"),
                 ("LOGIN", "crypt@example.test", "bcryptpw"),
                 ("CRAM-MD5", "alice@example.test", "alicepw")]
    for mechanism, user, password in successes:
        with server.smtp(timeout=20) as client:
            client.ehlo()
            started = time.monotonic()
            assert login(client, mechanism, user, password)[0] == 235, (mechanism, user)
            assert time.monotonic() - started < 15, (mechanism, user)


def test_delay_is_server_time_not_the_clients_command_timer(ingress_server):
    """A failure_delay longer than command_timeout: the client waits for our answer, so the
    command timer does not run and the answer is the 535, not a 421."""
    settings = config(**open_switches(), failure_delay=DELAY)
    settings["plugins"]["command_timeout"] = {"seconds": 0.5}
    server = ingress_server(settings)
    code, text, seconds = timed_failure(server, "PLAIN", "argon@example.test", "wrong")
    assert (code, seconds >= DELAY) == (535, True)
    code, text, seconds = timed_failure(server, "LOGIN", "crypt@example.test", "wrong")
    assert (code, seconds >= DELAY) == (535, True)


def test_max_bad_commands_closes_after_the_delayed_535(ingress_server):
    settings = config(**open_switches(), failure_delay=DELAY)
    settings["plugins"]["max_bad_commands"] = {"limit": 2}
    server = ingress_server(settings)
    with server.raw() as raw:
        raw.sock.settimeout(30)
        raw.reply()
        raw.cmd("EHLO c")
        assert raw_auth_plain(raw, "argon@example.test", "guess1")[0] == 535
        started = time.monotonic()
        assert raw_auth_plain(raw, "argon@example.test", "guess2")[0] == 535
        assert time.monotonic() - started >= DELAY
        assert raw.reply() == (421, "4.7.0 Too many errors")
        assert raw.closed_by_server()


def test_pipelined_attempts_wait_one_delay_each(ingress_server):
    """The delay runs from when the server reads each AUTH, so guesses sent all at once are
    still answered at most one per failure_delay."""
    server = ingress_server(config(**open_switches(), failure_delay=DELAY))
    with server.raw() as raw:
        raw.sock.settimeout(30)
        raw.reply()
        raw.cmd("EHLO c")
        started = time.monotonic()
        raw.send("".join(f"AUTH PLAIN {b64(chr(0) + 'argon@example.test' + chr(0) + str(n))}\r\n"
                         for n in range(3)))
        assert [raw.reply()[0] for _ in range(3)] == [535, 535, 535]
        assert time.monotonic() - started >= 3 * DELAY


def test_client_that_leaves_during_the_delay(ingress_server):
    server = ingress_server(config(**open_switches(), failure_delay=DELAY))
    for mechanism in ("PLAIN", "CRAM-MD5"):
        with server.raw() as raw:
            raw.reply()
            raw.cmd("EHLO c")
            if mechanism == "PLAIN":
                raw.send(f"AUTH PLAIN {b64(chr(0) + 'argon@example.test' + chr(0) + 'x')}\r\n")
            else:
                raw.cmd("AUTH CRAM-MD5")
                raw.send(b64("alice@example.test " + "0" * 32) + "\r\n")
    with server.raw() as raw:  # the server goes on as before
        raw.reply()
        raw.cmd("EHLO c")
        assert raw_auth_plain(raw, "argon@example.test", "argonpw")[0] == 235
    eventually(lambda: server.log().count(" ended: ") >= 3, what="sessions ended")
    assert "Traceback" not in server.log()


SLOW_ARGON2 = argon2.PasswordHasher(time_cost=3, memory_cost=16384, parallelism=1).hash("pw")


def metric(server, name: str) -> float:
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    found = re.search(rf"^{name} (\S+)$", text, re.M)
    assert found, f"{name} not in /metrics"
    return float(found[1])


def test_password_checks_run_at_most_one_per_cpu_at_once(ingress_server):
    """A flood of failing AUTHs from many sessions at once: the server's own count of checks
    running at the same time (``ingress_auth_checks_running_max``) reaches one per CPU and never
    more, and every session still gets its 535."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    server = ingress_server({
        "directory": {"domains": ["example.test"], "users": [
            {"address": "slow@example.test", "password_hash": SLOW_ARGON2}]},
        "server": {"metrics_listen": "127.0.0.1:0"},
        "plugins": {"auth": {**open_switches(), "failure_delay": 0}},
    })
    users = ["slow@example.test", "nobody@example.test"]  # unknown: the dummy, made like it
    barrier = threading.Barrier(2 * cpus + 2)

    def attempt(n: int) -> int:
        with server.raw() as raw:
            raw.sock.settimeout(60)
            raw.reply()
            raw.cmd("EHLO c")
            barrier.wait(timeout=30)
            return raw_auth_plain(raw, users[n % 2], f"guess{n}")[0]

    with concurrent.futures.ThreadPoolExecutor(barrier.parties) as threads:
        codes = list(threads.map(attempt, range(barrier.parties)))
    assert codes == [535] * barrier.parties
    assert metric(server, "ingress_auth_checks_running_max") == cpus
    assert metric(server, "ingress_auth_checks_running") == 0
    assert metric(server, "ingress_auth_checks_waiting") == 0
    if sys.platform.startswith("linux"):
        # The pool's threads are there, one per CPU, and give way to the event loop's thread.
        nice = {int(task.name): int((task / "stat").read_text().rsplit(")", 1)[1].split()[16])
                for task in Path(f"/proc/{server.pid}/task").iterdir()}
        assert list(nice.values()).count(10) == cpus, nice  # nice +10
        assert nice[server.pid] == 0, nice


def test_checks_of_clients_that_reset_before_their_turn_are_skipped(ingress_server):
    """Sessions that send a failing AUTH and reset the connection at once: those whose check
    had not started when they left cost no hash (``ingress_auth_checks_skipped``)."""
    server = ingress_server({
        "directory": {"domains": ["example.test"], "users": [
            {"address": "slow@example.test", "password_hash": SLOW_ARGON2}]},
        "server": {"metrics_listen": "127.0.0.1:0"},
        "plugins": {"auth": {**open_switches(), "failure_delay": 0}},
    })
    sessions = 4 * (os.cpu_count() or 1) + 4
    clients = []
    for _ in range(sessions):
        raw = server.raw()
        raw.reply()
        raw.cmd("EHLO c")
        clients.append(raw)
    for n, raw in enumerate(clients):
        raw.send(f"AUTH PLAIN {b64(chr(0) + 'slow@example.test' + chr(0) + str(n))}\r\n")
    for raw in clients:  # reset, not FIN: the server sees the connection gone at once
        raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        raw.close()
    eventually(lambda: metric(server, "ingress_auth_checks_waiting") == 0
               and metric(server, "ingress_auth_checks_running") == 0, what="queue drained")
    assert metric(server, "ingress_auth_checks_skipped_total") >= 1
    with server.raw() as raw:
        raw.reply()
        raw.cmd("EHLO c")
        assert raw_auth_plain(raw, "slow@example.test", "pw")[0] == 235
