"""One hook at a time (ingress.testing's harness, no server) and the pure parts: header
parsing, quoting, DMARC records and alignment, the bounds on hostile input."""

from __future__ import annotations

import time

import dkim
import pytest

import ingress_mailauth as mailauth
from ingress_mailauth import DMARCResult, Signature, SPFResult

MESSAGE = (b"From: Alice <alice@sender.test>\r\nTo: bob@example.test\r\nSubject: hi\r\n"
           b"\r\nHello\r\n")


@pytest.fixture
def plugin(ingress_plugin, zone):
    def make(**settings):
        return ingress_plugin(mailauth, {"nameservers": [zone.nameserver], "dns_timeout": 2,
                                         **settings})
    return make


def run_data(harness, raw: bytes, mail_from: str = "alice@sender.test", **session):
    session = harness.session(peer=("127.0.0.1", 40000), helo="client.sender.test", **session)
    transaction = harness.transaction(mail_from, recipients=["bob@example.test"],
                                      session=session)
    msg = harness.message(raw)
    reply = harness.call("on_data", session=session, transaction=transaction, message=msg)
    return reply, transaction, msg


# --- with the harness ---------------------------------------------------------------------------


def test_header_is_added_first_and_forged_ones_go(plugin, zone):
    zone.txt["sender.test"] = ["v=spf1 ip4:127.0.0.1 -all"]
    harness = plugin()
    raw = (b"Authentication-Results: mx.test; spf=pass\r\n"
           b"Authentication-Results: elsewhere.test; spf=fail\r\n"
           b'Authentication-Results: "mx.test"; dkim=pass\r\n' + MESSAGE)
    reply, transaction, msg = run_data(harness, raw)
    assert reply is None
    [(name, value)] = transaction.added_headers
    assert name == "Authentication-Results"
    assert value.replace("\r\n", "") == ("mx.test; spf=pass smtp.mailfrom=alice@sender.test; "
                                         "dkim=none; dmarc=none header.from=sender.test; "
                                         "arc=none")
    assert [v for n, v in msg.headers() if n == "Authentication-Results"] == [
        "elsewhere.test; spf=fail"]


def test_authenticated_session_is_skipped(plugin, zone):
    harness = plugin()
    reply, transaction, msg = run_data(harness, b"Authentication-Results: mx.test; x=y\r\n"
                                       + MESSAGE, auth_user="carol@example.test")
    assert reply is None and transaction.added_headers == []
    assert msg.header_count("Authentication-Results") == 1
    assert zone.questions == []


def test_spf_reject_at_mail(plugin, zone):
    zone.txt["sender.test"] = ["v=spf1 -all"]
    harness = plugin(spf="reject")
    session = harness.session(peer=("127.0.0.1", 40000), helo="client.sender.test")
    transaction = harness.transaction("alice@sender.test", session=session)
    reply = harness.call("on_mail_from", session=session, transaction=transaction)
    assert (reply.code, reply.enhanced, reply.text) == (550, "5.7.23", "SPF validation failed")
    # the result is kept for the end of DATA: no second lookup
    before = len(zone.questions)
    msg = harness.message(MESSAGE)
    harness.call("on_data", session=session, transaction=transaction, message=msg)
    assert ("sender.test", "TXT") not in zone.questions[before:]
    assert "spf=fail smtp.mailfrom=alice@sender.test" in transaction.added_headers[0][1]


def test_spf_follows_includes_and_mx_through_reruns(plugin, zone):
    zone.txt["sender.test"] = ["v=spf1 include:a.test include:b.test -all"]
    zone.txt["a.test"] = ["v=spf1 ip4:192.0.2.0/24 -all"]
    zone.txt["b.test"] = ["v=spf1 mx -all"]
    zone.mx["b.test"] = ["mx1.b.test", "mx2.b.test"]
    zone.a["mx1.b.test"] = ["192.0.2.9"]
    zone.a["mx2.b.test"] = ["127.0.0.1"]
    _, transaction, _ = run_data(plugin(dmarc="off", dkim="off", arc="off"), MESSAGE)
    assert transaction.added_headers[0][1].replace("\r\n", "") == (
        "mx.test; spf=pass smtp.mailfrom=alice@sender.test")


def test_an_include_loop_is_a_permerror_quickly(plugin, zone):
    for i in range(20):
        zone.txt[f"l{i}.test"] = [f"v=spf1 include:l{i + 1}.test -all"]
    zone.txt["sender.test"] = ["v=spf1 include:l0.test -all"]
    started = time.monotonic()
    _, transaction, _ = run_data(plugin(dmarc="off", dkim="off", arc="off"), MESSAGE)
    assert "spf=permerror" in transaction.added_headers[0][1]
    assert time.monotonic() - started < 2
    assert len(zone.questions) <= 12  # RFC 7208's 10 lookups, and the record itself


