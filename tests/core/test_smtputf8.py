"""SMTPUTF8 (RFC 6531), PROTOCOL.md section 2: real clients (smtplib, aiosmtplib, raw sockets)
send UTF-8 addresses to IDN domains; one folder per NFC local part; A-labels and U-labels name
one local domain everywhere; 553 5.6.7 without SMTPUTF8; bytes that are not UTF-8 get a clear
reply; Received says UTF8SMTP; the queue envelope says smtputf8; check-config normalises and
rejects directory entries; and the address rules as properties."""

from __future__ import annotations

import asyncio
import email
import json
import smtplib
import subprocess
import sys
import unicodedata
from email.message import EmailMessage
from email.policy import SMTPUTF8
from pathlib import Path

import aiosmtplib
import jsonschema
import pytest
from conftest import examples
from hypothesis import given, settings
from hypothesis import strategies as st

import ingress_schemas
from ingress import addresses
from ingress.directory import Directory, DirectoryError

NFC_JOERG = unicodedata.normalize("NFC", "jörg")
NFD_JOERG = unicodedata.normalize("NFD", "jörg")
assert NFC_JOERG != NFD_JOERG

DIRECTORY = {
    # one IDN in U-label form, one in A-label form: both are compared as A-labels
    "domains": ["Bücher.example", "xn--fsqu00a.xn--4rr70v", "catch.example"],
    "users": [
        {"address": "Jörg@bücher.example", "password": "pw", "name": "Jörg Bücher"},
        {"address": "用户@例子.广告", "password": "pw2"},
        {"address": "alice@xn--bcher-kva.example", "password": "alicepw"},
    ],
    "aliases": {"liste@xn--bcher-kva.example": ["jörg@bücher.example", "用户@例子.广告"]},
    "domain_settings": {"catch.example": {"catch_all": True}},
}
BODY = "From: Jörg <jörg@bücher.example>\r\nSubject: Grüße\r\n\r\nHallo, 世界.\r\n".encode()


def config(**plugins) -> dict:
    return {"directory": DIRECTORY, "plugins": plugins}


@pytest.fixture
def server(ingress_server):
    return ingress_server(config(vrfy={"enabled": True}, expn={"enabled": True},
                                 relay={"whitelist": []}))


def folder(server, domain: str, name: str) -> Path:
    return server.maildir / domain / name / "new"


# -- real clients -------------------------------------------------------------------------------

def test_ehlo_offers_smtputf8_and_smtplib_delivers_to_idn_domains(server):
    with server.smtp() as client:
        client.ehlo("client.example.org")
        assert client.has_extn("smtputf8")
        refused = client.sendmail("sender@例子.广告", ["用户@例子.广告", "jörg@bücher.example"],
                                  BODY, mail_options=["SMTPUTF8"])
        assert refused == {}
    [stored] = list(folder(server, "xn--fsqu00a.xn--4rr70v", "用户").iterdir())
    assert stored.read_bytes().endswith(BODY)  # UTF-8 headers stored as sent
    assert stored.read_bytes().startswith("Return-Path: <sender@例子.广告>\r\n".encode())
    assert len(list(folder(server, "xn--bcher-kva.example", NFC_JOERG).iterdir())) == 1
    assert server.mailbox("JÖRG@BÜCHER.example") == server.mailbox("jörg@xn--bcher-kva.example")


def test_smtplib_send_message_turns_smtputf8_on_by_itself(server):
    message = EmailMessage(policy=SMTPUTF8)
    message["From"] = "用户@例子.广告"
    message["To"] = "jörg@bücher.example"
    message["Subject"] = "send_message"
    message.set_content("x")
    with server.smtp() as client:
        client.send_message(message)  # smtplib adds SMTPUTF8 for international addresses
    [stored] = server.mailbox("jörg@bücher.example")
    assert "send_message" in stored.decode()


