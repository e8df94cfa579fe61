"""dsn: RET, ENVID, NOTIFY, ORCPT (RFC 3461), kept in the queue envelope, and success DSNs
(RFC 3464) for local deliveries, parsed back with the email package."""

from __future__ import annotations

import base64
import email
from email.utils import parsedate_to_datetime

import pytest

from ingress import hookimpl
from ingress.syntax import xtext_decode
from ingress.testing import eventually
from ingress_plugins.dsn import parse_notify, parse_orcpt

DIRECTORY = {
    "domains": ["example.test"],
    "users": [{"address": "alice@example.test", "password": "x"},
              {"address": "bob@example.test", "password": "x"}],
    "aliases": {"team@example.test": ["bob@example.test", "carol@elsewhere.test"],
                "away@example.test": ["dave@elsewhere.test"]},
}
LOCAL = {"directory": DIRECTORY}
BODY = "From: alice@example.test\r\nSubject: dsn test\r\n\r\nThe body text.\r\n"


def transaction(server, mail: str, rcpts: list[str], body: str = BODY) -> list[tuple[int, str]]:
    """MAIL and RCPT lines as given, then DATA if any recipient was accepted; the replies."""
    with server.raw() as raw:
        raw.reply()
        raw.cmd("EHLO client.example.org")
        replies = [raw.cmd(f"MAIL FROM:{mail}")]
        replies += [raw.cmd(f"RCPT TO:{rcpt}") for rcpt in rcpts]
        if any(code == 250 for code, _ in replies[1:]):
            assert raw.cmd("DATA")[0] == 354
            replies.append(raw.cmd(body + "."))
        raw.cmd("QUIT")
    return replies


def report_parts(stored: bytes):
    dsn = email.message_from_bytes(stored)
    assert dsn.get_content_type() == "multipart/report"
    assert dsn.get_param("report-type") == "delivery-status"
    human, status, returned = dsn.get_payload()
    assert human.get_content_type() == "text/plain"
    assert status.get_content_type() == "message/delivery-status"
    return dsn, human, status.get_payload(), returned


# --- xtext and parameter syntax, without a server ----------------------------------------------


def test_xtext_decode():
    assert xtext_decode("QQ+2B314159") == "QQ+314159"
    assert xtext_decode("a+3Db+20c") == "a=b c"
    assert xtext_decode("") == ""
    for bad in ("a+", "a+2", "a+2b", "a+ZZ", "a=b", "a b", "caf\u00e9"):
        assert xtext_decode(bad) is None, bad


def test_notify_and_orcpt_syntax():
    assert parse_notify("success,Failure") == {"SUCCESS", "FAILURE"}
    assert parse_notify("never") == {"NEVER"}
    for bad in (None, "", "NEVER,SUCCESS", "SUCCESS,", "SOMETIMES", ",DELAY"):
        assert parse_notify(bad) is None, bad
    assert parse_orcpt("rfc822;bob+2Bx@example.test") == ("rfc822", "bob+x@example.test")
    for bad in (None, "bob@example.test", "rfc822;", ";bob@x", "rfc 822;b@x", "rfc822;b+ZZ",
                "rfc822;" + "a" * 501):
        assert parse_orcpt(bad) is None, bad


# --- parameters on the wire --------------------------------------------------------------------

GOOD_MAIL = ["RET=FULL", "RET=hdrs", "ENVID=QQ314159", "ENVID=a+2Bb", "RET=HDRS ENVID=x",
             "ENVID=" + "e" * 100, "BODY=8BITMIME RET=FULL"]
GOOD_RCPT = ["NOTIFY=SUCCESS", "NOTIFY=success,failure,DELAY", "NOTIFY=NEVER",
             "ORCPT=rfc822;bob@example.test", "ORCPT=rfc822;b+2Bc@example.test",
             "NOTIFY=FAILURE ORCPT=RFC822;x@y.test"]


