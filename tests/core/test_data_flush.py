"""Group commit of file data: a batch's files are made durable by one flush of their file
system (``syncfs``) before any of them is renamed into ``new/``; a failed flush fails every
message whose data it may have carried; ``delivery.sync = "file"`` fsyncs each file instead."""

from __future__ import annotations

import os
import smtplib
import stat
import threading

import pytest
from staging import Body, needs_syncfs, stager

from ingress.delivery import maildir


def names(root, folder: str) -> list[str]:
    return sorted(p.name for p in root.glob(f"example.test/*/{folder}/*"))


def record_flushes(monkeypatch, root) -> list[tuple[list[str], list[str]]]:
    """Every file system flush: (files in new/, files in tmp/) when it started."""
    real = maildir.syncfs
    flushes: list[tuple[list[str], list[str]]] = []

    def recording(fd):
        flushes.append((names(root, "new"), names(root, "tmp")))
        real(fd)

    monkeypatch.setattr(maildir, "syncfs", recording)
    return flushes


@needs_syncfs
def test_a_batch_flushes_its_data_once_and_publishes_nothing_before(tmp_path, monkeypatch):
    flushes = record_flushes(monkeypatch, tmp_path)
    outcomes = maildir.commit_group([stager(tmp_path, f"u{i % 2}", f"m{i}") for i in range(6)])
    assert len(flushes) == 1, "one flush for the six files"
    new, tmp = flushes[0]
    assert new == [] and len(tmp) == 6, "every file still in tmp/ while its data is flushed"
    finals = sorted(p for finals in outcomes for p in finals)
    assert finals == sorted(str(p) for p in tmp_path.glob("example.test/*/new/*"))
    assert names(tmp_path, "tmp") == []


@needs_syncfs
def test_a_failed_flush_fails_the_batch_and_leaves_nothing(tmp_path, monkeypatch):
    def failing(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(maildir, "syncfs", failing)
    outcomes = maildir.commit_group([stager(tmp_path, "a", f"m{i}") for i in range(3)])
    assert all(isinstance(o, OSError) and o.errno == 5 for o in outcomes)
    assert names(tmp_path, "new") == [] and names(tmp_path, "tmp") == []
    monkeypatch.undo()
    [finals] = maildir.commit_group([stager(tmp_path, "a", "later")])
    assert names(tmp_path, "new") == [finals[0].rsplit("/", 1)[1]], "written after it: stored"


def test_a_failure_counts_against_every_caller_who_wrote_before_it_was_seen():
    class Flaky(maildir.GroupSync):
        def __init__(self):
            super().__init__("flush of a test")
            self.failing: list[bool] = []

        def flush(self):
            if self.failing.pop(0):
                raise OSError(5, "Input/output error")

    syncer = Flaky()
    mark = syncer.mark()  # a caller writes its data after this
    syncer.failing = [True, False]
    with pytest.raises(OSError, match="flush of a test failed"):
        syncer.sync()  # someone else's flush fails: it may have carried the caller's data
    with pytest.raises(OSError):
        syncer.sync(mark)  # so the caller fails, though its own flush went well
    later = syncer.mark()
    syncer.failing = [False]
    syncer.sync(later)  # data written after the failure was seen is fine


def record_file_fsyncs(monkeypatch) -> list[int]:
    """The inode of every regular file fsynced."""
    real = os.fsync
    inodes: list[int] = []

    def recording(fd):
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode):
            inodes.append(st.st_ino)
        real(fd)

    monkeypatch.setattr(os, "fsync", recording)
    return inodes


def test_file_mode_fsyncs_each_file_and_never_flushes_the_file_system(tmp_path, monkeypatch):
    flushes = record_flushes(monkeypatch, tmp_path)
    fsynced = record_file_fsyncs(monkeypatch)
    outcomes = maildir.commit_group([stager(tmp_path, "a", f"m{i}", batch=False)
                                     for i in range(3)])
    assert flushes == []
    finals = sorted(p for finals in outcomes for p in finals)
    assert finals == sorted(str(p) for p in tmp_path.glob("example.test/a/new/*"))
    assert sorted(fsynced) == sorted(os.stat(p).st_ino for p in finals)


@needs_syncfs
def test_a_file_system_not_trusted_with_syncfs_gets_an_fsync_per_file(tmp_path, monkeypatch):
    monkeypatch.setattr(maildir, "_file_systems", {})  # made again with the type below
    monkeypatch.setattr(maildir, "file_system_type", lambda device: "nfs4")
    flushes = record_flushes(monkeypatch, tmp_path)
    fsynced = record_file_fsyncs(monkeypatch)
    outcomes = maildir.commit_group([stager(tmp_path, "a", f"m{i}") for i in range(3)])
    assert flushes == []
    assert sorted(fsynced) == sorted(os.stat(p).st_ino for finals in outcomes for p in finals)


