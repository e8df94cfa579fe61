"""The command-line and MAIL/RCPT parameter parsers as properties, against hostile input.

Two levels: the pure parsing functions (no exception, results of the promised shape, Python-level
work proportional to the input), and a real server fed random command lines built from the
pieces attackers use (brackets, quotes, NULs, 8-bit bytes, source routes, DSN parameters, long
runs): every reply is well formed and carries an enhanced status code, the session stays usable,
and the log never shows a traceback.
"""

from __future__ import annotations

import re
import sys

import pytest
from conftest import examples
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingress.syntax import COMMAND_LIMIT, bdat_size, parse_params, parse_path, valid_address
from ingress.testing import SMTPRaw, server_config, start_subprocess

PIECES = [
    "<", ">", "<>", "@", ":", ",", ";", '"', "\\", "=", " ", "  ", "\t", ".", "..", "%", "!",
    "a", "Z", "0", "-", "+", "a" * 70, "x" * 300, "example.test", "[127.0.0.1]", "[IPv6:::1]",
    "postmaster", "FROM:", "TO:", "SIZE=", "SIZE=12", "BODY=8BITMIME", "BODY=", "RET=FULL",
    "ENVID=", "NOTIFY=SUCCESS,FAILURE", "NOTIFY=NEVER", "ORCPT=rfc822;", "+2B", "+zz",
    "SMTPUTF8", "AUTH=<>", "\x00", "\x7f", "é", "用户", "\udcff",
]
VERBS = ["VRFY", "EXPN", "NOOP", "RSET", "HELP", "XYZZY", "", "PROXY", "BDAT", "TURN", "DATA x"]

hostile_text = st.lists(st.one_of(st.sampled_from(PIECES), st.text(max_size=8)),
                        max_size=24).map("".join)
# Mostly well-formed pieces, so that random sessions get far (a MAIL accepted, then RCPTs and a
# second MAIL), with hostile text mixed in everywhere.
good_local = st.sampled_from(["alice", "a.b", '"x y"', "x+tag", "postmaster", "UPPER"])
good_domain = st.sampled_from(["example.test", "EXAMPLE.test", "outside.test", "[127.0.0.1]"])
good_address = st.builds(lambda local, dom: f"{local}@{dom}", good_local, good_domain)
address = st.one_of(good_address, good_address,
                    st.builds(lambda local, dom: f"{local}@{dom}",
                              st.one_of(good_local, hostile_text),
                              st.one_of(good_domain, hostile_text)))
path = st.one_of(address.map(lambda a: f"<{a}>"), address.map(lambda a: f"<{a}>"),
                 address, st.just("<>"),
                 st.builds(lambda route, a: f"<{route}:{a}>", st.sampled_from(["@a", "@a,@b"]),
                           address),
                 hostile_text)
parameter = st.builds(
    lambda key, eq, value: f" {key}{eq}{value}",
    st.one_of(st.sampled_from(["SIZE", "BODY", "RET", "ENVID", "NOTIFY", "ORCPT", "SMTPUTF8",
                               "AUTH", "X-Y", "size"]), hostile_text),
    st.sampled_from(["=", "", "=="]),
    st.one_of(st.sampled_from(["100", "8BITMIME", "7BIT", "FULL", "HDRS", "NEVER",
                               "SUCCESS,DELAY", "rfc822;a+40b", "rfc822;+ZZ", "x" * 120]),
              hostile_text))
parameters = st.one_of(st.just([]), st.just([]), st.lists(parameter, max_size=4))
command = st.one_of(
    st.builds(lambda verb, host: f"{verb} {host}", st.sampled_from(["EHLO", "HELO", "ehlo"]),
              st.one_of(st.just("client.test"), hostile_text)),
    st.builds(lambda p, ps: f"MAIL FROM:{p}{''.join(ps)}", path, parameters),
    st.builds(lambda p, ps: f"RCPT TO:{p}{''.join(ps)}", path, parameters),
    st.builds(lambda p, ps: f"MAIL FROM:{p}{''.join(ps)}", path, parameters),
    st.builds(lambda p, ps: f"RCPT TO:{p}{''.join(ps)}", path, parameters),
    st.builds(lambda verb, arg: f"{verb} {arg}".strip(), st.sampled_from(VERBS), hostile_text),
)


PARAM_KEY = re.compile(r"[A-Z0-9][A-Z0-9-]*")
PARAM_VALUE = re.compile(r"[\x21-\x3c\x3e-\x7e]+")