@pytest.mark.parametrize("how", ["enabled", "disabled by config", "plugin disabled"])
def test_ehlo_and_parameters(ingress_server, how):
    cfg = {**LOCAL, "plugins": {"dsn": {"enabled": how != "disabled by config"}}}
    server = ingress_server(cfg, disabled=("dsn",) if how == "plugin disabled" else ())
    on = how == "enabled"
    with server.raw() as raw:
        raw.reply()
        _, ehlo = raw.cmd("EHLO client.example.org")
        assert ("DSN" in ehlo.split("\n")) == on
        for params in GOOD_MAIL:
            code, text = raw.cmd(f"MAIL FROM:<a@example.org> {params}")
            assert (code, text[:5]) == ((250, "2.1.0") if on else (555, "5.5.4")), params
            raw.cmd("RSET")
        assert raw.cmd("MAIL FROM:<a@example.org>")[0] == 250
        for params in GOOD_RCPT:
            code, text = raw.cmd(f"RCPT TO:<bob@example.test> {params}")
            assert (code, text[:5]) == ((250, "2.1.5") if on else (555, "5.5.4")), params


BAD_MAIL = ["RET=NONE", "RET", "RET=FULL RET=HDRS", "ENVID", "ENVID=", "ENVID=" + "e" * 101,
            "ENVID=abc+2", "ENVID=abc+zz", "ENVID=abc+2b", "ENVID=+00nul", "ENVID=a+",
            "ENVID=a ENVID=b"]
BAD_RCPT = ["NOTIFY=NEVER,SUCCESS", "NOTIFY=SUCCESS,", "NOTIFY=SOMETIMES", "NOTIFY", "NOTIFY=",
            "NOTIFY=SUCCESS NOTIFY=FAILURE", "ORCPT=bob@example.test", "ORCPT=rfc822;",
            "ORCPT=;bob@example.test", "ORCPT=rfc822;bob+ZZ@example.test", "ORCPT",
            "ORCPT=rfc822;a+0Ab", "NOTIFY=SUCCESS,,FAILURE"]


def test_malformed_parameters_get_501(ingress_server):
    # Many 501s in one session on purpose: no bad-command limit here.
    server = ingress_server({**LOCAL, "plugins": {"max_bad_commands": {"limit": 0}}})
    with server.raw() as raw:
        raw.reply()
        raw.cmd("EHLO client.example.org")
        for params in BAD_MAIL:
            code, text = raw.cmd(f"MAIL FROM:<a@example.org> {params}")
            assert (code, text[:5]) == (501, "5.5.4"), params
        assert raw.cmd("MAIL FROM:<a@example.org>")[0] == 250
        for params in BAD_RCPT:
            code, text = raw.cmd(f"RCPT TO:<bob@example.test> {params}")
            assert (code, text[:5]) == (501, "5.5.4"), params


def test_parameters_are_kept_in_the_queue_envelope(ingress_server):
    server = ingress_server({**LOCAL, "plugins": {"relay": {"whitelist": ["127.0.0.1"]}}})
    replies = transaction(server, "<alice@example.test> RET=hdrs ENVID=id+2B1",
                          ["<carol@elsewhere.test> NOTIFY=success,failure "
                           "ORCPT=rfc822;carol+2B1@elsewhere.test",
                           "<dan@elsewhere.test>"])
    assert [code for code, _ in replies] == [250, 250, 250, 250]
    [(envelope, _)] = server.queue_entries()
    assert envelope["mail_params"] == {"RET": "HDRS", "ENVID": "id+2B1"}
    assert envelope["recipients"] == [
        {"address": "carol@elsewhere.test",
         "params": {"NOTIFY": "SUCCESS,FAILURE", "ORCPT": "rfc822;carol+2B1@elsewhere.test"}},
        {"address": "dan@elsewhere.test", "params": {}},
    ]
    assert envelope["generated"] is False
    assert server.mailbox("alice@example.test") == [], "relayed: no success DSN from us"