def test_aiosmtplib(server):
    async def send():
        async with aiosmtplib.SMTP(hostname=server.host, port=server.port,
                                   start_tls=False) as client:
            await client.ehlo()
            assert client.supports_extension("smtputf8")
            errors, _ = await client.sendmail("jörg@bücher.example", ["用户@例子.广告"], BODY,
                                              mail_options=["SMTPUTF8"])
            assert errors == {}

    asyncio.run(send())
    assert len(server.mailbox("用户@xn--fsqu00a.xn--4rr70v")) == 1


def test_nfc_and_nfd_forms_of_one_local_part_land_in_one_folder(server):
    with server.raw() as raw:
        raw.reply()
        raw.cmd("EHLO client.example.org")
        for local in (NFC_JOERG, NFD_JOERG, NFD_JOERG.upper(), "Jörg"):
            for domain in ("bücher.example", "xn--bcher-kva.example", "catch.example"):
                assert raw.cmd("MAIL FROM:<a@example.org> SMTPUTF8")[0] == 250
                assert raw.cmd(f"RCPT TO:<{local}@{domain}>")[0] == 250, (local, domain)
                assert raw.cmd("DATA")[0] == 354
                assert raw.cmd(b"Subject: x\r\n\r\nx\r\n.")[0] == 250
    assert sorted(p.relative_to(server.maildir).parts[:2] for p in server.all_messages()) == \
        sorted([("xn--bcher-kva.example", NFC_JOERG)] * 8 + [("catch.example", NFC_JOERG)] * 4)


def test_a_label_and_u_label_are_one_local_domain(server):
    # relay is denied by default: acceptance shows the domain is local in either form
    with server.raw() as raw:
        raw.reply()
        raw.cmd("EHLO client.example.org")
        assert raw.cmd("MAIL FROM:<a@example.org> SMTPUTF8")[0] == 250
        assert raw.cmd("RCPT TO:<alice@bücher.example>") == (250, "2.1.5 Recipient OK")
        assert raw.cmd("RCPT TO:<ALICE@xn--BCHER-KVA.example>") == (250, "2.1.5 Recipient OK")
        assert raw.cmd("RCPT TO:<用户@xn--fsqu00a.xn--4rr70v>")[0] == 250
        assert raw.cmd("RCPT TO:<nobody@例子.广告>")[:1] == (550,)
        assert raw.cmd("RCPT TO:<x@bücher.elsewhere>") == (550, "5.7.1 Relaying denied")
        assert raw.cmd("DATA")[0] == 354
        assert raw.cmd(b"Subject: x\r\n\r\nx\r\n.")[0] == 250
    assert len(server.mailbox("alice@xn--bcher-kva.example")) == 1  # two RCPTs, one copy
    assert len(server.mailbox("用户@例子.广告")) == 1


def test_unsafe_utf8_local_part_in_a_catch_all_domain(server):
    with server.raw() as raw:
        raw.reply()
        raw.cmd("EHLO client.example.org")
        assert raw.cmd("MAIL FROM:<a@example.org> SMTPUTF8")[0] == 250
        # U+2215 DIVISION SLASH looks like "/": a symbol, never a folder name
        assert raw.cmd("RCPT TO:<a\u2215b@catch.example>")[0:1] == (553,)
        assert raw.cmd("RCPT TO:<a\u2215b@catch.example>")[1].startswith("5.1.3")
        assert raw.cmd("RCPT TO:<分机@catch.example>")[0] == 250
    assert not (server.maildir / "catch.example" / "a\u2215b").exists()


# -- refusals -----------------------------------------------------------------------------------

def test_non_ascii_address_without_smtputf8_is_553_5_6_7(server):
    with server.raw() as raw:
        raw.reply()
        raw.cmd("EHLO client.example.org")
        need = (553, "5.6.7 Non-ASCII address requires SMTPUTF8")
        assert raw.cmd("MAIL FROM:<jörg@bücher.example>") == need
        assert raw.cmd("MAIL FROM:<a@bücher.example> SIZE=10") == need
        assert raw.cmd("MAIL FROM:<a@example.org>")[0] == 250
        assert raw.cmd("RCPT TO:<用户@例子.广告>") == need
        assert raw.cmd("RCPT TO:<alice@xn--bcher-kva.example>")[0] == 250  # A-labels are ASCII
        assert raw.cmd("RSET")[0] == 250
        assert raw.cmd("MAIL FROM:<a@example.org> SMTPUTF8=yes") == (
            501, "5.5.4 SMTPUTF8 takes no value")
        assert raw.cmd("MAIL FROM:<a@example.org> smtputf8")[0] == 250
        assert raw.cmd("RCPT TO:<用户@例子.广告>")[0] == 250