class LineCounter:
    """Counts the Python lines executed while active: a deterministic measure of work."""

    def __init__(self):
        self.lines = 0

    def _trace(self, frame, event, arg):
        if event == "line":
            self.lines += 1
        return self._trace

    def __enter__(self):
        sys.settrace(self._trace)
        return self

    def __exit__(self, *exc):
        sys.settrace(None)


@settings(max_examples=examples(400), deadline=None)
@given(arg=st.one_of(hostile_text, st.builds(lambda kw, p, ps: f"{kw}{p}{''.join(ps)}",
                                             st.sampled_from(["FROM:", "TO:", "to: "]), path,
                                             st.lists(parameter, max_size=6))),
       keyword=st.sampled_from(["FROM:", "TO:"]))
def test_parse_path_and_params_never_raise_and_stay_linear(arg, keyword):
    params, error, params_text = {}, None, ""
    with LineCounter() as work:  # only the parsers run inside: the count is their work
        parsed = parse_path(arg, keyword)
        if parsed is not None:
            valid_address(parsed[0])
            params, error = parse_params(parsed[1])
    assert work.lines <= 40 + 12 * len(arg), (work.lines, len(arg))
    if parsed is not None:
        address, params_text = parsed
        assert isinstance(address, str) and isinstance(params_text, str)
    assert error is None or isinstance(error, str)
    for key, value in params.items():
        assert key == key.upper() and PARAM_KEY.fullmatch(key)
        assert value is None or PARAM_VALUE.fullmatch(value)
    if parsed is not None and error is None:
        assert len(params) == len(params_text.split())


@settings(max_examples=examples(400), deadline=None)
@given(local=hostile_text, domain=hostile_text)
def test_valid_address_accepts_only_bounded_rfc5321_mailboxes(local, domain):
    address = f"{local}@{domain}"
    if valid_address(address):  # UTF-8 allowed (RFC 6531); the octets are bounded
        assert len(address.encode()) <= 254 and 0 < len(local.encode()) <= 64
        assert address.isprintable() and not any(c in address for c in "\x00\r\n<> ")


ENHANCED = re.compile(r"[245]\.\d{1,3}\.\d{1,3}( |$)")
REPLY_LINE = re.compile(r"[2-5]\d\d[ -]")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("parsers")
    config = server_config(tmp, {
        "directory": {"domains": ["example.test"],
                      "domain_settings": {"example.test": {"catch_all": True}}},
        # errors are the point here: never close a session for them
        "plugins": {"max_bad_commands": {"limit": 0}, "max_bad_recipients": {"limit": 0},
                    "vrfy": {"enabled": True}, "expn": {"enabled": True}},
    })
    running = start_subprocess(config, tmp)
    yield running
    running.stop()
    assert "Traceback" not in running.log()


def check_reply(verb: str, code: int, text: str) -> None:
    assert 200 <= code < 600, (code, text)
    if verb in ("EHLO", "HELO") and code == 250:
        return  # RFC 2034: no enhanced code on the HELO/EHLO reply
    for line in text.split("\n"):
        assert ENHANCED.match(line), (verb, code, text)


@settings(max_examples=examples(300), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(commands=st.lists(st.tuples(command, st.sampled_from(["utf-8", "latin-1", "raw"])),
                         min_size=1, max_size=12))
def test_every_reply_to_hostile_commands_is_well_formed(server, commands):
    with SMTPRaw(server.host, server.port) as raw:
        assert raw.reply()[0] == 220
        assert raw.cmd("EHLO client.test")[0] == 250
        for line, encoding in commands:
            if encoding == "raw":
                data = line.encode("utf-8", "surrogateescape")
            else:
                data = line.encode(encoding, "replace")
            data = data.replace(b"\r", b"").replace(b"\n", b"")
            octets = b""
            if data[:5].upper() == b"BDAT " and len(data) + 2 <= COMMAND_LIMIT:
                size = bdat_size(data[5:].decode("utf-8", "surrogateescape").strip())
                if size is not None:  # a valid BDAT is followed by its octets
                    if size[0] > 4096:
                        continue
                    octets = b"x" * size[0]
            raw.send(data + b"\r\n" + octets)
            got = []
            while True:  # read every line of the reply, checking each one's shape
                got.append(raw._line().decode("utf-8", "replace"))
                assert REPLY_LINE.match(got[-1]), (data, got)
                if got[-1][3] == " ":
                    break
            code, text = int(got[0][:3]), "\n".join(each[4:] for each in got)
            if len(data) + 2 > COMMAND_LIMIT and code == 500:
                assert "Line too long" in text
            check_reply(line.split(" ", 1)[0].upper(), code, text)
            assert code != 421, (data, text)
        code, text = raw.cmd("NOOP")  # the session is still usable
        assert (code, text) == (250, "2.0.0 OK")
