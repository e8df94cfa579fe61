"""schemas/envelope.json describes every envelope the relay queue writes: a real server driven
through DSN parameters, authentication, the null sender, several recipients, aliases and a
server-generated DSN; every <id>.json must validate, and say what the session said."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import jsonschema
import pytest

import ingress_schemas
from ingress.delivery import queue

SCHEMA = ingress_schemas.load("envelope")
DIRECTORY = {
    "domains": ["example.test"],
    "users": [{"address": "alice@example.test", "password": "alicepw"},
              {"address": "bob@example.test", "password": "bobpw"}],
    "aliases": {"team@example.test": ["bob@example.test", "carol@elsewhere.test",
                                      "dan@elsewhere.test"]},
}
CONFIG = {"directory": DIRECTORY,
          "plugins": {"auth": {"disable_plain_without_tls": False}}}
BODY = b"From: alice@example.test\r\nSubject: envelope\r\n\r\nHello.\r\n"


def validate(envelope: dict) -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    jsonschema.Draft202012Validator(SCHEMA).validate(envelope)
    for key in ("received_at", "queued_at"):
        assert datetime.fromisoformat(envelope[key]).utcoffset().total_seconds() == 0


def raw_session(server, lines: list[str]) -> list[tuple[int, str]]:
    with server.raw() as raw:
        raw.reply()
        replies = [raw.cmd(line) for line in lines]
        assert raw.cmd("DATA")[0] == 354
        replies.append(raw.cmd(BODY.decode() + "."))
        raw.cmd("QUIT")
    return replies


def test_every_envelope_the_queue_writes_validates(ingress_server):
    server = ingress_server(CONFIG)
    # 1. DSN parameters on MAIL and RCPT, several recipients, an alias with remote members
    replies = raw_session(server, [
        "EHLO client.example.org",
        "MAIL FROM:<someone@elsewhere.test> RET=HDRS ENVID=id+2B1 SIZE=100",
        "RCPT TO:<team@example.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;team+2B1@example.test",
        "RCPT TO:<alice@example.test>",
    ])
    assert [code for code, _ in replies] == [250] * 5
    # 2. authenticated, null sender, several remote recipients
    with server.smtp() as client:
        client.ehlo("auth.example.org")
        client.login("alice@example.test", "alicepw")
        refused = client.sendmail("<>", ["x@remote.test", "y@remote.test"], BODY)
        assert refused == {}
    # 3. HELO (plain SMTP), one remote member through an alias, no parameters
    replies = raw_session(server, ["HELO old.example.org", "MAIL FROM:<>",
                                   "RCPT TO:<team@example.test>"])
    assert [code for code, _ in replies] == [250] * 4
    # 4. a success DSN the server writes itself, for a sender outside the local domains
    with server.smtp() as client:
        client.ehlo("dsn.example.org")
        client.login("bob@example.test", "bobpw")
        client.sendmail("bob@remote.test", ["alice@example.test"], BODY,
                        rcpt_options=["NOTIFY=SUCCESS"])

    entries = server.queue_entries()
    assert len(entries) >= 4
    for envelope, data in entries:
        validate(envelope)
        meta = Path(server.queue) / f"{envelope['id']}.json"
        assert meta.read_text() == queue.dumps(envelope), "the file is the documented text"
        assert data.endswith(BODY) or envelope["generated"]

    first, auth, plain = [env for env, _ in entries if not env["generated"]]
    assert first["mail_from"] == "someone@elsewhere.test"
    assert first["mail_params"] == {"RET": "HDRS", "ENVID": "id+2B1", "SIZE": "100"}
    params = {"NOTIFY": "SUCCESS,FAILURE", "ORCPT": "rfc822;team+2B1@example.test"}
    assert first["recipients"] == [{"address": "carol@elsewhere.test", "params": params},
                                   {"address": "dan@elsewhere.test", "params": params}]
    assert (first["helo"], first["protocol"], first["auth_user"]) == (
        "client.example.org", "ESMTP", None)
    assert first["client_ip"] == "127.0.0.1" and 0 < first["client_port"] < 65536
    assert first["smtputf8"] is False and first["generated"] is False

    assert auth["mail_from"] == "" and auth["auth_user"] == "alice@example.test"
    assert (auth["helo"], auth["protocol"]) == ("auth.example.org", "ESMTPA")
    assert [r["address"] for r in auth["recipients"]] == ["x@remote.test", "y@remote.test"]

    assert (plain["helo"], plain["protocol"], plain["mail_params"]) == ("old.example.org",
                                                                         "SMTP", {})
    assert plain["received_at"] <= plain["queued_at"]

    dsns = {env["recipients"][0]["address"]: env for env, _ in entries if env["generated"]}
    dsn = dsns["bob@remote.test"]
    assert dsn["recipients"] == [{"address": "bob@remote.test", "params": {}}]
    assert (dsn["client_ip"], dsn["helo"], dsn["protocol"]) == (None, None, "local")


@pytest.mark.parametrize("bad", [
    {"id": "not hex"}, {"recipients": []}, {"protocol": "LMTP"}, {"client_port": 70000},
    {"received_at": "yesterday"}, {"mail_params": {"size": "1"}}, {"unknown": 1},
])
def test_the_schema_is_not_a_formality(ingress_server, bad):
    server = ingress_server(CONFIG)
    with server.smtp() as client:
        client.sendmail("a@elsewhere.test", ["team@example.test"], BODY)
    [(envelope, _)] = server.queue_entries()
    validate(envelope)
    with pytest.raises(jsonschema.ValidationError):
        validate({**envelope, **bad})


def test_schema_is_shipped_with_the_core():
    assert json.loads(json.dumps(SCHEMA))["additionalProperties"] is False
    assert set(SCHEMA["required"]) == set(SCHEMA["properties"])
