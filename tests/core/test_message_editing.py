"""Milter-grade message editing at the end of DATA: headers by name and occurrence, the body
(spooled), recipients, the sender and quarantine, through a real server and real clients. The
stored bytes are checked, with Return-Path and Received where the contract puts them."""

from __future__ import annotations

import io
import smtplib

import jsonschema
import pytest

import ingress_schemas
from ingress import Reply, hookimpl
from ingress.spool import Message

CONFIG = {
    "directory": {"domains": ["example.test"],
                  "users": [{"address": "alice@example.test", "password": "pw"},
                            {"address": "bob@example.test", "password": "pw"}]},
    "plugins": {"editor": {}},
}

RELAYING = {**CONFIG, "plugins": {"editor": {}, "relay": {"whitelist": ["127.0.0.1"]}}}

MESSAGE = (b"Subject: =?utf-8?q?caf=C3=A9?=\r\n"
           b"X-Tag: one\r\n"
           b"X-Long: first part\r\n"
           b"\tsecond part\r\n"
           b"x-tag: two\r\n"
           b"\r\n"
           b"the body\r\n")


class Editor:
    """Edits the message as the ``X-Do`` header of the received message says; records what it
    saw (``seen``)."""

    def __init__(self) -> None:
        self.seen: dict = {}

    @hookimpl
    def on_data(self, transaction, message):
        todo = dict(message.headers()).get("X-Do", "")
        self.seen["decoded"] = message.decoded_headers()
        self.seen["raw"] = message.headers()
        for step in todo.split(","):
            step = step.strip()
            if step == "headers":
                message.remove_header("X-Do")
                message.change_header("x-tag", "TWO", index=2)
                message.remove_header("X-Long")
                message.insert_header(0, "X-Top", "inserted at the top")
                message.append_header("X-End", "line one\nline two")
                message.change_header("X-Absent", "added because missing")
                transaction.add_header("X-First", "above everything", first=True)
            elif step == "body":
                message.remove_header("X-Do")
                message.replace_body(io.BytesIO(b"new body line\r\n" * 100_000))
            elif step == "recipients":
                message.remove_header("X-Do")
                transaction.remove_recipient("ALICE@example.test")
                transaction.add_recipient("bob@example.test", {"NOTIFY": "NEVER"})
                transaction.add_recipient("carol@elsewhere.test")
                transaction.add_recipient("nobody@example.test")  # no such mailbox
                transaction.change_sender("bounces@example.test")
            elif step == "drop-all":
                transaction.remove_recipient("alice@example.test")
            elif step == "quarantine":
                message.remove_header("X-Do")
                transaction.quarantine("looks\r\nodd")
            elif step == "bad":
                for attempt in (lambda: message.change_header("Bad Name", "x"),
                                lambda: message.append_header("", "x"),
                                lambda: transaction.add_recipient("not an address"),
                                lambda: transaction.change_sender("a@b@@"),
                                lambda: message.remove_header("X-Tag", index=0)):
                    with pytest.raises(ValueError):
                        attempt()
                return Reply(554, "5.6.0", "checked bad edits")
        self.seen["after"] = message.headers()
        return None


def send(server, extra: bytes, rcpts=("alice@example.test",), mail_from="s@example.org"):
    with smtplib.SMTP(server.host, server.port, timeout=20) as client:
        client.ehlo("client.test")
        client.sendmail(mail_from, list(rcpts), extra + MESSAGE)


def test_headers_are_edited_by_name_and_occurrence_and_raw_values_decode(
        ingress_inprocess_server):
    editor = Editor()
    server = ingress_inprocess_server(CONFIG, plugins={"editor": editor})
    send(server, b"X-Do: headers\r\n")
    [stored] = server.mailbox("alice@example.test")
    head, _, body = stored.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"Return-Path: <s@example.org>"
    assert lines[1] == b"X-First: above everything"
    assert lines[2].startswith(b"Received: from client.test")
    assert lines[3:] == [
        b"X-Top: inserted at the top",
        b"Subject: =?utf-8?q?caf=C3=A9?=",
        b"X-Tag: one",
        b"x-tag: TWO",
        b"X-End: line one",
        b" line two",
        b"X-Absent: added because missing",
    ]
    assert body == b"the body\r\n"
    assert ("Subject", "café") in editor.seen["decoded"]
    assert ("Subject", "=?utf-8?q?caf=C3=A9?=") in editor.seen["raw"]
    assert ("X-Long", "first part second part") in editor.seen["raw"]
    assert ("X-End", "line one line two") in editor.seen["after"]


def test_a_replaced_body_is_spooled_and_stored_whole(ingress_inprocess_server):
    server = ingress_inprocess_server(CONFIG, plugins={"editor": Editor()})
    send(server, b"X-Do: body\r\n")
    [stored] = server.mailbox("alice@example.test")
    head, _, body = stored.partition(b"\r\n\r\n")
    assert b"X-Tag: one" in head and b"X-Do" not in head
    assert body == b"new body line\r\n" * 100_000  # 1.5 MB: more than the spool keeps in memory