# --- success DSNs ------------------------------------------------------------------------------


@pytest.mark.parametrize("disabled", [(), ("dsn",)])
def test_success_dsn_field_by_field(ingress_server, disabled):
    server = ingress_server(LOCAL, disabled=disabled)
    replies = transaction(server, "<alice@example.test> RET=HDRS ENVID=QQ+2B314159",
                          ["<bob@example.test> NOTIFY=SUCCESS,FAILURE "
                           "ORCPT=rfc822;Bob+2Bdsn@example.test"])
    if disabled:
        assert replies[0][0] == 555
        assert server.mailbox("alice@example.test") == []
        return
    assert replies[-1][0] == 250
    assert len(server.mailbox("bob@example.test")) == 1
    [stored] = server.mailbox("alice@example.test")
    assert stored.startswith(b"Return-Path: <>\r\n")
    dsn, human, (per_message, per_recipient), returned = report_parts(stored)
    assert dsn["From"] == "Mail Delivery System <MAILER-DAEMON@mx.test>"
    assert dsn["To"] == "<alice@example.test>"
    assert dsn["Auto-Submitted"] == "auto-replied"
    assert dsn["Message-ID"] and dsn["Date"]
    assert "<bob@example.test>" in human.get_payload()

    assert per_message["Reporting-MTA"] == "dns; mx.test"
    assert per_message["Original-Envelope-Id"] == "QQ+314159"
    assert parsedate_to_datetime(per_message["Arrival-Date"]).tzinfo is not None
    assert per_recipient["Final-Recipient"] == "rfc822; bob@example.test"
    assert per_recipient["Original-Recipient"] == "rfc822; Bob+dsn@example.test"
    assert per_recipient["Action"] == "delivered"
    assert per_recipient["Status"] == "2.0.0"

    assert returned.get_content_type() == "text/rfc822-headers"  # RET=HDRS
    headers = returned.get_payload()
    assert "Subject: dsn test" in headers and "Received: from client.example.org" in headers
    assert "The body text." not in headers


def test_ret_full_returns_the_message_and_optional_fields_are_left_out(ingress_server):
    server = ingress_server(LOCAL)
    transaction(server, "<alice@example.test> RET=FULL",
                ["<bob@example.test> NOTIFY=SUCCESS", "<alice@example.test> NOTIFY=success"])
    [*_, stored] = server.mailbox("alice@example.test")  # her own copy, then the DSN
    _, _, (per_message, *per_recipient), returned = report_parts(stored)
    assert "Original-Envelope-Id" not in per_message
    assert [r["Final-Recipient"] for r in per_recipient] == ["rfc822; bob@example.test",
                                                            "rfc822; alice@example.test"]
    assert all("Original-Recipient" not in r for r in per_recipient)
    assert returned.get_content_type() == "message/rfc822"
    [original] = returned.get_payload()
    assert original["Subject"] == "dsn test"
    assert original.get_payload() == "The body text.\r\n"


def test_an_external_sender_gets_its_dsn_through_the_queue(ingress_server):
    server = ingress_server({**LOCAL, "plugins": {"relay": {"whitelist": ["127.0.0.1"]}}})
    transaction(server, "<sender@elsewhere.test> ENVID=abc",
                ["<bob@example.test> NOTIFY=SUCCESS"])
    [(envelope, data)] = server.queue_entries()
    assert envelope["mail_from"] == ""
    assert envelope["recipients"] == [{"address": "sender@elsewhere.test", "params": {}}]
    assert envelope["generated"] is True and envelope["client_ip"] is None
    _, _, (per_message, per_recipient), _ = report_parts(data)
    assert per_message["Original-Envelope-Id"] == "abc"
    assert per_recipient["Action"] == "delivered"


