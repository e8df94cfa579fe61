"""SIGHUP reload and SIGTERM drain against a live server, under bounded load."""

from __future__ import annotations

import json
import signal
import smtplib
import threading
import time

import pytest

from ingress.testing import eventually

CONFIG = {
    "directory": {"domains": ["example.test"],
                  "users": [{"address": "alice@example.test", "password": "pw"}]},
    "plugins": {"banner": {"text": "first #HostName#"}},
}
WITH_RECEIVED = "Received: from a by b; Mon, 1 Jan 2024 00:00:00 +0000\r\nSubject: s\r\n\r\nx\r\n"


def rewrite(server, config: dict) -> None:
    data = json.loads(server.config_path.read_text())
    data["plugins"] = config["plugins"]
    server.config_path.write_text(json.dumps(data))


def test_sighup_reload_new_sessions_use_the_new_config_open_ones_keep_theirs(ingress_server):
    server = ingress_server(CONFIG)
    old = server.smtp()
    assert old.ehlo()[0] == 250
    rewrite(server, {"plugins": {"banner": {"text": "second"},
                                 "received_header": {"append": "none"}}})
    server.signal(signal.SIGHUP)
    eventually(lambda: "reloaded" in server.log(), what="reload")
    with server.raw() as raw:
        assert raw.reply() == (220, "second")
    with server.smtp() as new:
        new.sendmail("s@example.org", ["alice@example.test"], WITH_RECEIVED)
    with old:
        old.sendmail("s@example.org", ["alice@example.test"], WITH_RECEIVED)
    new_msg, old_msg = server.mailbox("alice@example.test")
    assert new_msg.count(b"Received:") == 1, "new session: append = none"
    assert old_msg.count(b"Received:") == 2, "open session keeps append = all"


def test_invalid_reload_keeps_the_old_config(ingress_server):
    server = ingress_server(CONFIG)
    server.config_path.write_text('{"plugins": {"banner": {"txet": "oops"}}}')
    server.signal(signal.SIGHUP)
    eventually(lambda: "reload refused" in server.log(), what="refusal")
    assert "/plugins/banner/txet" in server.log()
    with server.raw() as raw:
        assert raw.reply() == (220, "first mx.test")


def test_sigterm_lets_an_open_session_finish(ingress_server):
    server = ingress_server({**CONFIG, "server": {"drain_seconds": 20}})
    client = server.smtp()
    client.ehlo()
    client.mail("s@example.org")
    server.signal(signal.SIGTERM)
    eventually(lambda: "shutting down" in server.log(), what="drain start")
    with pytest.raises(OSError):
        smtplib.SMTP(server.host, server.port, timeout=2)  # listeners closed at once
    client.rcpt("alice@example.test")
    assert client.data("Subject: late\r\n\r\nx\r\n")[0] == 250
    client.quit()
    server.process.wait(15)
    assert server.process.returncode == 0
    assert len(server.mailbox("alice@example.test")) == 1


def test_sigterm_cuts_sessions_after_drain_seconds(ingress_server):
    server = ingress_server({**CONFIG, "server": {"drain_seconds": 0.5}})
    with server.raw() as raw:
        raw.reply()
        raw.cmd("EHLO c")
        started = time.monotonic()
        server.signal(signal.SIGTERM)
        assert raw.reply() == (421, "4.3.2 mx.test Service shutting down")
        assert raw.closed_by_server()
        assert time.monotonic() - started < 10
    server.process.wait(15)
    assert server.process.returncode == 0


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGTERM])
def test_no_acknowledged_message_is_lost_under_load(ingress_server, sig):
    server = ingress_server({**CONFIG, "server": {"drain_seconds": 5}})
    acknowledged = []
    errors = []
    stop = threading.Event()

    def sender(n: int) -> None:
        for i in range(200):  # bounded
            if stop.is_set():
                return
            try:
                with smtplib.SMTP(server.host, server.port, timeout=10) as client:
                    client.sendmail("s@example.org", ["alice@example.test"],
                                    f"Subject: {n}-{i}\r\n\r\nbody\r\n")
                acknowledged.append(f"{n}-{i}")
            except (OSError, smtplib.SMTPException) as exc:
                errors.append(exc)
                if sig == signal.SIGTERM:
                    return

    threads = [threading.Thread(target=sender, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    eventually(lambda: len(acknowledged) >= 20, what="some load")
    server.signal(sig)
    if sig == signal.SIGHUP:
        eventually(lambda: "reloaded" in server.log(), what="reload")
        time.sleep(0.3)
        stop.set()
    for t in threads:
        t.join(60)
    stored = server.mailbox("alice@example.test")
    subjects = sorted(m.split(b"Subject: ")[1].split(b"\r\n")[0].decode() for m in stored)
    assert subjects == sorted(acknowledged), "every 250 is stored, nothing else"
    if sig == signal.SIGHUP:
        assert errors == []
    else:
        server.process.wait(15)
        assert server.process.returncode == 0
