"""A positive Reply from a plugin's decision hook vouches for the command: the core still does its
part (records the sender and the recipient, stores the message before any 250 after DATA) and
the builtins' checks still run. It used to answer 250 and skip the core: mail was lost."""

from __future__ import annotations

from ingress import Reply, hookimpl

CONFIG = {
    "directory": {"domains": ["example.test"],
                  "users": [{"address": "alice@example.test", "password": "pw"}]},
    "plugins": {"voucher": {}},
}
MESSAGE = "Subject: vouched\r\n\r\nbody\r\n"


class Voucher:
    """Says yes to everything, first."""

    @hookimpl(tryfirst=True)
    def on_mail_from(self):
        return Reply.ok("sender vouched for")

    @hookimpl(tryfirst=True)
    def on_rcpt(self):
        return Reply(250, "2.1.5", "recipient vouched for")

    @hookimpl(tryfirst=True)
    def on_data(self):
        return Reply.ok("looks fine")


class Refuser:
    """A third-party check that a voucher before it skips."""

    @hookimpl
    def on_rcpt(self):
        return Reply(550, "5.7.1", "refuser says no")


def test_vouched_commands_are_carried_out_and_the_message_stored(ingress_inprocess_server):
    server = ingress_inprocess_server(CONFIG, plugins={"voucher": Voucher()})
    with server.raw() as client:
        client.reply()
        assert client.cmd("EHLO client.test")[0] == 250
        assert client.cmd("MAIL FROM:<s@example.org>") == (250, "2.0.0 sender vouched for")
        assert client.cmd("RCPT TO:<alice@example.test>") == (250, "2.1.5 recipient vouched for")
        assert client.cmd("DATA")[0] == 354
        assert client.cmd(MESSAGE + ".") == (250, "2.0.0 looks fine")
        assert client.cmd("QUIT")[0] == 221
    [stored] = server.mailbox("alice@example.test")
    assert stored.startswith(b"Return-Path: <s@example.org>\r\nReceived: from client.test")
    assert stored.endswith(b"\r\n\r\nbody\r\n")


def test_a_voucher_skips_other_plugins_but_never_the_builtin_checks(ingress_inprocess_server):
    server = ingress_inprocess_server({**CONFIG, "plugins": {"voucher": {}, "refuser": {}}},
                                      plugins={"voucher": Voucher(), "refuser": Refuser()})
    with server.smtp() as client:
        client.ehlo()
        assert client.mail("s@example.org")[0] == 250
        assert client.rcpt("alice@example.test") == (250, b"2.1.5 recipient vouched for")
        assert client.rcpt("nobody@example.test")[0] == 550  # mailbox: a builtin check
        assert client.rcpt("x@outside.test") == (550, b"5.7.1 Relaying denied")  # relay
        assert client.data(MESSAGE) == (250, b"2.0.0 looks fine")
    assert len(server.mailbox("alice@example.test")) == 1