def test_an_alias_with_a_local_member_counts_as_delivered(ingress_server):
    server = ingress_server(LOCAL)
    transaction(server, "<alice@example.test>",
                ["<team@example.test> NOTIFY=SUCCESS", "<away@example.test> NOTIFY=SUCCESS"])
    [stored] = server.mailbox("alice@example.test")
    _, _, (_, *per_recipient), _ = report_parts(stored)
    # away@ has only a member elsewhere: relayed, its NOTIFY travels in the queue
    assert [r["Final-Recipient"] for r in per_recipient] == ["rfc822; team@example.test"]
    relayed = {r["address"]: r["params"] for env, _ in server.queue_entries()
               for r in env["recipients"]}
    assert relayed == {"carol@elsewhere.test": {"NOTIFY": "SUCCESS"},
                       "dave@elsewhere.test": {"NOTIFY": "SUCCESS"}}


@pytest.mark.parametrize("mail,rcpt", [
    ("<>", "<bob@example.test> NOTIFY=SUCCESS"),  # never to the null sender
    ("<alice@example.test>", "<bob@example.test> NOTIFY=FAILURE,DELAY"),
    ("<alice@example.test>", "<bob@example.test> NOTIFY=NEVER"),
    ("<alice@example.test>", "<bob@example.test>"),
    ("<nobody@example.test>", "<bob@example.test> NOTIFY=SUCCESS"),  # sender has no mailbox
])
def test_no_success_dsn(ingress_server, mail, rcpt):
    server = ingress_server(LOCAL)
    assert transaction(server, mail, [rcpt])[-1][0] == 250
    assert len(server.mailbox("bob@example.test")) == 1
    assert server.all_messages() == [p for p in server.all_messages() if "/bob/" in str(p)]
    assert server.queue_entries() == []


# --- no backscatter: a DSN to an outside sender only where the session may relay ---------------

SPAM = "From: victim@outside.test\r\nSubject: cheap pills\r\n\r\nBuy now.\r\n"
NOT_ALLOWED = "no success DSN: this session may not relay to sender <victim@outside.test>"


def forged_transaction(server, auth: bool = False) -> list[tuple[int, str]]:
    with server.raw() as raw:
        raw.reply()
        raw.cmd("EHLO client.example.org")
        if auth:
            token = base64.b64encode(b"\0alice@example.test\0x").decode()
            assert raw.cmd(f"AUTH PLAIN {token}")[0] == 235
        replies = [raw.cmd("MAIL FROM:<victim@outside.test> RET=FULL"),
                   raw.cmd("RCPT TO:<bob@example.test> NOTIFY=SUCCESS")]
        assert raw.cmd("DATA")[0] == 354
        replies.append(raw.cmd(SPAM + "."))
        raw.cmd("QUIT")
    return replies


@pytest.mark.parametrize("relay", [{}, {"allow": "local_domains"}, {"allow": "local_users"},
                                   {"whitelist": ["192.0.2.0/24"]}])
def test_no_dsn_to_a_forged_outside_sender(ingress_server, relay):
    server = ingress_server({**LOCAL, "plugins": {"relay": relay}})
    assert [code for code, _ in forged_transaction(server)] == [250, 250, 250]
    assert len(server.mailbox("bob@example.test")) == 1
    eventually(lambda: NOT_ALLOWED in server.log(), what="the log line")
    assert server.queue_entries() == []
    assert list(server.queue.glob("*.eml")) == []
    assert server.log().count("no success DSN") == 1


def test_no_dsn_to_an_outside_sender_without_the_relay_plugin(ingress_server):
    server = ingress_server(LOCAL, disabled=("relay",))
    forged_transaction(server)
    eventually(lambda: NOT_ALLOWED in server.log(), what="the log line")
    assert server.queue_entries() == []