@pytest.mark.parametrize("line, code", [
    (b"MAIL FROM:<j\xf6rg@example.org> SMTPUTF8", 501),  # Latin-1, not UTF-8
    (b"MAIL FROM:<\xff\xfe@example.org>", 501),
    (b"MAIL FROM:<a@example.org> SMTPUTF8 X=\xc3", 501),  # truncated sequence
    (b"VRFY j\xf6rg", 501),
    (b"NOOP \xed\xa0\x80", 501),  # an encoded surrogate is not UTF-8
    (b"BDAT 5\xe9 LAST", 501),  # nothing is read: no size could be parsed
    (b"J\xc3\xb6RG x", 500),  # a verb is ASCII
])
def test_bytes_that_are_not_utf8_get_a_clear_reply(server, line, code):
    with server.raw() as raw:
        raw.reply()
        raw.cmd("EHLO client.example.org")
        got = raw.cmd(line)
        assert got[0] == code
        assert got[1] == ("5.5.2 Command line is not valid UTF-8" if code == 501
                          else "5.5.2 Syntax error, command unrecognized")
        assert raw.cmd("NOOP") == (250, "2.0.0 OK")  # still in step
        assert raw.cmd("MAIL FROM:<jörg@bücher.example> SMTPUTF8")[0] == 250
    assert "Traceback" not in server.log()


# -- trace header and envelope ------------------------------------------------------------------

def test_received_says_utf8smtp_and_utf8smtpa(server):
    with server.smtp() as client:
        client.sendmail("a@example.org", ["alice@bücher.example"], b"Subject: 1\r\n\r\nx\r\n",
                        mail_options=["SMTPUTF8"])
        client.sendmail("a@example.org", ["alice@xn--bcher-kva.example"],
                        b"Subject: 2\r\n\r\nx\r\n")
        client.login("alice@xn--bcher-kva.example", "alicepw")
        client.sendmail("alice@bücher.example", ["alice@bücher.example"],
                        b"Subject: 3\r\n\r\nx\r\n", mail_options=["SMTPUTF8"])
    withs = [email.message_from_bytes(m, policy=SMTPUTF8)["Received"].split(" with ")[1]
             .split()[0] for m in server.mailbox("alice@bücher.example")]
    assert withs == ["UTF8SMTP", "ESMTP", "UTF8SMTPA"]


def test_received_says_utf8smtps_and_utf8smtpsa_over_tls(ingress_server, tls):
    server = ingress_server({**config(), "server": tls.server(implicit=True)})
    with smtplib.SMTP_SSL(server.host, server.tls_port, context=tls.context(),
                          timeout=10) as client:
        client.sendmail("a@example.org", ["用户@例子.广告"], b"Subject: 1\r\n\r\nx\r\n",
                        mail_options=["SMTPUTF8"])
        client.login("alice@xn--bcher-kva.example", "alicepw")
        client.sendmail("alice@bücher.example", ["用户@例子.广告"], b"Subject: 2\r\n\r\nx\r\n",
                        mail_options=["SMTPUTF8"])
    withs = [email.message_from_bytes(m, policy=SMTPUTF8)["Received"].split(" with ")[1]
             .split()[0] for m in server.mailbox("用户@例子.广告")]
    assert withs == ["UTF8SMTPS", "UTF8SMTPSA"]


