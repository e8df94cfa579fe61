"""local_delivery_auth: a domain's require_smtp_auth enforced for mail between local addresses."""

from __future__ import annotations

import pytest

DIRECTORY = {
    "domains": ["example.test", "open.test"],
    "users": [
        {"address": "user1@example.test", "password": "pw1"},
        {"address": "user2@example.test", "password": "pw2"},
        {"address": "user3@open.test", "password": "pw3"},
    ],
    "domain_settings": {"example.test": {"require_smtp_auth": True}},
}
AUTH_REQUIRED = (530, b"5.7.0 Authentication required")


def config(enabled=True) -> dict:
    return {"directory": DIRECTORY,
            "plugins": {"local_delivery_auth": {"enabled": enabled}}}


def rcpt(client, sender: str, recipient: str):
    client.rset()
    assert client.mail(sender)[0] == 250
    return client.rcpt(recipient)


@pytest.mark.parametrize("disabled", [(), ("local_delivery_auth",)])
def test_local_to_local_needs_authentication(ingress_server, disabled):
    server = ingress_server(config(), disabled=disabled)
    with server.smtp() as client:
        client.ehlo()
        result = rcpt(client, "user1@example.test", "user2@example.test")
        assert result[0] == 250 if disabled else result == AUTH_REQUIRED
        result = rcpt(client, "USER3@Open.Test", "User2@EXAMPLE.test")
        assert result[0] == 250 if disabled else result == AUTH_REQUIRED
        client.rset()
        assert client.login("user1@example.test", "pw1")[0] == 235
        assert rcpt(client, "user1@example.test", "user2@example.test")[0] == 250
        assert client.data("Subject: local\r\n\r\nx\r\n")[0] == 250
    assert len(server.mailbox("user2@example.test")) == 1


def test_only_local_senders_to_domains_that_require_it(ingress_server):
    server = ingress_server(config())
    with server.smtp() as client:
        client.ehlo()
        assert rcpt(client, "someone@example.org", "user2@example.test")[0] == 250  # inbound
        assert rcpt(client, "", "user2@example.test")[0] == 250  # a bounce
        assert rcpt(client, "user1@example.test", "user3@open.test")[0] == 250  # not required


def test_setting_off_by_default(ingress_server):
    server = ingress_server({"directory": DIRECTORY})
    with server.smtp() as client:
        client.ehlo()
        assert rcpt(client, "user1@example.test", "user2@example.test")[0] == 250


def test_checked_before_mailbox_existence(ingress_server):
    """Order at RCPT: local_delivery_auth (530), then mailbox (550 5.1.1), then relay."""
    server = ingress_server(config())
    with server.smtp() as client:
        client.ehlo()
        assert rcpt(client, "user1@example.test", "nobody@example.test") == AUTH_REQUIRED
        result = rcpt(client, "someone@example.org", "nobody@example.test")
        assert result[:1] == (550,) and result[1].startswith(b"5.1.1")
        assert rcpt(client, "user1@example.test", "x@remote.test") == (
            550, b"5.7.1 Relaying denied")


@pytest.mark.parametrize("sender, recipient", [
    ("a@bücher.example", "b@xn--bcher-kva.example"),
    ("a@XN--BCHER-KVA.example", "b@BÜCHER.example"),
])
def test_require_smtp_auth_of_an_idn_in_either_form(ingress_plugin, sender, recipient):
    from ingress_plugins import local_delivery_auth

    directory = {"domains": ["xn--bcher-kva.example"],
                 "domain_settings": {"bücher.example": {"require_smtp_auth": True}}}
    plugin = ingress_plugin(local_delivery_auth, {"enabled": True},
                            config={"directory": directory})
    session = plugin.session(helo="client.test")
    transaction = plugin.transaction(sender, {"SMTPUTF8": None})
    assert plugin.call("on_rcpt", session=session, transaction=transaction,
                       recipient=plugin.recipient(recipient)) == local_delivery_auth.AUTH_REQUIRED
