"""rspamd against a real ingress server (the installed entry point), real SMTP clients and a
real rspamd started for the session (conftest.py): never the internet."""

from __future__ import annotations

import base64
import email
import email.header
import os
import re
import smtplib
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest

# The tests against the real rspamd (the `running` fixture: about 10 s to start it, and again
# after each test that stops it) run in one tox environment only, like the amqp plugin's broker
# restarts; the tests against fake rspamd answers run everywhere.
real_rspamd = pytest.mark.skipif(
    os.environ.get("INGRESS_RSPAMD_REAL") != "1",
    reason="a real rspamd: INGRESS_RSPAMD_REAL=1 (tox env contrib-py311 sets it)")
GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
LOCAL = {"directory": {"domains": ["example.test"],
                       "domain_settings": {"example.test": {"catch_all": True}}}}
SENDER = "alice@example.org"
RCPT = "bob@example.test"


def rspamd_config(url: str | None = None, **settings) -> dict:
    if url is not None:
        settings["url"] = url
    return {**LOCAL, "plugins": {"rspamd": settings}}


def message(body: bytes = b"Hello Bob, lunch on Friday?\r\n", subject: str = "lunch",
            extra: bytes = b"") -> tuple[str, bytes]:
    """(Message-ID, message): the id finds rspamd's log line for it."""
    mid = f"{uuid.uuid4().hex}@example.org"
    head = (f"From: Alice <{SENDER}>\r\nTo: Bob <{RCPT}>\r\nSubject: {subject}\r\n"
            f"Message-ID: <{mid}>\r\nDate: Sun, 06 Dec 2026 15:00:00 +0000\r\n"
            "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n").encode()
    return mid, head + extra + b"\r\n" + body


def send(server, msg: bytes, rcpts=(RCPT,)) -> tuple[int, bytes]:
    """The reply to the end of DATA."""
    with server.smtp() as client:
        client.ehlo("client.example.org")
        try:
            client.sendmail(SENDER, list(rcpts), msg)
        except smtplib.SMTPDataError as exc:
            return exc.smtp_code, exc.smtp_error
        assert client.noop()[0] == 250  # the session goes on either way
    return 250, b""


def stored(server, address: str = RCPT) -> email.message.Message:
    [raw] = server.mailbox(address)
    return email.message_from_bytes(raw)


def wait_for_log(rspamd, text: str) -> str:
    """rspamd writes its log line after answering: wait for it (bounded)."""
    for _ in range(100):
        log = (rspamd.root / "rspamd.log").read_text(errors="replace")
        if text in log:
            return log
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not in rspamd's log")


# --- rspamd's answers -----------------------------------------------------------------------


@real_rspamd
@pytest.mark.parametrize("enabled", [True, False])
def test_gtube_is_rejected_by_the_plugin(ingress_server, running, enabled):
    server = ingress_server(rspamd_config(running.url) if enabled else LOCAL)
    _, msg = message(GTUBE + b"\r\n")
    if enabled:
        assert send(server, msg) == (550, b"5.7.1 Message rejected as spam")
        assert server.mailbox(RCPT) == []
    else:  # the plugin is what refuses it
        assert send(server, msg)[0] == 250
        assert "X-Spam-Action" not in stored(server)


@real_rspamd
def test_clean_message_is_accepted_with_spam_headers(ingress_server, running):
    server = ingress_server(rspamd_config(running.url))
    _, msg = message()
    assert send(server, msg)[0] == 250
    got = stored(server)
    assert got["X-Spam-Action"] == "no action"
    assert got["X-Spam"] == "no"
    assert float(got["X-Spam-Score"]) < 4
    assert got["Subject"] == "lunch"