def test_queue_envelope_records_smtputf8(ingress_server):
    server = ingress_server(config(relay={"whitelist": ["127.0.0.1"]}))
    with server.smtp() as client:
        client.sendmail("jörg@bücher.example", ["müller@straße.example"], BODY,
                        mail_options=["SMTPUTF8"])
        client.sendmail("a@example.org", ["b@elsewhere.example"], b"Subject: x\r\n\r\nx\r\n")
    entries = sorted(server.queue_entries(), key=lambda e: e[0]["received_at"])
    validator = jsonschema.Draft202012Validator(ingress_schemas.load("envelope"))
    for envelope, _ in entries:
        validator.validate(envelope)
    assert [e["smtputf8"] for e, _ in entries] == [True, False]
    first, eml = entries[0]
    assert first["mail_from"] == "jörg@bücher.example"
    assert first["recipients"] == [{"address": "müller@straße.example", "params": {}}]
    assert "SMTPUTF8" in first["mail_params"] and first["mail_params"]["SMTPUTF8"] is None
    assert b" with UTF8SMTP id " in eml and eml.endswith(BODY)


# -- VRFY and EXPN ------------------------------------------------------------------------------

def test_vrfy_and_expn_take_utf8_and_ignore_the_smtputf8_parameter(server):
    with server.raw() as raw:
        raw.reply()
        raw.cmd("EHLO client.example.org")
        user = (250, "2.1.5 Jörg Bücher <Jörg@xn--bcher-kva.example>")
        assert raw.cmd("VRFY jörg@bücher.example") == user
        assert raw.cmd(f"VRFY <{NFD_JOERG}@xn--bcher-kva.example> SMTPUTF8") == user
        assert raw.cmd("VRFY JÖRG smtputf8") == user
        assert raw.cmd("VRFY 用户@例子.广告")[0] == 250
        assert raw.cmd("VRFY niemand@bücher.example SMTPUTF8")[0] == 550
        assert raw.cmd("VRFY 分机@catch.example") == (250, "2.1.5 <分机@catch.example>")
        code, text = raw.cmd("EXPN liste@bücher.example SMTPUTF8")
        assert (code, text.splitlines()) == (250, ["2.1.5 <jörg@xn--bcher-kva.example>",
                                                   "2.1.5 <用户@xn--fsqu00a.xn--4rr70v>"])
        assert raw.cmd("EXPN <LISTE@xn--bcher-kva.example>")[0] == 250
        assert raw.cmd("EXPN liste")[0] == 250


# -- the directory and check-config --------------------------------------------------------------

def test_the_directory_keeps_a_labels_and_nfc():
    directory = Directory.from_config(DIRECTORY, Path("/nonexistent"))
    assert directory.domains == {"xn--bcher-kva.example", "xn--fsqu00a.xn--4rr70v",
                                 "catch.example"}
    for form in ("jörg@bücher.example", f"{NFD_JOERG}@xn--bcher-kva.example",
                 "JÖRG@BÜCHER.EXAMPLE"):
        assert directory.user(form).address == "Jörg@xn--bcher-kva.example"
        assert directory.is_local_address(form) and directory.mailbox_exists(form)
        assert directory.mailbox(form) == ("xn--bcher-kva.example", NFC_JOERG)
    assert directory.is_local_domain("例子.广告")
    assert directory.domain_settings("CATCH.example").catch_all
    assert directory.expand("liste@Bücher.example") == ["jörg@xn--bcher-kva.example",
                                                        "用户@xn--fsqu00a.xn--4rr70v"]


def errors_of(section: dict) -> list[tuple[str, str]]:
    with pytest.raises(DirectoryError) as info:
        Directory.from_config(section, Path("/nonexistent"))
    return info.value.errors


@pytest.mark.parametrize("section, pointer, fragment", [
    ({"domains": ["bücher.example", "xn--bcher-kva.example"]}, "/directory/domains/1",
     "duplicate domain 'xn--bcher-kva.example'"),
    ({"domains": ["xn--zz.example"]}, "/directory/domains/0", "invalid domain"),
    ({"domains": ["bü cher.example"]}, "/directory/domains/0", "invalid domain"),
    ({"domains": ["ｂücher.example"]}, "/directory/domains/0", "invalid domain"),  # full width
    ({"domains": ["b\u00fccher.example"],
      "users": [{"address": "j\u2215rg@bücher.example", "password": "x"}]},
     "/directory/users/0/address", "not a safe folder name"),
    ({"domains": ["bücher.example"],
      "users": [{"address": f"{NFC_JOERG}@bücher.example", "password": "x"},
                {"address": f"{NFD_JOERG}@xn--bcher-kva.example", "password": "y"}]},
     "/directory/users/1/address", "already defined at /directory/users/0/address"),
    ({"domains": ["bücher.example"], "aliases": {"a@bücher.example": ["jörg@-x.example"]}},
     "/directory/aliases/a@bücher.example/0", "invalid address"),
])
def test_directory_rejects_invalid_utf8_entries(section, pointer, fragment):
    errors = errors_of(section)
    assert [p for p, _ in errors] == [pointer], errors
    assert fragment in errors[0][1]


