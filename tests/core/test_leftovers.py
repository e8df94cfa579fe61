"""Crash leftovers (contract section 4): at start the spool's and the queue's temporary files
are removed, and Maildir tmp/ files older than 36 hours are removed at start and then hourly."""

from __future__ import annotations

import logging
import os
import signal
import smtplib
import threading
import time
from pathlib import Path

from ingress import leftovers
from ingress.testing import eventually

HOUR = 3600
DIRECTORY = {"directory": {"domains": ["example.test"], "domain_settings": {
    "example.test": {"catch_all": True}}}}


def make(path: Path, age_hours: float = 0, data: bytes = b"partial") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if age_hours:
        then = time.time() - age_hours * HOUR
        os.utime(path, (then, then))
    return path


def crash_scene(root: Path) -> dict[str, list[Path]]:
    """What a kill -9 leaves behind, and what must survive it."""
    mail, queue = root / "mail" / "example.test", root / "queue"
    gone = [
        make(queue / "spool" / "data-x1y2z3"),
        make(queue / "tmp" / "ABC.eml"),
        make(queue / "tmp" / "ABC.json"),
        make(queue / "DEF.eml"),  # renamed, but its .json never was
        make(mail / "alice" / "tmp" / "1.M1P1Q1.mx.test", age_hours=37),
        make(mail / "bob" / "tmp" / "2.M2P2Q2.mx.test", age_hours=100),
    ]
    kept = [
        make(queue / "GHI.eml"), make(queue / "GHI.json", data=b"{}"),
        make(mail / "alice" / "tmp" / "3.M3P3Q3.mx.test", age_hours=35),  # maybe in flight
        make(mail / "alice" / "new" / "4.M4P4Q4.mx.test", age_hours=1000),
        make(mail / "alice" / "cur" / "5.M5P5Q5.mx.test:2,S", age_hours=1000),
    ]
    return {"gone": gone, "kept": kept}


def config(root: Path, **server) -> dict:
    return {**DIRECTORY, "server": server,
            "delivery": {"maildir": str(root / "mail"), "queue": str(root / "queue")}}


def test_a_start_removes_what_a_crash_left_behind(ingress_server, tmp_path):
    scene = crash_scene(tmp_path)
    server = ingress_server(config(tmp_path))
    eventually(lambda: "Maildir tmp/" in server.log(), what="the Maildir sweep")
    assert [p for p in scene["gone"] if p.exists()] == []
    assert [p for p in scene["kept"] if not p.exists()] == []
    log = server.log()
    assert "removed crash leftovers: 1 spool file(s), 2 queue temporary file(s), " \
           "1 incomplete queue entr(ies)" in log
    assert "removed 2 Maildir tmp/ file(s) older than 36 hours" in log
    with server.smtp() as client:  # and the server works as usual
        client.sendmail("s@example.org", ["alice@example.test"], "Subject: x\r\n\r\ny\r\n")
    assert len(server.mailbox("alice@example.test")) == 2


def test_with_several_workers_the_leftovers_are_removed_once(ingress_server, tmp_path):
    scene = crash_scene(tmp_path)
    server = ingress_server(config(tmp_path, workers=2))
    eventually(lambda: "Maildir tmp/" in server.log(), what="the Maildir sweep")
    assert [p for p in scene["gone"] if p.exists()] == []
    assert [p for p in scene["kept"] if not p.exists()] == []
    time.sleep(1)  # a second sweeper, if there were one, would have logged by now
    log = server.log()
    assert log.count("removed crash leftovers") == 1
    assert log.count("Maildir tmp/") == 1