@pytest.mark.parametrize("how", ["whitelist", "authenticated", "anyone"])
def test_dsn_to_an_outside_sender_the_session_may_relay_to(ingress_server, how):
    relay = {"whitelist": {"whitelist": ["127.0.0.0/8"]},
             "authenticated": {"authenticated": True},
             "anyone": {"allow": "anyone"}}[how]
    server = ingress_server({**LOCAL, "plugins": {
        "relay": relay, "auth": {"disable_plain_without_tls": False}}})
    assert forged_transaction(server, auth=how == "authenticated")[-1][0] == 250
    eventually(lambda: server.queue_entries(), what="the queued DSN")
    [(envelope, data)] = server.queue_entries()
    assert envelope["recipients"] == [{"address": "victim@outside.test", "params": {}}]
    assert envelope["mail_from"] == "" and envelope["generated"] is True
    *_, returned = report_parts(data)
    assert returned.get_payload()[0]["Subject"] == "cheap pills"  # RET=FULL
    assert "no success DSN" not in server.log()


def test_authenticated_relay_off_means_no_dsn_to_an_outside_sender(ingress_server):
    server = ingress_server({**LOCAL, "plugins": {
        "relay": {"authenticated": False}, "auth": {"disable_plain_without_tls": False}}})
    forged_transaction(server, auth=True)
    eventually(lambda: NOT_ALLOWED in server.log(), what="the log line")
    assert server.queue_entries() == []


class PartnerPolicy:
    """A third-party policy that answers may_relay before the relay plugin."""

    @hookimpl(tryfirst=True)
    def may_relay(self, address):
        return True if address.endswith("@partner.test") else None


def test_a_third_party_may_relay_answer_comes_first(ingress_inprocess_server):
    server = ingress_inprocess_server({**LOCAL, "plugins": {"partner": {}}},
                                      plugins={"partner": PartnerPolicy()})
    for sender in ("someone@partner.test", "victim@outside.test"):
        transaction(server, f"<{sender}>", ["<bob@example.test> NOTIFY=SUCCESS"])
    eventually(lambda: server.queue_entries(), what="the queued DSN")
    [(envelope, _)] = server.queue_entries()
    assert envelope["recipients"] == [{"address": "someone@partner.test", "params": {}}]


# --- SMTPUTF8 (PROTOCOL.md 2) ------------------------------------------------------------------

UTF8 = {"directory": {"domains": ["bücher.example"], "users": [
    {"address": "jörg@bücher.example", "password": "x"},
    {"address": "用户@xn--bcher-kva.example", "password": "x"}]},
    "plugins": {"relay": {"whitelist": ["127.0.0.1"]}}}


def test_success_dsn_for_utf8_addresses(ingress_server):
    server = ingress_server(UTF8)
    replies = transaction(server, "<jörg@bücher.example> SMTPUTF8",
                          ["<用户@bücher.example> NOTIFY=SUCCESS"])
    assert [code for code, _ in replies] == [250, 250, 250]
    [stored] = server.mailbox("jörg@xn--bcher-kva.example")
    assert "To: <jörg@bücher.example>\r\n".encode() in stored
    _, human, (_, per_recipient), _ = report_parts(stored)
    # RFC 6533: the utf-8 address type, its value in utf-8-addr-xtext (the field stays ASCII)
    assert per_recipient["Final-Recipient"] == "utf-8; \\x{7528}\\x{6237}@b\\x{FC}cher.example"
    assert "<用户@bücher.example>" in human.get_payload(decode=True).decode()


def test_a_dsn_to_an_outside_utf8_sender_is_an_smtputf8_transaction(ingress_server):
    server = ingress_server(UTF8)
    transaction(server, "<müller@straße.example> SMTPUTF8",
                ["<jörg@bücher.example> NOTIFY=SUCCESS"])
    [(envelope, _)] = server.queue_entries()
    assert envelope["recipients"] == [{"address": "müller@straße.example", "params": {}}]
    assert envelope["generated"] is True and envelope["smtputf8"] is True
