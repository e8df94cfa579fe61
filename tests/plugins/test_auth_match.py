"""auth_match: MAIL FROM (and with mime_headers From:/Sender:) must belong to the authenticated
user."""

from __future__ import annotations

import smtplib

import pytest

DIRECTORY = {
    "domains": ["example.test", "other.test"],
    "users": [
        {"address": "alice@example.test", "password": "alicepw",
         "send_as": ["boss@example.test", "team@other.test"]},
        {"address": "bob@example.test", "password": "bobpw"},
    ],
    "domain_settings": {"example.test": {"catch_all": True}, "other.test": {"catch_all": True}},
}
NOT_OWNED = (553, b"5.7.1 Sender address not owned by authenticated user")


def config(require="none", mime_headers=False) -> dict:
    return {"directory": DIRECTORY,
            "plugins": {"auth_match": {"require": require, "mime_headers": mime_headers}}}


def session(server, user="alice@example.test", password="alicepw") -> smtplib.SMTP:
    client = server.smtp()
    client.ehlo()
    if user:
        assert client.login(user, password)[0] == 235  # CRAM-MD5 on plaintext
    return client


def mail(client: smtplib.SMTP, sender: str) -> tuple[int, bytes]:
    client.rset()
    return client.mail(sender)


# --- MAIL FROM ------------------------------------------------------------------------------------


@pytest.mark.parametrize("disabled", [(), ("auth_match",)])
@pytest.mark.parametrize("require,sender,allowed", [
    ("email", "alice@example.test", True),
    ("email", "ALICE@Example.TEST", True),
    ("email", "bob@example.test", False),
    ("email", "alice@other.test", False),
    ("email", "boss@example.test", False),  # send_as is about headers, not MAIL FROM
    ("email", "", False),
    ("domain", "alice@example.test", True),
    ("domain", "bob@example.test", True),
    ("domain", "anyone@EXAMPLE.test", True),
    ("domain", "alice@other.test", False),
    ("domain", "alice@example.org", False),
    ("domain", "", False),
    ("none", "someone@example.org", True),
    ("none", "", True),
])
def test_mail_from_must_match(ingress_server, require, sender, allowed, disabled):
    server = ingress_server(config(require), disabled=disabled)
    with session(server) as client:
        result = mail(client, sender)
        if allowed or disabled:
            assert result[0] == 250
        else:
            assert result == NOT_OWNED


@pytest.mark.parametrize("require", ["email", "domain"])
def test_unauthenticated_sessions_are_not_affected(ingress_server, require):
    server = ingress_server(config(require, mime_headers=True))
    with session(server, user=None) as client:
        assert mail(client, "someone@example.org")[0] == 250
        assert mail(client, "")[0] == 250
        client.rset()
        client.sendmail("x@example.org", ["alice@example.test"],
                        "From: x@example.org\r\nSubject: inbound\r\n\r\nx\r\n")
    assert len(server.mailbox("alice@example.test")) == 1


def test_parameter_syntax_is_checked_before_auth_match(ingress_server):
    server = ingress_server(config("email"))
    with session(server) as client:
        assert client.mail("bob@example.test", ["FOO=bar"])[0] == 555
        assert client.docmd("MAIL", "FROM:<bob@example.test> SIZE=x")[0] == 501
        assert mail(client, "bob@example.test") == NOT_OWNED


# --- MIME headers ---------------------------------------------------------------------------------


def message(*headers: str) -> str:
    return "".join(f"{h}\r\n" for h in headers) + "Subject: s\r\n\r\nbody\r\n"


EMAIL_CASES = [
    # headers, accepted?
    (("From: alice@example.test",), True),
    (("From: Alice Example <ALICE@example.test>",), True),
    (("From: bob@example.test",), False),
    (("From: bob@example.test", "Sender: alice@example.test"), False),  # bob not in send_as
    (("From: boss@example.test", "Sender: alice@example.test"), True),  # send_as
    (("From: Team <team@other.test>", "Sender: <alice@example.test>"), True),
    (("From: boss@example.test, alice@example.test", "Sender: alice@example.test"), True),
    (("From: boss@example.test, bob@example.test", "Sender: alice@example.test"), False),
    (("From: boss@example.test",), False),  # send_as needs Sender: alice
    (("From: boss@example.test", "Sender: bob@example.test"), False),
    (("From: alice@example.test", "Sender: bob@example.test"), True),  # From matches
    ((), False),  # no From at all
    (("From: alice@example.test", "From: bob@example.test"), False),  # two From headers
    (("From: alice@example.test", "From : bob@example.test"), False),  # hidden second From
    (("From: bob@example.test (alice@example.test)",), False),  # a comment is not an address
    (('From: "alice@example.test" <bob@example.test>',), False),  # nor a display name
    (("From: alice@example.test", "Sender: a@x.test", "Sender: b@x.test"), False),
    (("From: undisclosed",), False),
    (("From:\r\n alice@example.test",), True),  # folded
]