def ingress(*args):
    return subprocess.run([sys.executable, "-m", "ingress", *args], capture_output=True,
                          text=True, timeout=60, encoding="utf-8")


def test_check_config_accepts_either_form_and_names_bad_entries(tmp_path):
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"directory": DIRECTORY}, ensure_ascii=False), encoding="utf-8")
    result = ingress("check-config", str(good))
    assert result.returncode == 0, result.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text('[directory]\ndomains = ["bücher.example", "xn--bcher-kva.example", '
                   '"xn--zz.test"]\n[[directory.users]]\naddress = "a\u2215b@bücher.example"\n'
                   'password = "x"\n', encoding="utf-8")
    result = ingress("check-config", str(bad))
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert any(line.startswith(f"{bad}: /directory/domains/1: duplicate domain") for line in lines)
    assert any(line.startswith(f"{bad}: /directory/domains/2: invalid domain 'xn--zz.test'")
               for line in lines)
    assert any(line.startswith(f"{bad}: /directory/users/0/address: ") and
               "not a safe folder name" in line for line in lines), lines
    assert "Traceback" not in result.stderr


# -- the address rules as properties -------------------------------------------------------------

U_LABELS = ["bücher", "例子", "广告", "straße", "ελληνικά", "пример", "münchen", "español"]
local_text = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=20)
u_domain = st.lists(st.sampled_from(U_LABELS + ["example", "test", "xn--bcher-kva"]),
                    min_size=1, max_size=4).map(".".join)


@settings(max_examples=examples(300), deadline=None)
@given(local=st.one_of(local_text, st.sampled_from([NFC_JOERG, NFD_JOERG, "用户", "Ab.C"])),
       domain=u_domain)
def test_normalisation_is_idempotent_and_labels_are_equivalent(local, domain):
    address = f"{local}@{domain}"
    key = addresses.normalise(address)
    assert addresses.normalise(key) == key
    assert addresses.local_key(addresses.local_key(local)) == addresses.local_key(local)
    a_labels = addresses.domain_key(domain)
    assert a_labels.isascii() and a_labels == a_labels.lower()
    u_form = ".".join(addresses.idna.ulabel(label) for label in a_labels.split("."))
    assert addresses.domain_key(u_form) == a_labels == addresses.domain_key(domain.upper()
                                                                             if domain.isascii()
                                                                             else domain)
    assert addresses.normalise(f"{local}@{u_form}") == key
    nfd = unicodedata.normalize("NFD", address)
    assert addresses.normalise(nfd) == key
    if addresses.valid_address(address):
        assert addresses.valid_address(key) and addresses.valid_address(nfd)
        assert addresses.valid_address(f"{local}@{a_labels}")
    if addresses.is_safe_local_part(local):
        name = addresses.local_key(local)
        assert addresses.is_safe_local_part(name) and "/" not in name and name not in (".", "..")
        assert len(name.encode()) <= 64 and unicodedata.is_normalized("NFC", name)


@settings(max_examples=examples(300), deadline=None)
@given(text=st.text(max_size=30))
def test_the_wire_and_the_directory_share_one_rule(text):
    from ingress.syntax import valid_address
    for address in (text, f"{text}@bücher.example", f"a@{text}"):
        assert valid_address(address) == Directory.is_valid_address(address)
        if valid_address(address) and not addresses.valid_address(address, utf8=False):
            assert not address.isascii()
