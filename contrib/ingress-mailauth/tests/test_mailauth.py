"""mailauth against a real ingress server (the installed entry point), real SMTP clients and a
DNS server of the tests' own on 127.0.0.1 (conftest.py): never the internet. Messages are
signed here, with keys made for the session."""

from __future__ import annotations

import email
import re
import smtplib
import subprocess
import sys
import time

import dkim
import pytest

LOCAL = {"directory": {"domains": ["example.test"],
                       "domain_settings": {"example.test": {"catch_all": True}}}}
RCPT = "bob@example.test"
SENDER = "alice@sender.test"
PASS_HEADER = ("mx.test; spf=pass smtp.mailfrom=alice@sender.test; "
               "dkim=pass header.d=sender.test header.s=sel; "
               "dmarc=pass header.from=sender.test; arc=none")


def mailauth(nameserver: str, **settings) -> dict:
    return {**LOCAL, "plugins": {"mailauth": {"nameservers": [nameserver], "dns_timeout": 3,
                                              **settings}}}


def publish(zone, keys, *, dmarc: str = "v=DMARC1; p=reject") -> None:
    """sender.test: SPF allowing 127.0.0.1, key "sel" (RSA) and "ed" (ed25519), DMARC."""
    zone.txt["sender.test"] = ["v=spf1 ip4:127.0.0.1 -all"]
    zone.txt["sel._domainkey.sender.test"] = [keys["rsa"].record]
    zone.txt["ed._domainkey.sender.test"] = [keys["ed25519"].record]
    zone.txt["_dmarc.sender.test"] = [dmarc]


def message(author: str = SENDER, body: bytes = b"Hello Bob, lunch on Friday?\r\n",
            extra: bytes = b"") -> bytes:
    head = (f"From: Alice <{author}>\r\nTo: Bob <{RCPT}>\r\nSubject: lunch\r\n"
            "Message-ID: <1@sender.test>\r\nDate: Sun, 06 Dec 2026 15:00:00 +0000\r\n").encode()
    return head + extra + b"\r\n" + body


def signed(msg: bytes, key, domain: str = "sender.test", selector: str = "sel") -> bytes:
    return dkim.sign(msg, selector.encode(), domain.encode(), key.private,
                     signature_algorithm=key.algorithm,
                     include_headers=[b"from", b"to", b"subject", b"date"]) + msg


def send(server, msg: bytes, mail_from: str = SENDER, helo: str = "client.sender.test"
         ) -> tuple[int, bytes]:
    """The reply to the end of DATA (or to MAIL when it is refused)."""
    with server.smtp() as client:
        client.ehlo(helo)
        try:
            client.sendmail(mail_from, [RCPT], msg)
        except smtplib.SMTPSenderRefused as exc:
            return exc.smtp_code, exc.smtp_error
        except smtplib.SMTPDataError as exc:
            return exc.smtp_code, exc.smtp_error
        assert client.noop()[0] == 250
    return 250, b""


def results(raw: bytes) -> list[str]:
    """Every Authentication-Results value of a stored message, unfolded, in order."""
    parsed = email.message_from_bytes(raw)
    return [re.sub(r"\r?\n", "", v) for v in parsed.get_all("Authentication-Results", [])]


def ours(server, folder: str | None = None) -> str:
    """Our header of the one stored message, checked to be its first line after Return-Path."""
    [raw] = server.mailbox(RCPT, folder)
    lines = raw.split(b"\r\n")
    assert lines[0].startswith(b"Return-Path:")
    assert lines[1].startswith(b"Authentication-Results: mx.test;")
    return results(raw)[0]


def methods(header: str) -> dict[str, str]:
    """``{"spf": "pass smtp.mailfrom=...", ...}`` (for dkim: the first signature's)."""
    found: dict[str, str] = {}
    for part in header.split(";")[1:]:
        method, _, rest = part.strip().partition("=")
        found.setdefault(method, rest)
    return found


# --- results -----------------------------------------------------------------------------------


@pytest.mark.parametrize("enabled", [True, False])
def test_everything_passes(ingress_server, zone, keys, enabled):
    publish(zone, keys)
    server = ingress_server(mailauth(zone.nameserver) if enabled else LOCAL)
    assert send(server, signed(message(), keys["rsa"]))[0] == 250
    if enabled:
        assert ours(server) == PASS_HEADER
    else:
        [raw] = server.mailbox(RCPT)
        assert results(raw) == []
        assert zone.questions == []


def test_ed25519_signature_passes(ingress_server, zone, keys):
    publish(zone, keys)
    server = ingress_server(mailauth(zone.nameserver))
    assert send(server, signed(message(), keys["ed25519"], selector="ed"))[0] == 250
    assert methods(ours(server))["dkim"] == "pass header.d=sender.test header.s=ed"


