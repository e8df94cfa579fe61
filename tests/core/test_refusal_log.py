"""Every refusal (a 4xx/5xx reply) is one log line naming the plugin, the command and the reply,
in both log formats; over a real server process."""

from __future__ import annotations

import json
import re

import pytest

from ingress.testing import eventually

CONFIG = {
    "directory": {"domains": ["example.test"],
                  "users": [{"address": "alice@example.test", "password": "pw"}]},
    "plugins": {"max_bad_commands": {"limit": 3}, "max_connections": {"limit": 1}},
}
TEXT_LINE = re.compile(r" INFO ingress\.refusals: session \S+ 127\.0\.0\.1 (\S+) refused by (\S+): "
                       r"(.*)$")


def refusals(log: str, log_format: str) -> list[tuple[str, str, str]]:
    """(command, plugin, reply) of each refusal line."""
    found = []
    for line in log.splitlines():
        if log_format == "text":
            match = TEXT_LINE.search(line)
            if match:
                found.append(match.groups())
            else:
                assert "refused" not in line, line
            continue
        entry = json.loads(line)
        if entry["logger"] == "ingress.refusals":
            reply = entry["message"].split(": ", 1)[1]
            assert entry["message"] == (f"session {entry['session']} {entry['client']} "
                                        f"{entry['command']} refused by {entry['plugin']}: {reply}")
            assert reply.startswith(f"{entry['code']} {entry['enhanced']} ")
            found.append((entry["command"], entry["plugin"], reply))
    return found


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_each_refusal_is_one_line_with_plugin_command_and_reply(ingress_server, log_format):
    server = ingress_server(CONFIG, log_format=log_format)
    expected = []

    def refused(client, line, plugin, command):
        code, text = client.cmd(line)
        assert code >= 400, (line, code, text)
        expected.append((command, plugin, f"{code} {text}"))

    with server.raw() as client:
        assert client.reply()[0] == 220
        with server.raw() as second:  # over max_connections' limit of 1: refused at connect
            code, text = second.reply()
            assert code == 421
            expected.append(("CONNECT", "max_connections", f"{code} {text}"))
        assert client.cmd("EHLO client.example")[0] == 250
        refused(client, "MAIL FROM:<a@example.org> XFOO=1", "params", "MAIL")
        assert client.cmd("MAIL FROM:<a@example.org>")[0] == 250
        refused(client, "RCPT TO:<bob@elsewhere.test>", "relay", "RCPT")
        refused(client, "RCPT TO:<nobody@example.test>", "mailbox", "RCPT")
        assert client.cmd("RCPT TO:<alice@example.test>")[0] == 250  # accepted: no line
        refused(client, "XYZZY", "core", "XYZZY")  # bad command 1 of 3
        refused(client, "VRFY", "core", "VRFY")  # 2
        refused(client, "MAIL FROM:<b@example.org>", "core", "MAIL")  # 3: nested MAIL
        code, text = client.reply()  # the reply max_bad_commands sends after the third
        assert code == 421
        expected.append(("MAIL", "max_bad_commands", f"{code} {text}"))
        assert client.closed_by_server()

    eventually(lambda: server.log().count(" ended: ") == 2, what="both sessions ended")
    log = server.log()
    assert sorted(refusals(log, log_format)) == sorted(expected)
    assert len(expected) == 8
