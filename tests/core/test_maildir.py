"""Group commit of directory fsyncs: shared between concurrent deliveries, never skipped."""

from __future__ import annotations

import os
import smtplib
import threading
import time

import pytest

from ingress.delivery import maildir

THREADS = 16


def run_threads(target, count=THREADS):
    threads = [threading.Thread(target=target, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)


def test_concurrent_callers_share_fsyncs_and_each_waits_for_one_started_after_its_change(
        tmp_path, monkeypatch):
    lock = threading.Lock()
    clock = iter(range(1, 1_000_000))
    changed: dict[int, int] = {}  # caller -> tick of its change
    returned: dict[int, int] = {}  # caller -> tick when sync_dir returned
    fsyncs: list[tuple[int, int]] = []  # (start tick, end tick)
    entered = threading.Semaphore(0)

    def tick():
        with lock:
            return next(clock)

    def slow_fsync(path):
        start = tick()
        if not fsyncs:  # hold the first fsync until every caller has queued up behind it
            for _ in range(THREADS - 1):
                entered.acquire(timeout=10)
            time.sleep(0.05)
        fsyncs.append((start, tick()))

    monkeypatch.setattr(maildir, "fsync_dir", slow_fsync)

    def caller(i):
        if i:
            time.sleep(0.01)  # caller 0 starts the first fsync; the others change meanwhile
        changed[i] = tick()
        if i:
            entered.release()
        maildir.sync_dir(tmp_path)
        returned[i] = tick()

    run_threads(caller)
    for i in range(THREADS):
        assert any(changed[i] < start and end < returned[i] for start, end in fsyncs), (
            f"caller {i} returned without an fsync that started after its change")
    assert len(fsyncs) <= THREADS // 2, f"{len(fsyncs)} fsyncs for {THREADS} callers"
    assert maildir._syncs == {}, "no state kept for idle directories"


def test_a_failed_fsync_fails_every_caller_it_covered(tmp_path, monkeypatch):
    failed = threading.Event()

    def failing_fsync(path):
        time.sleep(0.05)
        failed.set()
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(maildir, "fsync_dir", failing_fsync)
    errors = []

    def caller(i):
        try:
            maildir.sync_dir(tmp_path)
        except OSError as exc:
            errors.append(exc)

    run_threads(caller, 8)
    assert failed.is_set()
    assert len(errors) == 8
    assert all(exc.errno == 5 for exc in errors)


CONFIG = {"directory": {"domains": ["example.test"], "users": [
    {"address": f"u{i}@example.test", "password": "pw"} for i in range(2)]}}


def test_every_250_comes_after_an_fsync_that_covered_the_message(ingress_inprocess_server,
                                                                 monkeypatch):
    """Concurrent sessions deliver into the same two mailboxes. Each directory fsync, and each
    flush of the file system, records which entries existed when it started; a message's 250
    may only be seen once one of them included it. Nothing is lost or stored twice."""
    covered: set[str] = set()
    real_fsync, real_syncfs = maildir.fsync_dir, maildir.syncfs

    def recording_fsync(path):
        present = set(os.listdir(path)) if os.path.basename(path) == "new" else set()
        real_fsync(path)
        covered.update(present)

    def recording_syncfs(fd):
        present = {p.name for p in server.maildir.glob("*/*/new/*")}
        real_syncfs(fd)
        covered.update(present)

    server = ingress_inprocess_server(CONFIG)
    monkeypatch.setattr(maildir, "fsync_dir", recording_fsync)
    monkeypatch.setattr(maildir, "syncfs", recording_syncfs)
    problems = []

    def sender(i):
        with smtplib.SMTP(server.host, server.port, timeout=30) as client:
            for j in range(5):
                subject = f"m-{i}-{j}"
                rcpt = f"u{(i + j) % 2}@example.test"
                client.sendmail("s@example.org", [rcpt], f"Subject: {subject}\r\n\r\nx\r\n")
                new = server.maildir / "example.test" / rcpt.split("@")[0] / "new"
                names = [p.name for p in new.iterdir()
                         if f"Subject: {subject}\r\n".encode() in p.read_bytes()]
                if len(names) != 1 or names[0] not in covered:
                    problems.append((subject, names))

    run_threads(sender)
    assert problems == []
    stored = server.all_messages()
    assert len(stored) == THREADS * 5
    assert len({p.read_bytes() for p in stored}) == THREADS * 5, "no duplicates"
    assert not [p for p in server.maildir.glob("*/*/tmp/*")], "nothing left in tmp/"


@pytest.mark.parametrize("boxes", [1, 3])
def test_concurrent_deliveries_are_all_durable(tmp_path, boxes):
    class Message:
        def __init__(self, n):
            self.data = f"Subject: {n}\r\n\r\nbody\r\n".encode()

        def getvalue(self):
            return self.data

    paths: list[str] = []

    def deliver(i):
        for j in range(10):
            paths.extend(maildir.deliver(tmp_path, [("example.test", f"u{(i + j) % boxes}")],
                                         b"Return-Path: <s@example.org>\r\n",
                                         Message(f"{i}-{j}"), "mx.test"))

    run_threads(deliver)
    assert len(paths) == len(set(paths)) == THREADS * 10
    assert sorted(paths) == sorted(str(p) for p in tmp_path.glob("*/*/new/*"))


@pytest.mark.parametrize("size", [0, 3000, 3 << 20])  # empty, in memory, spilled to disk
def test_one_file_with_the_header_first_linked_into_every_mailbox(tmp_path, size):
    from ingress.spool import Message

    message = Message(tmp_path / "spool", None)
    body = bytes(range(256)) * (size // 256) + b"end\r\n"
    for i in range(0, len(body), 65536):
        message.write(body[i:i + 65536])
    try:
        paths = maildir.deliver(tmp_path / "mail", [("example.test", "a"), ("example.test", "b")],
                                b"Return-Path: <s@example.org>\r\n", message, "mx.test")
    finally:
        message.close()
    assert [p.split("/")[-3] for p in paths] == ["a", "b"]
    assert {os.stat(p).st_ino for p in paths} == {os.stat(paths[0]).st_ino}, "hard links"
    with open(paths[0], "rb") as f:
        assert f.read() == b"Return-Path: <s@example.org>\r\n" + body
    assert not list((tmp_path / "mail").glob("*/*/tmp/*"))


def test_a_mailbox_removed_while_the_server_runs_is_made_again(ingress_inprocess_server):
    import shutil

    server = ingress_inprocess_server(CONFIG)
    box = server.maildir / "example.test" / "u0"
    with smtplib.SMTP(server.host, server.port, timeout=30) as client:
        client.sendmail("s@example.org", ["u0@example.test"], "Subject: one\r\n\r\nx\r\n")
        shutil.rmtree(box)
        client.sendmail("s@example.org", ["u0@example.test"], "Subject: two\r\n\r\nx\r\n")
    stored = list((box / "new").iterdir())
    assert len(stored) == 1 and b"Subject: two\r\n" in stored[0].read_bytes()
    assert sorted(p.name for p in box.iterdir()) == ["cur", "new", "tmp"]