def test_many_signatures_only_the_first_are_checked(plugin, zone, keys):
    zone.txt["sel._domainkey.sender.test"] = [keys["rsa"].record]
    signatures = b""
    for i in range(40):
        signatures += dkim.sign(MESSAGE, b"s%d" % i, b"sender.test", keys["rsa"].private,
                                include_headers=[b"from"])
    _, transaction, _ = run_data(plugin(), signatures + MESSAGE)
    value = transaction.added_headers[0][1]
    assert value.count("dkim=") == mailauth.MAX_SIGNATURES
    asked = {name for name, _ in zone.questions if "_domainkey" in name}
    assert len(asked) == mailauth.MAX_SIGNATURES


def test_a_huge_header_block_is_handled(plugin, zone):
    raw = b"".join(b"X-Filler-%d: %s\r\n" % (i, b"y" * 60) for i in range(20000)) + MESSAGE
    started = time.monotonic()
    harness = plugin()
    reply, transaction, _ = run_data(harness, raw)
    assert reply is None and transaction.added_headers
    assert time.monotonic() - started < 10
    assert mailauth._pool is not None  # over 128 KiB: verified in a worker thread
    harness.call("shutdown")
    assert mailauth._pool is None


def test_a_flood_of_forged_results_is_removed(plugin, zone):
    zone.txt["sender.test"] = ["v=spf1 ip4:127.0.0.1 -all"]
    many = b"Authentication-Results: mx.test; spf=pass\r\n" * 20000
    reply, transaction, msg = run_data(plugin(), many + MESSAGE)
    assert reply is None and msg.header_count("Authentication-Results") == 0
    assert transaction.added_headers[0][1].startswith("mx.test;\r\n spf=pass ")


def test_unparsable_signature_is_a_permerror(plugin, zone):
    raw = b"DKIM-Signature: this is not a signature\r\n" + MESSAGE
    _, transaction, _ = run_data(plugin(), raw)
    assert "dkim=permerror (bad signature)" in transaction.added_headers[0][1]


# --- pure parts --------------------------------------------------------------------------------


@pytest.mark.parametrize("value, expected", [
    ("mx.test; spf=pass", "mx.test"),
    ("MX.Test 1; none", "mx.test"),
    ("(comment) mx.test;", "mx.test"),
    ('"mx.test"; dkim=pass', "mx.test"),
    ("mx.test.evil; spf=pass", "mx.test.evil"),
    ("mx.test.; spf=pass", "mx.test"),
    ("", ""),
])
def test_authserv_id(value, expected):
    assert mailauth.authserv_id(value) == expected


def test_property_values_are_quoted_when_needed():
    assert mailauth.pvalue("alice@sender.test") == "alice@sender.test"
    assert mailauth.pvalue('"a b"@sender.test') == '"\\"a b\\"@sender.test"'
    assert mailauth.pvalue("x;\r\ny") == '"x;y"'


def test_dmarc_record_parsing():
    assert mailauth.parse_dmarc("v=DMARC1; p=reject; sp=none") == {
        "v": "DMARC1", "p": "reject", "sp": "none"}
    assert mailauth.parse_dmarc("v=spf1 -all") is None
    assert mailauth.parse_dmarc("p=reject; v=DMARC1") is None  # v= must come first


def test_organizational_domain_is_the_last_two_labels():
    assert mailauth.organizational_domain("a.b.sender.test") == "sender.test"
    assert mailauth.organizational_domain("test") == "test"
    assert mailauth.aligned("news.sender.test", "SENDER.test.", "r")
    assert not mailauth.aligned("news.sender.test", "sender.test", "s")


def test_dmarc_outcomes():
    spf_pass = SPFResult("pass", "mailfrom", "a@other.test", "other.test")
    dkim_pass = [Signature("pass", "sender.test", "s")]
    record = {"v": "DMARC1", "p": "reject"}
    assert mailauth.dmarc_result("sender.test", record, False, spf_pass, dkim_pass) == \
        DMARCResult("pass", "sender.test", "reject", "none")
    assert mailauth.dmarc_result("sender.test", record, False, spf_pass, []).applied == "reject"
    temp = [Signature("temperror", "sender.test", "s")]
    assert mailauth.dmarc_result("sender.test", record, False, spf_pass, temp).result == \
        "temperror"
    assert mailauth.dmarc_result(None, None, False, spf_pass, []).result == "permerror"
    assert mailauth.dmarc_result("sender.test", {"v": "DMARC1", "p": "bogus"}, False,
                                 spf_pass, []).result == "permerror"
    with_rua = {"v": "DMARC1", "p": "bogus", "rua": "mailto:d@sender.test"}
    assert mailauth.dmarc_result("sender.test", with_rua, False, spf_pass, []) == \
        DMARCResult("fail", "sender.test", "none", "none")
    sampled = {"v": "DMARC1", "p": "reject", "pct": "0"}
    assert mailauth.dmarc_result("sender.test", sampled, False, spf_pass, []).applied == \
        "quarantine"