def test_recipients_and_sender_are_changed(ingress_inprocess_server, caplog):
    server = ingress_inprocess_server(RELAYING, plugins={"editor": Editor()})
    send(server, b"X-Do: recipients\r\n")
    assert server.mailbox("alice@example.test") == []
    [stored] = server.mailbox("bob@example.test")
    assert stored.startswith(b"Return-Path: <bounces@example.test>\r\n")
    [(envelope, _)] = server.queue_entries()
    assert envelope["mail_from"] == "bounces@example.test"
    assert envelope["recipients"] == [{"address": "carol@elsewhere.test", "params": {}}]
    assert not (server.maildir / "example.test" / "nobody").exists()
    assert "a plugin added <nobody@example.test>, which has no mailbox here" in caplog.text


def test_a_message_without_recipients_left_is_stored_nowhere(ingress_inprocess_server, caplog):
    server = ingress_inprocess_server(CONFIG, plugins={"editor": Editor()})
    send(server, b"X-Do: drop-all\r\n")
    assert server.all_messages() == []
    assert "plugins removed every recipient: stored nowhere" in caplog.text


def test_quarantine_stores_apart_and_says_why(ingress_inprocess_server):
    server = ingress_inprocess_server(RELAYING, plugins={"editor": Editor()})
    send(server, b"X-Do: quarantine\r\n", rcpts=("alice@example.test", "dave@elsewhere.test"))
    assert server.mailbox("alice@example.test") == []
    [stored] = server.mailbox("alice@example.test", folder="Quarantine")
    assert b"\r\nX-Ingress-Quarantine: looks odd\r\n" in stored
    [(envelope, eml)] = server.queue_entries()
    assert envelope["quarantine"] == "looks odd"
    assert b"\r\nX-Ingress-Quarantine: looks odd\r\n" in eml
    jsonschema.Draft202012Validator(ingress_schemas.load("envelope")).validate(envelope)


def test_bad_edits_are_refused_with_value_errors(ingress_inprocess_server):
    server = ingress_inprocess_server(CONFIG, plugins={"editor": Editor()})
    with pytest.raises(smtplib.SMTPDataError) as refused:
        send(server, b"X-Do: bad\r\n")
    assert refused.value.smtp_code == 554  # every bad edit raised ValueError
    assert server.all_messages() == []


def test_edits_of_a_message_on_disk_read_back_through_every_reader(tmp_path):
    message = Message(tmp_path, None)
    message.write(b"A: 1\r\nB: 2\r\n\r\n" + b"x" * (2 << 20))
    assert not message.in_memory
    message.change_header("a", "one")
    message.insert_header(1, "Between", "a and b")
    expected = b"a: one\r\nBetween: a and b\r\nB: 2\r\n\r\n" + b"x" * (2 << 20)
    assert b"".join(message.chunks()) == expected
    with message.open() as reader:
        assert reader.read() == expected
    assert message.getvalue() is None
    assert message.head() == b"a: one\r\nBetween: a and b\r\nB: 2\r\n\r\n"
    message.replace_body([b"short\r\n"])
    assert message.in_memory and message.getvalue() == message.head() + b"short\r\n"
    message.discard()
    assert list(tmp_path.iterdir()) == []


def test_a_body_past_the_size_limit_is_refused(tmp_path):
    message = Message(tmp_path, 1000)
    message.write(b"A: 1\r\n\r\nbody\r\n")
    with pytest.raises(ValueError, match="size limit"):
        message.replace_body(b"y" * 2000)
    assert message.getvalue() == b"A: 1\r\n\r\nbody\r\n"


def test_a_message_without_a_header_block_gets_one(tmp_path):
    message = Message(tmp_path, None)
    message.write(b"\r\nno headers\r\n")
    message.append_header("X-New", "1")
    assert message.getvalue() == b"X-New: 1\r\n\r\nno headers\r\n"


def test_remove_headers_takes_every_match_in_one_pass(tmp_path):
    message = Message(tmp_path, None)
    forged = b"Authentication-Results: mx.test;\r\n spf=pass\r\n"
    message.write(b"Subject: s\r\n" + forged * 5000
                  + b"authentication-results: other.test; dkim=pass\r\n\r\nbody\r\n")
    ours = message.remove_headers("Authentication-Results", lambda v: v.startswith("mx.test;"))
    assert ours == 5000
    assert message.headers() == [("Subject", "s"),
                                 ("authentication-results", "other.test; dkim=pass")]
    assert message.remove_headers("X-None") == 0
    assert message.remove_headers("AUTHENTICATION-RESULTS") == 1
    assert message.getvalue() == b"Subject: s\r\n\r\nbody\r\n"