def test_altered_body_fails_dkim(ingress_server, zone, keys):
    publish(zone, keys)
    server = ingress_server(mailauth(zone.nameserver))
    msg = signed(message(), keys["rsa"]).replace(b"Friday", b"Monday")
    assert send(server, msg)[0] == 250
    found = methods(ours(server))
    assert found["dkim"] == "fail (body hash mismatch) header.d=sender.test header.s=sel"
    assert found["dmarc"] == "pass header.from=sender.test"  # SPF is aligned and passes


def test_wrong_key_fails_dkim(ingress_server, zone, keys):
    publish(zone, keys)
    server = ingress_server(mailauth(zone.nameserver))
    assert send(server, signed(message(), keys["other"]))[0] == 250
    assert methods(ours(server))["dkim"] == "fail header.d=sender.test header.s=sel"


def test_every_signature_is_reported(ingress_server, zone, keys):
    publish(zone, keys)
    zone.txt["sel._domainkey.relay.test"] = [keys["rsa"].record]
    server = ingress_server(mailauth(zone.nameserver))
    msg = signed(signed(message(), keys["ed25519"], selector="ed"), keys["other"],
                 domain="relay.test")
    assert send(server, msg)[0] == 250
    header = ours(server)
    assert ("; dkim=fail header.d=relay.test header.s=sel; "
            "dkim=pass header.d=sender.test header.s=ed; ") in header


def test_missing_records(ingress_server, zone, keys):
    server = ingress_server(mailauth(zone.nameserver))
    msg = signed(message("alice@nothing.test"), keys["rsa"], domain="nothing.test")
    assert send(server, msg, mail_from="alice@nothing.test")[0] == 250
    assert ours(server) == (
        "mx.test; spf=none smtp.mailfrom=alice@nothing.test; "
        "dkim=permerror (no key) header.d=nothing.test header.s=sel; "
        "dmarc=none header.from=nothing.test; arc=none")
    assert ("_dmarc.nothing.test", "TXT") in zone.questions
    assert ("sel._domainkey.nothing.test", "TXT") in zone.questions


def test_unsigned_message(ingress_server, zone, keys):
    publish(zone, keys)
    server = ingress_server(mailauth(zone.nameserver))
    assert send(server, message())[0] == 250
    found = methods(ours(server))
    assert found["dkim"] == "none"
    assert found["dmarc"] == "pass header.from=sender.test"


def test_silent_dns_is_a_temperror_and_the_message_goes_on(ingress_server, keys,
                                                           silent_nameserver):
    server = ingress_server(mailauth(silent_nameserver, dns_timeout=0.5, spf="reject",
                                     dmarc="enforce"))
    started = time.monotonic()
    assert send(server, signed(message(), keys["rsa"]))[0] == 250
    assert time.monotonic() - started < 3
    assert ours(server) == (
        "mx.test; spf=temperror smtp.mailfrom=alice@sender.test; "
        "dkim=temperror header.d=sender.test header.s=sel; "
        "dmarc=temperror header.from=sender.test; arc=none")


def test_spf_fail_is_tagged_by_default(ingress_server, zone, keys):
    publish(zone, keys)
    zone.txt["sender.test"] = ["v=spf1 ip4:192.0.2.1 -all"]
    server = ingress_server(mailauth(zone.nameserver))
    assert send(server, message())[0] == 250
    found = methods(ours(server))
    assert found["spf"] == "fail smtp.mailfrom=alice@sender.test"
    assert found["dmarc"] == "fail header.from=sender.test"  # tag: reported, not enforced


@pytest.mark.parametrize("record, code", [("v=spf1 ip4:192.0.2.1 -all", 550),
                                          ("v=spf1 ip4:192.0.2.1 ~all", 250),
                                          ("v=spf1 include:missing.test -all", 250)])
def test_spf_reject_refuses_only_a_fail_at_mail(ingress_server, zone, record, code):
    zone.txt["sender.test"] = [record]
    server = ingress_server(mailauth(zone.nameserver, spf="reject"))
    with server.smtp() as client:
        client.ehlo("client.sender.test")
        reply = client.mail(SENDER)
        assert client.noop()[0] == 250
    if code == 550:
        assert reply == (550, b"5.7.23 SPF validation failed")
    else:
        assert reply[0] == 250


def test_null_sender_checks_the_helo_name(ingress_server, zone, keys):
    publish(zone, keys)
    zone.txt["mail.sender.test"] = ["v=spf1 a -all"]
    zone.a["mail.sender.test"] = ["127.0.0.1"]
    server = ingress_server(mailauth(zone.nameserver))
    assert send(server, message(), mail_from="", helo="mail.sender.test")[0] == 250
    found = methods(ours(server))
    assert found["spf"] == "pass smtp.helo=mail.sender.test"
    assert found["dmarc"] == "pass header.from=sender.test"  # the HELO name aligns (relaxed)