@pytest.mark.parametrize("disabled", [(), ("auth_match",)])
def test_mime_headers_email(ingress_server, disabled):
    server = ingress_server(config("email", mime_headers=True), disabled=disabled)
    with session(server) as client:
        for headers, accepted in EMAIL_CASES:
            mail(client, "alice@example.test")
            client.rcpt("bob@example.test")
            code, text = client.data(message(*headers))
            if accepted or disabled:
                assert code == 250, (headers, code, text)
            else:
                assert (code, text[:5]) == (550, b"5.7.1"), (headers, code, text)
    expected = sum(1 for _, ok in EMAIL_CASES if ok or disabled)
    assert len(server.mailbox("bob@example.test")) == expected


DOMAIN_CASES = [
    (("From: alice@example.test",), True),
    (("From: bob@example.test",), True),
    (("From: anyone@EXAMPLE.TEST", "Sender: bob@example.test"), True),
    (("From: team@other.test",), False),  # send_as does not extend the domain
    (("From: bob@example.test", "Sender: x@other.test"), False),
    (("From: x@example.org", "Sender: alice@example.test"), False),
    (("From: bob@example.test, x@example.org",), False),
    ((), False),
]


def test_mime_headers_domain(ingress_server):
    server = ingress_server(config("domain", mime_headers=True))
    with session(server) as client:
        for headers, accepted in DOMAIN_CASES:
            mail(client, "bob@example.test")
            client.rcpt("bob@example.test")
            code, text = client.data(message(*headers))
            if accepted:
                assert code == 250, (headers, code, text)
            else:
                assert (code, text[:5]) == (550, b"5.7.1"), (headers, code, text)


@pytest.mark.parametrize("require,mime_headers", [("email", False), ("none", True)])
def test_headers_are_checked_only_with_mime_headers_and_a_requirement(ingress_server, require,
                                                                      mime_headers):
    server = ingress_server(config(require, mime_headers))
    with session(server) as client:
        client.sendmail("alice@example.test", ["bob@example.test"],
                        message("From: bob@example.test"))
    assert len(server.mailbox("bob@example.test")) == 1


def test_the_session_stays_usable_after_a_refused_message(ingress_server):
    server = ingress_server(config("email", mime_headers=True))
    with session(server) as client:
        mail(client, "alice@example.test")
        client.rcpt("bob@example.test")
        assert client.data(message("From: bob@example.test"))[0] == 550
        client.sendmail("alice@example.test", ["bob@example.test"],
                        message("From: alice@example.test"))
    [stored] = server.mailbox("bob@example.test")
    assert b"From: alice@example.test" in stored


# SMTPUTF8 (PROTOCOL.md 2): the user's address and the sender compare as NFC local parts and
# A-label domains, whichever form each was written in.

IDN_USER = {"directory": {"domains": ["bücher.example"], "users": [
    {"address": "Jörg@xn--bcher-kva.example", "password": "pw"}]}}


@pytest.mark.parametrize("require, sender, allowed", [
    ("email", "jörg@bücher.example", True),
    ("email", "jo\u0308rg@XN--BCHER-KVA.example", True),  # NFD, upper-case A-label
    ("email", "JÖRG@BÜCHER.EXAMPLE", True),
    ("email", "jorg@bücher.example", False),
    ("domain", "anna@bücher.example", True),
    ("domain", "jörg@bucher.example", False),
])
def test_idn_and_nfc_forms_match(ingress_plugin, require, sender, allowed):
    from ingress_plugins import auth_match

    plugin = ingress_plugin(auth_match, {"require": require}, config=IDN_USER)
    session = plugin.session(helo="client.test", auth_user="Jörg@xn--bcher-kva.example")
    transaction = plugin.transaction(sender, {"SMTPUTF8": None})
    reply = plugin.call("on_mail_from", session=session, transaction=transaction)
    assert reply == (None if allowed else auth_match.NOT_OWNED)


def test_utf8_from_header_matches(ingress_plugin):
    from ingress_plugins import auth_match

    plugin = ingress_plugin(auth_match, {"require": "email", "mime_headers": True},
                            config=IDN_USER)
    session = plugin.session(helo="client.test", auth_user="Jörg@xn--bcher-kva.example")
    good = plugin.message("From: Jörg <jörg@bücher.example>\r\n\r\nx\r\n".encode())
    bad = plugin.message("From: Jörg <jörg@bücher.example.evil>\r\n\r\nx\r\n".encode())
    transaction = plugin.transaction("jörg@bücher.example", {"SMTPUTF8": None})
    assert plugin.call("on_data", session=session, transaction=transaction, message=good) is None
    assert plugin.call("on_data", session=session, transaction=transaction,
                       message=bad).code == 550