@real_rspamd
def test_envelope_is_sent_as_rspamd_request_headers(ingress_server, running):
    server = ingress_server(rspamd_config(running.url))
    mid, msg = message()
    assert send(server, msg, rcpts=[RCPT, "carol@example.test"])[0] == 250
    logged = f"rspamd_task_write_log: id: <{mid}>"
    [line] = [line for line in wait_for_log(running, logged).splitlines() if logged in line]
    assert "ip: 127.0.0.1," in line
    assert f"from: <{SENDER}>" in line
    assert f"rcpts: <{RCPT},carol@example.test>" in line
    queue_id = re.search(r"qid: <([^>]+)>", line).group(1)
    assert queue_id in server.log()


@real_rspamd
def test_authenticated_user_is_sent(ingress_server, running):
    server = ingress_server({
        "directory": {**LOCAL["directory"],
                      "users": [{"address": "carol@example.test", "password": "carolpw"}]},
        "plugins": {"rspamd": {"url": running.url},
                    "auth": {"disable_plain_without_tls": False}}})
    mid, msg = message()
    with server.smtp() as client:
        client.ehlo("client.example.org")
        assert client.login("carol@example.test", "carolpw")[0] == 235
        client.sendmail("carol@example.test", [RCPT], msg)
    logged = f"rspamd_task_write_log: id: <{mid}>"
    [line] = [line for line in wait_for_log(running, logged).splitlines() if logged in line]
    assert "user: carol@example.test," in line


@real_rspamd
def test_a_big_message_is_streamed_from_the_spool(ingress_server, running):
    """Past the spool's memory limit the message is a file; rspamd still gets all of it (the
    GTUBE part at its end, after a 3 MB attachment)."""
    server = ingress_server(rspamd_config(running.url))
    blob = base64.encodebytes(bytes(range(256)) * 9000).replace(b"\n", b"\r\n")
    body = (b"--b\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Transfer-Encoding: base64\r\n\r\n" + blob
            + b"--b\r\nContent-Type: text/plain\r\n\r\n" + GTUBE + b"\r\n--b--\r\n")
    _, msg = message(body)
    msg = msg.replace(b"Content-Type: text/plain; charset=us-ascii",
                      b'Content-Type: multipart/mixed; boundary="b"', 1)
    assert len(msg) > 3_000_000
    assert send(server, msg) == (550, b"5.7.1 Message rejected as spam")


@real_rspamd
@pytest.mark.parametrize("action", ["soft reject", "greylist"])
def test_soft_reject_and_greylist_answer_451(ingress_server, running, action):
    server = ingress_server(rspamd_config(running.url))
    _, msg = message(extra=f"X-Test-Action: {action}\r\n".encode())
    assert send(server, msg) == (451, b"4.7.1 Try again later")
    assert server.mailbox(RCPT) == []


@real_rspamd
def test_add_header_marks_the_message_as_spam(ingress_server, running):
    server = ingress_server(rspamd_config(running.url))
    _, msg = message(extra=b"X-Test-Action: add header\r\nX-Spam: no\r\nX-Spam-Score: -100\r\n")
    assert send(server, msg)[0] == 250
    got = stored(server)
    assert got.get_all("X-Spam") == ["yes"]  # the sender's own is gone
    assert got.get_all("X-Spam-Score") == ["0.00"]
    assert got["X-Spam-Action"] == "add header"


@real_rspamd
def test_rewrite_subject_uses_rspamd_subject(ingress_server, running):
    server = ingress_server(rspamd_config(running.url))
    _, msg = message(subject="cheap watches", extra=b"X-Test-Action: rewrite subject\r\n")
    assert send(server, msg)[0] == 250
    got = stored(server)
    assert got.get_all("Subject") == ["*** SPAM *** cheap watches"]
    assert got["X-Spam"] == "yes"
    assert got["X-Spam-Action"] == "rewrite subject"


@real_rspamd
def test_a_rewritten_subject_that_is_not_ascii_is_encoded(ingress_server, running):
    """rspamd answers the decoded Subject; the plugin writes it back as RFC 2047."""
    server = ingress_server(rspamd_config(running.url))
    _, msg = message(subject="=?utf-8?q?caf=C3=A9_cr=C3=A8me?=",
                     extra=b"X-Test-Action: rewrite subject\r\n")
    assert send(server, msg)[0] == 250
    [raw] = server.mailbox(RCPT)
    [subject] = [line for line in raw.split(b"\r\n") if line.startswith(b"Subject:")]
    assert subject.isascii()
    assert str(email.header.make_header(email.header.decode_header(
        stored(server)["Subject"]))) == "*** SPAM *** caf\u00e9 cr\u00e8me"