# --- DMARC: alignment and policies ------------------------------------------------------------


@pytest.mark.parametrize("adkim, code", [("r", 250), ("s", 550)])
def test_dkim_alignment_relaxed_and_strict(ingress_server, zone, keys, adkim, code):
    """From: news.sender.test, signed by sender.test, MAIL FROM elsewhere (SPF not aligned)."""
    publish(zone, keys, dmarc=f"v=DMARC1; p=reject; adkim={adkim}")
    zone.txt["other.test"] = ["v=spf1 ip4:127.0.0.1 -all"]
    server = ingress_server(mailauth(zone.nameserver, dmarc="enforce"))
    msg = signed(message("alice@news.sender.test"), keys["rsa"])
    reply = send(server, msg, mail_from="bounces@other.test")
    if code == 250:
        assert reply[0] == 250
        assert methods(ours(server))["dmarc"] == "pass header.from=news.sender.test"
    else:
        assert reply == (550, b"5.7.1 Rejected by DMARC policy of news.sender.test")
        assert server.mailbox(RCPT) == []
    assert ("_dmarc.news.sender.test", "TXT") in zone.questions


@pytest.mark.parametrize("aspf, result", [("r", "pass"), ("s", "fail")])
def test_spf_alignment_relaxed_and_strict(ingress_server, zone, keys, aspf, result):
    publish(zone, keys, dmarc=f"v=DMARC1; p=none; aspf={aspf}")
    zone.txt["bounce.sender.test"] = ["v=spf1 ip4:127.0.0.1 -all"]
    server = ingress_server(mailauth(zone.nameserver))
    assert send(server, message(), mail_from="x@bounce.sender.test")[0] == 250
    found = methods(ours(server))
    assert found["spf"] == "pass smtp.mailfrom=x@bounce.sender.test"
    assert found["dmarc"] == f"{result} header.from=sender.test"


def test_p_reject_is_enforced_only_when_asked(ingress_server, zone, keys):
    publish(zone, keys)
    zone.txt["sender.test"] = ["v=spf1 -all"]
    enforcing = ingress_server(mailauth(zone.nameserver, dmarc="enforce"), name="enforcing")
    tagging = ingress_server(mailauth(zone.nameserver), name="tagging")
    msg = signed(message(), keys["other"])  # a DKIM fail and an SPF fail
    assert send(enforcing, msg) == (550, b"5.7.1 Rejected by DMARC policy of sender.test")
    assert send(tagging, msg)[0] == 250
    assert methods(ours(tagging))["dmarc"] == "fail header.from=sender.test"


def test_p_quarantine_is_quarantined(ingress_server, zone, keys):
    publish(zone, keys, dmarc="v=DMARC1; p=quarantine")
    zone.txt["sender.test"] = ["v=spf1 -all"]
    server = ingress_server(mailauth(zone.nameserver, dmarc="enforce"))
    assert send(server, message())[0] == 250
    assert server.mailbox(RCPT) == []
    assert methods(ours(server, "Quarantine"))["dmarc"] == "fail header.from=sender.test"
    [raw] = server.mailbox(RCPT, "Quarantine")
    assert email.message_from_bytes(raw)["X-Ingress-Quarantine"] == "dmarc"


@pytest.mark.parametrize("author, code", [("alice@sender.test", 550),
                                          ("alice@sub.sender.test", 250)])
def test_sp_applies_to_subdomains(ingress_server, zone, keys, author, code):
    publish(zone, keys, dmarc="v=DMARC1; p=reject; sp=none")
    zone.txt["sender.test"] = ["v=spf1 -all"]
    server = ingress_server(mailauth(zone.nameserver, dmarc="enforce"))
    reply = send(server, message(author))
    assert reply[0] == code
    if code == 250:
        assert methods(ours(server))["dmarc"] == "fail header.from=sub.sender.test"


def test_pct_zero_turns_reject_into_quarantine(ingress_server, zone, keys):
    publish(zone, keys, dmarc="v=DMARC1; p=reject; pct=0")
    zone.txt["sender.test"] = ["v=spf1 -all"]
    server = ingress_server(mailauth(zone.nameserver, dmarc="enforce"))
    assert send(server, message())[0] == 250
    assert len(server.mailbox(RCPT, "Quarantine")) == 1


# --- ARC ------------------------------------------------------------------------------------------


def arc_sealed(keys, msg: bytes) -> bytes:
    """*msg* as relay.test forwards it: its own Authentication-Results, then an ARC set."""
    msg = b"Authentication-Results: relay.test; dkim=pass header.d=sender.test\r\n" + msg
    sealed = dkim.arc_sign(msg, b"arc", b"relay.test", keys["rsa"].private, b"relay.test")
    return b"".join(sealed) + msg


