"""`ingress serve` with no --config: the embedded default, as the README's first command runs it."""

from __future__ import annotations

import smtplib
import subprocess
import sys

from ingress.testing import READY


def test_embedded_default_serves_localhost_catch_all(tmp_path):
    process = subprocess.Popen([sys.executable, "-m", "ingress", "serve"], cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        assert line.strip() == "ingress: listening on 127.0.0.1:2525 (smtp)", (
            line + process.stderr.read() if process.poll() is not None else line)
        assert READY.search(line)
        with smtplib.SMTP("127.0.0.1", 2525, timeout=10) as client:
            client.sendmail("someone@example.org", ["Anyone@localhost"], "Subject: hi\r\n\r\nx\r\n")
            client.mail("a@b.example")
            code, text = client.rcpt("a/b@localhost")  # valid syntax, unsafe folder name
            assert (code, text[:5]) == (553, b"5.1.3")
            assert client.rcpt("../escape@localhost")[0] == 501  # not even valid syntax
    finally:
        process.terminate()
        out, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    [stored] = list((tmp_path / "var" / "mail" / "localhost" / "anyone" / "new").iterdir())
    assert stored.read_bytes().startswith(b"Return-Path: <someone@example.org>\r\n")
    assert "accepted" in err and "someone@example.org" in err