@needs_syncfs
def test_a_flush_that_failed_after_the_batch_began_fails_it(tmp_path, monkeypatch):
    # Someone else's flush fails between this batch's first write and its own flush: it may
    # have written back (and lost) this batch's data, so the batch fails, though its own
    # flush goes well.
    real = maildir.syncfs
    failing = threading.Event()

    def sometimes(fd):
        if failing.is_set():
            failing.clear()
            raise OSError(5, "Input/output error")
        real(fd)

    monkeypatch.setattr(maildir, "syncfs", sometimes)

    def other_writer_flushes(commit):
        [syncer] = commit.marks
        failing.set()
        with pytest.raises(OSError):
            syncer.sync()
        return stager(tmp_path, "b", "second")(commit)

    outcomes = maildir.commit_group([stager(tmp_path, "a", "first"), other_writer_flushes])
    assert all(isinstance(o, OSError) and o.errno == 5 for o in outcomes)
    assert names(tmp_path, "new") == [] and names(tmp_path, "tmp") == []


def test_a_publish_step_failing_halfway_leaves_nothing(tmp_path):
    def two_boxes_one_gone(commit):
        boxes = [("example.test", "a"), ("example.test", "b")]
        finals, folders = maildir.stage(commit, tmp_path, boxes, b"", Body("m"), "mx")
        os.rmdir(tmp_path / "example.test" / "a" / "new")  # removed by hand meanwhile
        return finals, finals, folders

    [outcome] = maildir.commit_group([two_boxes_one_gone])
    assert isinstance(outcome, FileNotFoundError)
    assert not [p for p in tmp_path.rglob("*") if p.is_file()], "the link into b/new went too"


@needs_syncfs
def test_the_flush_follows_the_file_to_its_own_file_system(tmp_path, monkeypatch):
    elsewhere = os.environ.get("INGRESS_TEST_OTHER_FS", "/dev/shm")
    if not os.path.isdir(elsewhere) or os.stat(elsewhere).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip(f"needs {elsewhere} on another file system than {tmp_path}")
    box = tmp_path / "example.test" / "a"
    maildir.ensure_maildir(str(box))
    moved = tmp_path.parent / (tmp_path.name + "-tmp-moved")
    target = os.path.join(elsewhere, f"ingress-test-{os.getpid()}-{tmp_path.name}")
    os.mkdir(target)
    try:
        os.rename(box / "tmp", moved)
        os.symlink(target, box / "tmp")  # the mailbox's tmp/ now lives on another disk
        devices: list[int] = []
        real = maildir.syncfs

        def recording(fd):
            devices.append(os.fstat(fd).st_dev)
            real(fd)

        monkeypatch.setattr(maildir, "syncfs", recording)
        maildir.commit_group([stager(tmp_path, "a", "second")])
        assert os.stat(target).st_dev in devices
    finally:
        for name in os.listdir(target):
            os.unlink(os.path.join(target, name))
        os.rmdir(target)


@needs_syncfs
@pytest.mark.parametrize("sync, flushed", [(None, True), ("batch", True), ("file", False)])
def test_the_server_follows_delivery_sync(ingress_inprocess_server, monkeypatch, tmp_path,
                                          sync, flushed):
    flushes = record_flushes(monkeypatch, tmp_path / "server" / "mail")
    config = {"directory": {"domains": ["example.test"],
                            "users": [{"address": "a@example.test", "password": "pw"}]},
              "plugins": {"relay": {"whitelist": ["127.0.0.1"]}}}
    if sync is not None:
        config["delivery"] = {"sync": sync}
    server = ingress_inprocess_server(config)
    with smtplib.SMTP(server.host, server.port, timeout=30) as client:
        for i in range(3):
            client.sendmail("s@example.org", ["a@example.test", "b@example.org"],
                            f"Subject: m{i}\r\n\r\nx\r\n")
    assert len(server.all_messages()) == 3
    assert bool(flushes) is flushed
    queued = sorted(p.name for p in server.queue.iterdir() if p.is_file())
    assert len(queued) == 6 and not list((server.queue / "tmp").iterdir())


def test_a_flush_that_broke_oddly_is_never_taken_as_done():
    class BreaksOnce(maildir.GroupSync):
        broken = True

        def flush(self):
            if self.broken:
                self.broken = False
                raise ValueError("a bug, not an OSError")

    syncer = BreaksOnce("flush of a test")
    mark = syncer.mark()
    with pytest.raises(RuntimeError, match="flush of a test failed"):
        syncer.sync()
    with pytest.raises(RuntimeError):
        syncer.sync(mark)  # written before the broken flush: it may have carried the data
