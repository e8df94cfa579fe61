"""A real MTA sending with BDAT: a private Dovecot submission server (its own config, run and
state folders, started in the foreground by the test and stopped by its PID) relaying to
ingress. Dovecot's SMTP client uses BDAT when the server offers CHUNKING (Postfix's does not: see
test_bdat_postfix.py). The message must arrive byte for byte, in several chunks."""

from __future__ import annotations

import os
import shutil
import signal
import smtplib
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from ingress import hookimpl
from ingress.testing import eventually, free_port

pytestmark = pytest.mark.skipif(
    shutil.which("dovecot") is None or os.geteuid() != 0
    or not Path("/usr/lib/dovecot/submission").exists(),
    reason="needs Debian's dovecot-core and dovecot-submissiond, and root")

USERS = {"domains": ["example.test"],
         "users": [{"address": "alice@example.test", "password": "alicepw"}]}


class Observer:
    """Records every command verb with its argument, and takes the AUTH parameter of MAIL that
    Dovecot sends (RFC 4954 5) even to a server that offers no AUTH."""

    def __init__(self):
        self.seen: list[tuple[str, str]] = []

    @hookimpl
    def on_command(self, verb, arg):
        self.seen.append((verb, arg))

    @hookimpl
    def esmtp_parameters(self, verb):
        return ["AUTH"] if verb == "MAIL" else []


class Dovecot:
    """Dovecot's submission service on a free port of 127.0.0.1, any user and password
    accepted, relaying every message to 127.0.0.1:*relay_port*."""

    def __init__(self, relay_port: int):
        # Not under pytest's tmp_path: its parent folders are closed to Dovecot's users.
        self.root = Path(tempfile.mkdtemp(prefix="ingress-dovecot-"))
        self.root.chmod(0o755)
        for name in ("run", "state", "home"):
            (self.root / name).mkdir()
        shutil.chown(self.root / "home", "dovecot", "dovecot")
        self.port = free_port()
        self.config = self.root / "dovecot.conf"
        self.config.write_text(f"""\
base_dir = {self.root}/run
state_dir = {self.root}/state
log_path = {self.root}/dovecot.log
protocols = submission
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain
first_valid_uid = 1
default_internal_user = dovecot
default_login_user = dovenull
hostname = submit.test
mail_location = maildir:{self.root}/home/Maildir
submission_relay_host = 127.0.0.1
submission_relay_port = {relay_port}
submission_relay_ssl = no
passdb {{
  driver = static
  args = nopassword=y
}}
userdb {{
  driver = static
  args = uid=dovecot gid=dovecot home={self.root}/home
}}
service submission-login {{
  inet_listener submission {{
    port = {self.port}
  }}
}}
""")
        self.process: subprocess.Popen | None = None

    def log(self) -> str:
        path = self.root / "dovecot.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def __enter__(self) -> Dovecot:
        self.process = subprocess.Popen(["dovecot", "-F", "-c", str(self.config)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:  # until it accepts connections
            try:
                smtplib.SMTP("127.0.0.1", self.port, timeout=5).quit()
                return self
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.__exit__()
                    raise RuntimeError("dovecot did not start:\n" + self.log()) from None
                time.sleep(0.1)

    def __exit__(self, *exc) -> None:
        try:
            if self.process is not None and self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(20)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def test_dovecot_relays_to_ingress_with_bdat_byte_for_byte(ingress_inprocess_server):
    observer = Observer()
    server = ingress_inprocess_server({"directory": USERS, "plugins": {"observer": {}}},
                                      plugins={"observer": observer})
    # about 650 KB: several of Dovecot's 128 KiB chunks; lines DATA would dot-stuff
    body = b"".join(b"line %05d\r\n.\r\n..two dots\r\n. dot space\r\n" % i for i in range(16000))
    message = b"Subject: relayed by dovecot\r\nX-Check: 1\r\n\r\n" + body
    with Dovecot(server.port) as dovecot:
        with smtplib.SMTP("127.0.0.1", dovecot.port, timeout=60) as client:
            client.ehlo("client.test")
            client.login("someone", "any password")
            client.sendmail("s@submit.test", ["alice@example.test"], message)
        # Dovecot writes its log line a moment after it answered the client
        try:
            eventually(lambda: "Successfully relayed message" in dovecot.log(),
                       what="dovecot's relay log line")
        except AssertionError:
            raise AssertionError(dovecot.log()) from None
    bdat = [arg for verb, arg in observer.seen if verb == "BDAT"]
    assert len(bdat) >= 2 and bdat[-1].endswith(" LAST"), observer.seen
    assert not [verb for verb, _ in observer.seen if verb == "DATA"], observer.seen
    [stored] = server.mailbox("alice@example.test")
    assert stored.endswith(message)  # after ingress's and Dovecot's Received fields
    prefix = stored[:len(stored) - len(message)]
    assert prefix.startswith(b"Return-Path: <s@submit.test>\r\nReceived: ")
    assert b"\r\n\r\n" not in prefix
    # what Dovecot sent (its own Received field, then the message) is all there, nothing more
    sent = sum(int(arg.split()[0]) for arg in bdat)
    assert sent == len(stored) - prefix.index(b"Received: from client.test")