def test_the_maildir_is_swept_again_while_running(ingress_inprocess_server, tmp_path,
                                                   monkeypatch, caplog):
    monkeypatch.setattr(leftovers, "MAILDIR_SWEEP_SECONDS", 0.2)
    caplog.set_level(logging.INFO, logger="ingress.server")
    server = ingress_inprocess_server(config(tmp_path))
    with smtplib.SMTP(server.host, server.port, timeout=30) as client:
        client.sendmail("s@example.org", ["alice@example.test"], "Subject: x\r\n\r\ny\r\n")
    tmp = server.maildir / "example.test" / "alice" / "tmp"
    old = make(tmp / "old", age_hours=36.1)
    fresh = make(tmp / "fresh", age_hours=30)
    eventually(lambda: not old.exists(), what="the next sweep")
    assert fresh.exists()
    assert len(server.mailbox("alice@example.test")) == 1
    assert "removed 1 Maildir tmp/ file(s) older than 36 hours" in caplog.text


def test_kill_9_under_load_then_restart(ingress_server, tmp_path):
    """Clients send big messages (spooled to disk) to local and relayed recipients; the server
    is killed with SIGKILL mid-stream. After a restart no partial file is left in the spool or
    the queue's temporary folder, every acknowledged message is complete, and the Maildir tmp/
    files the kill left are removed once they are 36 hours old."""
    cfg = {**config(tmp_path), "plugins": {"relay": {"whitelist": ["127.0.0.1"]}}}
    first = ingress_server(cfg, name="first")
    body = "Subject: big\r\n\r\n" + ("x" * 998 + "\r\n") * 1500  # 1.5 MB: spooled
    acknowledged: list[str] = []
    stop = threading.Event()

    def client(n: int) -> None:
        for i in range(20):  # bounded
            if stop.is_set():
                return
            try:
                with smtplib.SMTP(first.host, first.port, timeout=10) as smtp:
                    smtp.sendmail("s@example.org", [f"u{n}@example.test", f"r{n}@far.test"],
                                  body.replace("Subject: big", f"Subject: {n}-{i}"))
                acknowledged.append(f"{n}-{i}")
            except (OSError, smtplib.SMTPException):
                return

    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    stalled = first.raw()  # a message half sent: surely on the spool when the kill comes
    stalled.reply()
    stalled.cmd("EHLO client.example.org")
    stalled.cmd("MAIL FROM:<s@example.org>")
    stalled.cmd("RCPT TO:<stalled@example.test>")
    assert stalled.cmd("DATA")[0] == 354
    stalled.send(body)
    spool = tmp_path / "queue" / "spool"
    eventually(lambda: any(spool.iterdir()), what="a spool file")
    eventually(lambda: len(acknowledged) >= 4, what="some deliveries")
    os.kill(first.pid, signal.SIGKILL)
    stalled.close()
    stop.set()
    for t in threads:
        t.join(30)
    first.process.wait(10)

    queue, mail = tmp_path / "queue", tmp_path / "mail"
    left_in_tmp = list(mail.glob("*/*/tmp/*"))
    for path in left_in_tmp:  # make them old enough for the sweep
        os.utime(path, (time.time() - 37 * HOUR,) * 2)
    second = ingress_server(cfg, name="second")
    eventually(lambda: not any(p.exists() for p in left_in_tmp), what="the Maildir sweep")
    assert [p for p in (queue / "spool").rglob("*") if p.is_file()] == []
    assert not (queue / "tmp").exists() or list((queue / "tmp").iterdir()) == []
    entries = {eml.stem for eml in queue.glob("*.eml")}
    assert entries == {meta.stem for meta in queue.glob("*.json")}, "no incomplete entry"
    stored = {}
    for path in [*mail.glob("*/*/new/*"), *queue.glob("*.eml")]:
        data = path.read_bytes()
        assert data.count(b"x" * 998 + b"\r\n") == 1500, f"{path} is incomplete"
        stored[data.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0].decode()] = path
    assert [m for m in acknowledged if m not in stored] == [], "acknowledged messages lost"
    assert list(mail.glob("*/*/tmp/*")) == []
    with second.smtp() as smtp:
        smtp.sendmail("s@example.org", ["u0@example.test"], "Subject: after\r\n\r\nok\r\n")
