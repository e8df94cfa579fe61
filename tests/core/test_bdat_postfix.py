"""A real Postfix as the sending client: a private instance started by the test (its own config
folder, queue and data folders, no listener of its own), relaying to ingress, which offers
CHUNKING and BINARYMIME. Postfix's SMTP client has no BDAT (only its server has; its client
binary does not even contain the word), so it sends DATA: the message must still arrive byte for
byte, and the test would notice the day Postfix starts using BDAT."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from ingress import hookimpl

pytestmark = pytest.mark.skipif(
    shutil.which("postfix") is None or os.geteuid() != 0,
    reason="needs Debian's postfix and root (a private Postfix instance runs as the postfix user)")

USERS = {"domains": ["example.test"],
         "users": [{"address": "alice@example.test", "password": "alicepw"}]}
MASTER_CF = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class Verbs:
    """Records every command verb with its argument."""

    def __init__(self):
        self.seen: list[tuple[str, str]] = []

    @hookimpl
    def on_command(self, verb, arg):
        self.seen.append((verb, arg))


class Postfix:
    """A private Postfix in a temporary folder, relaying everything to 127.0.0.1:*port*."""

    def __init__(self, port: int, extra: str = ""):
        # Not under pytest's tmp_path: its parent folders are closed to the postfix user.
        self.root = Path(tempfile.mkdtemp(prefix="ingress-postfix-"))
        self.root.chmod(0o755)
        self.conf = self.root / "conf"
        self.conf.mkdir()
        (self.root / "queue").mkdir()
        (self.root / "data").mkdir()
        shutil.chown(self.root / "data", "postfix")
        name = f"sender-{os.getpid()}-{secrets.token_hex(4)}.test"  # a valid, unique name
        (self.conf / "main.cf").write_text(f"""\
compatibility_level = 3.6
queue_directory = {self.root}/queue
data_directory = {self.root}/data
mail_owner = postfix
setgid_group = postdrop
myhostname = {name}
mydomain = {name}
myorigin = $myhostname
mydestination =
inet_interfaces = loopback-only
inet_protocols = ipv4
relayhost = [127.0.0.1]:{port}
smtp_tls_security_level = none
smtp_dns_support_level = disabled
alias_maps =
alias_database =
local_transport = error:no local delivery
maillog_file_prefixes = {self.root}
maillog_file = {self.root}/maillog
{extra}
""")
        (self.conf / "master.cf").write_text(MASTER_CF)
        self.hostname = name

    def postfix(self, *args: str) -> None:
        done = subprocess.run(["postfix", "-c", str(self.conf), *args], timeout=60,
                              capture_output=True)
        assert done.returncode == 0, (args, done.stderr, self.log())

    def __enter__(self) -> Postfix:
        try:
            self.postfix("check")  # also creates the queue's folders
            self.postfix("start")
        except BaseException:
            shutil.rmtree(self.root, ignore_errors=True)
            raise
        return self

    def sendmail(self, sender: str, recipient: str, message: bytes) -> None:
        subprocess.run(["sendmail", "-C", str(self.conf), "-f", sender, "-i", recipient],
                       input=message, check=True, timeout=60, capture_output=True)

    def log(self) -> str:
        path = self.root / "maillog"
        return path.read_text(errors="replace") if path.exists() else ""

    def __exit__(self, *exc) -> None:
        try:
            self.postfix("stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def body() -> bytes:
    """Lines that DATA would dot-stuff, 8-bit octets, and enough of them (about 700 KB) for
    Postfix to write several pieces."""
    lines = [b"line %05d \xc3\xa9t\xc3\xa9 \xff\xfe" % i for i in range(20000)]
    lines[100:100] = [b".", b"..", b". starts with a dot", b""]
    return b"\n".join(lines) + b"\n"


def test_postfix_relays_to_ingress_byte_for_byte(ingress_inprocess_server):
    verbs = Verbs()
    server = ingress_inprocess_server({"directory": USERS, "plugins": {"verbs": {}}},
                                      plugins={"verbs": verbs})
    text = body()
    message = b"Subject: relayed by postfix\nX-Check: 1\n\n" + text
    with Postfix(server.port) as postfix:
        postfix.sendmail(f"s@{postfix.hostname}", "alice@example.test", message)
        deadline = time.monotonic() + 60
        while not server.mailbox("alice@example.test"):
            log = postfix.log()
            assert time.monotonic() < deadline and "status=bounced" not in log, log
            time.sleep(0.1)
        log = postfix.log()
    [stored] = server.mailbox("alice@example.test")
    assert verbs.seen[0][0] == "EHLO"
    assert [verb for verb, _ in verbs.seen if verb in ("BDAT", "DATA")] == ["DATA"], verbs.seen
    assert "status=sent (250 2.0.0 OK: queued as" in log, log
    head, _, stored_body = stored.partition(b"\r\n\r\n")
    assert stored_body == text.replace(b"\n", b"\r\n")  # Postfix sends lines with CRLF
    assert b"\r\nSubject: relayed by postfix\r\nX-Check: 1\r\n" in head + b"\r\n"
