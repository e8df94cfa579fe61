"""banner: the greeting text and its variables."""

from __future__ import annotations

import re
import time

import pytest


def greeting(server) -> tuple[int, str]:
    with server.raw() as raw:
        return raw.reply()


def test_default_banner_is_hostname_esmtp(ingress_server):
    server = ingress_server({"plugins": {"banner": {"text": "#HostName# ESMTP ready"}}})
    assert greeting(server) == (220, "mx.test ESMTP ready")


def test_variables_are_replaced(ingress_server):
    text = "#HostName#|#ConnectedIP#|#UnixTime#|#Time#|#TimeUTC#"
    server = ingress_server({"plugins": {"banner": {"text": text}}})
    before = int(time.time())
    code, line = greeting(server)
    after = int(time.time())
    assert code == 220
    host, ip, unix, local, utc = line.split("|")
    assert (host, ip) == ("mx.test", "127.0.0.1")
    assert before <= int(unix) <= after
    rfc5322 = r"[A-Z][a-z]{2}, \d{2} [A-Z][a-z]{2} \d{4} \d{2}:\d{2}:\d{2} [+-]\d{4}"
    assert re.fullmatch(rfc5322, local), local
    assert re.fullmatch(rfc5322, utc) and utc.endswith("+0000"), utc


def test_banner_text_cannot_inject_lines(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "c.json"
    path.write_text('{"plugins": {"banner": {"text": "hi\\r\\n250 fake"}}}')
    result = subprocess.run([sys.executable, "-m", "ingress", "check-config", str(path)],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "/plugins/banner/text" in result.stderr


@pytest.mark.parametrize("disabled", [(), ("banner",)])
def test_the_greeting_comes_from_the_plugin(ingress_server, disabled):
    server = ingress_server({"plugins": {"banner": {"text": "Custom #HostName# banner"}}},
                           disabled=disabled)
    code, text = greeting(server)
    assert code == 220
    if disabled:
        assert text == "mx.test ESMTP"  # the core's plain default
    else:
        assert text == "Custom mx.test banner"