@real_rspamd
def test_headers_false_adds_only_what_the_action_says(ingress_server, running):
    server = ingress_server(rspamd_config(running.url, headers=False))
    _, clean = message()
    _, marked = message(extra=b"X-Test-Action: add header\r\n")
    _, rewritten = message(subject="hi", extra=b"X-Test-Action: rewrite subject\r\n")
    for msg in (clean, marked, rewritten):
        assert send(server, msg)[0] == 250
    first, second, third = (email.message_from_bytes(m) for m in server.mailbox(RCPT))
    spam_headers = ("X-Spam", "X-Spam-Score", "X-Spam-Action")
    assert [first[h] for h in spam_headers] == [None] * 3
    assert [second[h] for h in spam_headers] == ["yes", None, None]
    assert [third[h] for h in spam_headers] == [None] * 3
    assert third["Subject"] == "*** SPAM *** hi"


# --- rspamd down, slow or confused ----------------------------------------------------------


@real_rspamd
@pytest.mark.parametrize("on_error", ["accept", "tempfail"])
def test_rspamd_stopped(ingress_server, running, on_error):
    server = ingress_server(rspamd_config(running.url, on_error=on_error))
    running.stop()
    _, msg = message(GTUBE + b"\r\n")
    if on_error == "tempfail":
        assert send(server, msg) == (451, b"4.7.1 Try again later")
        assert f"{running.url} failed (Connection refused); answering 451" in server.log()
    else:
        assert send(server, msg)[0] == 250
        assert stored(server)["X-Spam-Action"] == "unchecked"
        assert (f"{running.url} failed (Connection refused); accepting the message unchecked"
                in server.log())