def test_valid_arc_chain(ingress_server, zone, keys):
    publish(zone, keys)
    zone.txt["arc._domainkey.relay.test"] = [keys["rsa"].record]
    server = ingress_server(mailauth(zone.nameserver))
    assert send(server, arc_sealed(keys, signed(message(), keys["rsa"])))[0] == 250
    header = ours(server)
    assert methods(header)["arc"] == "pass"
    assert [h.split(";")[0] for h in results(server.mailbox(RCPT)[0])] == ["mx.test",
                                                                          "relay.test"]


def test_broken_arc_chain(ingress_server, zone, keys):
    publish(zone, keys)
    zone.txt["arc._domainkey.relay.test"] = [keys["rsa"].record]
    server = ingress_server(mailauth(zone.nameserver))
    msg = arc_sealed(keys, signed(message(), keys["rsa"])).replace(b"lunch", b"dinner")
    assert send(server, msg)[0] == 250
    assert methods(ours(server))["arc"] == "fail"


# --- forgery, sessions, switches -----------------------------------------------------------------


def test_forged_results_with_our_id_are_removed_others_kept(ingress_server, zone, keys):
    publish(zone, keys)
    server = ingress_server(mailauth(zone.nameserver))
    forged = (b"Authentication-Results: mx.test; spf=pass smtp.mailfrom=evil@sender.test\r\n"
              b"Authentication-Results: other.test; dkim=pass header.d=other.test\r\n"
              b"Authentication-Results: (sneaky) MX.TEST;\r\n dmarc=pass\r\n")
    assert send(server, signed(message(extra=forged), keys["rsa"]))[0] == 250
    [raw] = server.mailbox(RCPT)
    assert results(raw) == [PASS_HEADER,
                            "other.test; dkim=pass header.d=other.test"]


def test_authenticated_sessions_are_not_checked(ingress_server, zone, keys):
    publish(zone, keys)
    server = ingress_server({
        **mailauth(zone.nameserver),
        "directory": {**LOCAL["directory"],
                      "users": [{"address": "carol@example.test", "password": "carolpw"}]},
        "plugins": {**mailauth(zone.nameserver)["plugins"],
                    "auth": {"disable_plain_without_tls": False}}})
    with server.smtp() as client:
        client.ehlo("client.example.test")
        assert client.login("carol@example.test", "carolpw")[0] == 235
        client.sendmail("carol@example.test", [RCPT], message("carol@example.test"))
    [raw] = server.mailbox(RCPT)
    assert results(raw) == []
    assert zone.questions == []


def test_checks_that_are_off_are_not_reported(ingress_server, zone, keys):
    publish(zone, keys)
    server = ingress_server(mailauth(zone.nameserver, spf="off", arc="off"))
    assert send(server, signed(message(), keys["rsa"]))[0] == 250
    assert ours(server) == ("mx.test; dkim=pass header.d=sender.test header.s=sel; "
                            "dmarc=pass header.from=sender.test")


# --- as an installed plugin ---------------------------------------------------------------------


def ingress(*args):
    return subprocess.run([sys.executable, "-m", "ingress", *args], capture_output=True,
                          text=True, timeout=60)


def test_installed_plugin_is_listed_and_its_config_checked(tmp_path):
    listed = ingress("plugins").stdout.splitlines()
    assert any(line.startswith("mailauth\tentry point ingress-mailauth") for line in listed)
    good = tmp_path / "good.toml"
    good.write_text('[plugins.mailauth]\nnameservers = ["127.0.0.1", "127.0.0.1:5353", '
                    '"::1", "[::1]:53"]\ndns_timeout = 2.5\nspf = "reject"\n'
                    'dmarc = "enforce"\n')
    assert ingress("check-config", str(good)).returncode == 0, ingress("check-config", str(good))
    bad = tmp_path / "bad.toml"
    bad.write_text('[plugins.mailauth]\ndns_timout = 2\ndkim = "reject"\n')
    result = ingress("check-config", str(bad))
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert f"{bad}: /plugins/mailauth/dns_timout: unknown key 'dns_timout'" in lines
    assert any(line.startswith(f"{bad}: /plugins/mailauth/dkim: ") for line in lines)


@pytest.mark.parametrize("entry", ["dns.example", "127.0.0.1:0", "[::1]", "1.2.3.4:99999"])
def test_a_nameserver_must_be_an_address(tmp_path, entry):
    path = tmp_path / "c.toml"
    path.write_text(f'[plugins.mailauth]\nnameservers = ["127.0.0.1", "{entry}"]\n')
    result = ingress("check-config", str(path))
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert line.startswith(f"{path}: /plugins/mailauth/nameservers/1: ")