@pytest.fixture
def silent_port():
    """A TCP port whose connections the kernel completes and nobody ever answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield sock.getsockname()[1]


@pytest.mark.parametrize("size", ["small", "big"])
@pytest.mark.parametrize("on_error", ["accept", "tempfail"])
def test_a_silent_rspamd_is_cut_at_timeout(ingress_server, silent_port, on_error, size):
    """Also when it does not even read the upload (a big message fills the socket buffers)."""
    server = ingress_server(rspamd_config(f"http://127.0.0.1:{silent_port}", timeout=1,
                                          on_error=on_error))
    _, msg = message(b"x" * 998 + b"\r\n") if size == "small" else message(
        (b"y" * 998 + b"\r\n") * 8000)
    if on_error == "tempfail":
        assert send(server, msg) == (451, b"4.7.1 Try again later")
    else:
        assert send(server, msg)[0] == 250
        assert stored(server)["X-Spam-Action"] == "unchecked"
    assert "failed (no answer within 1s)" in server.log()


class OneAnswer:
    """An HTTP server on 127.0.0.1 that answers every request with the same bytes."""

    def __init__(self, answer: bytes):
        self.answer = answer
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.1)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.requests: list[bytes] = []
        self.running = True
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        while self.running:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(5)
                data = b""
                try:
                    while not data.endswith(b"\r\n0\r\n\r\n") and len(data) < 1 << 22:
                        chunk = conn.recv(65536)
                        if not chunk:
                            break
                        data += chunk
                    self.requests.append(data)
                    conn.sendall(self.answer)
                except OSError:
                    pass

    def close(self):
        self.running = False
        self.thread.join(5)
        self.sock.close()


@pytest.mark.parametrize("answer, why", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nnot json!", "answer is not JSON"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n[]", "answer is not a JSON object"),
    (b'HTTP/1.1 200 OK\r\nContent-Length: 17\r\n\r\n{"action": "eat"}', "unknown action 'eat'"),
    (b"HTTP/1.1 500 Oops\r\nContent-Length: 0\r\n\r\n", "HTTP status 500"),
    (b"SSH-2.0-OpenSSH\r\n", "not an HTTP answer"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{", "answer cut short"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 99999999\r\n\r\n{", "answer too long"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n200000\r\n" + b"[" * 1000,
     "answer too long"),
])
def test_an_unreadable_answer_is_an_error(ingress_server, answer, why):
    fake = OneAnswer(answer)
    try:
        server = ingress_server(rspamd_config(fake.url))
        _, msg = message()
        assert send(server, msg)[0] == 250
        assert stored(server)["X-Spam-Action"] == "unchecked"
        assert f"failed ({why}); accepting the message unchecked" in server.log()
    finally:
        fake.close()


def test_request_carries_the_envelope_and_the_server_added_headers(ingress_server):
    """What rspamd is sent, as the bytes on the wire (the real rspamd above shows it reads
    them): rspamd's request headers, then the message with our Received: line, chunked."""
    fake = OneAnswer(b'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n'
                     b'1b\r\n{"action": "no action", "sc\r\nf\r\nore": 1.5}      \r\n0\r\n\r\n')
    try:
        server = ingress_server(rspamd_config(fake.url + "/rspamd/"))
        _, msg = message()
        assert send(server, msg, rcpts=[RCPT, "carol@example.test"])[0] == 250
        [request] = fake.requests
    finally:
        fake.close()
    head, _, body = request.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "POST /rspamd/checkv2 HTTP/1.1"
    fields = [tuple(line.split(": ", 1)) for line in lines[1:]]
    assert ("IP", "127.0.0.1") in fields and ("Helo", "client.example.org") in fields
    assert ("From", SENDER) in fields
    assert [v for n, v in fields if n == "Rcpt"] == [RCPT, "carol@example.test"]
    assert ("Transfer-Encoding", "chunked") in fields
    assert not any(n == "User" for n, _ in fields)
    [queue_id] = [v for n, v in fields if n == "Queue-Id"]
    assert queue_id in server.log()
    assert b"Received: from client.example.org" in body
    assert stored(server)["X-Spam-Score"] == "1.50"


# --- as an installed plugin -------------------------------------------------------------------


def ingress(*args):
    return subprocess.run([sys.executable, "-m", "ingress", *args], capture_output=True,
                          text=True, timeout=60)


def test_installed_plugin_is_listed_and_its_config_checked(tmp_path):
    listed = ingress("plugins").stdout.splitlines()
    assert any(line.startswith("rspamd\tentry point ingress-rspamd") for line in listed)
    good = tmp_path / "good.toml"
    good.write_text('[plugins.rspamd]\nurl = "http://[::1]:11333/"\ntimeout = 2.5\n'
                    'on_error = "tempfail"\nheaders = false\n')
    assert ingress("check-config", str(good)).returncode == 0, ingress("check-config", str(good))
    bad = tmp_path / "bad.toml"
    bad.write_text('[plugins.rspamd]\ntimout = 5\non_error = "reject"\ntimeout = 0\n'
                   'url = "https://rspamd.example"\n')
    result = ingress("check-config", str(bad))
    assert result.returncode == 2
    errors = result.stderr.splitlines()
    assert f"{bad}: /plugins/rspamd/timout: unknown key 'timout'" in errors
    for key in ("on_error", "timeout", "url"):
        assert any(line.startswith(f"{bad}: /plugins/rspamd/{key}: ") for line in errors), key


def test_an_ipv6_client_is_sent_as_such(ingress_server):
    fake = OneAnswer(b'HTTP/1.1 200 OK\r\nContent-Length: 24\r\n\r\n{"action": "no action"}\n')
    try:
        server = ingress_server({**rspamd_config(fake.url), "server": {"listen": ["[::1]:0"]}})
        _, msg = message()
        assert send(server, msg)[0] == 250
        [request] = fake.requests
    finally:
        fake.close()
    assert b"\r\nIP: ::1\r\n" in request
    assert stored(server)["X-Spam-Action"] == "no action"
