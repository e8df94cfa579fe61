"""Delivery batches: messages ready together share a thread hop and the directory fsyncs, and
each one is still answered only once its own file and entry are durable."""

from __future__ import annotations

import asyncio
import os
import smtplib
import threading
import time

import pytest
from staging import Body, needs_syncfs, stager

from ingress.delivery import batch, maildir


def held_stager(root, release: threading.Event, batch: bool = True):
    """A stager that waits for *release* (a batch stuck on the disk), then stores "first"."""
    def run(commit):
        release.wait(10)
        return stager(root, "a", "first", batch)(commit)
    return run


def record_entry_flushes(monkeypatch, root) -> list[tuple[str, set[str]]]:
    """Every flush that can make directory entries durable, with the entries it covers:
    (folder, its entries) for a directory fsync, ("syncfs", every path in a new/ folder under
    *root*) for a flush of the file system, as each started."""
    real_fsync, real_syncfs = maildir.fsync_dir, maildir.syncfs
    flushes: list[tuple[str, set[str]]] = []

    def fsync_dir(path):
        flushes.append((os.fspath(path), set(os.listdir(path))))
        real_fsync(path)

    def syncfs(fd):
        flushes.append(("syncfs", {str(p) for p in root.glob("**/new/*")}))
        real_syncfs(fd)

    monkeypatch.setattr(maildir, "fsync_dir", fsync_dir)
    monkeypatch.setattr(maildir, "syncfs", syncfs)
    return flushes


def entry_was_flushed(path, flushes) -> bool:
    folder, name = os.path.split(str(path))
    return any((f == folder and name in entries) or (f == "syncfs" and str(path) in entries)
               for f, entries in flushes)


def record_batches(monkeypatch) -> list[int]:
    """The size of every batch stored, in order."""
    groups: list[int] = []

    class CountingGroup(maildir.Group):
        def __init__(self, stagers, *args):
            groups.append(len(stagers))
            super().__init__(stagers, *args)

    monkeypatch.setattr(batch, "Group", CountingGroup)
    return groups


def test_messages_ready_together_go_in_one_batch_and_are_all_durable(tmp_path, monkeypatch):
    flushes = record_entry_flushes(monkeypatch, tmp_path)
    groups = record_batches(monkeypatch)

    async def main():
        batcher = batch.DeliveryBatcher(asyncio.get_running_loop())
        futures = [batcher.submit(stager(tmp_path, f"u{i % 2}", f"m{i}"), f"q{i}")
                   for i in range(6)]
        return await asyncio.gather(*futures)

    results = asyncio.run(main())
    assert groups == [6], "one thread hop for the six messages"
    paths = [p for finals in results for p in finals]
    assert sorted(paths) == sorted(str(p) for p in tmp_path.glob("example.test/*/new/*"))
    entry_flushes = [(f, entries) for f, entries in flushes if f == "syncfs" or f.endswith("/new")]
    if maildir.FILE_SYSTEM_FLUSH:  # the data flush, then one that carries the entries
        assert [f for f, _ in entry_flushes] == ["syncfs", "syncfs"]
    else:
        assert len(entry_flushes) == 2, "one fsync per touched new/ folder for the whole batch"
    assert all(entry_was_flushed(path, entry_flushes) for path in paths)


def test_a_failing_message_gets_451_and_the_others_are_stored(tmp_path):
    (tmp_path / "example.test" / "bad").mkdir(parents=True)
    (tmp_path / "example.test" / "bad" / "tmp").write_text("a file where a folder should be")

    def broken(commit):
        raise ValueError("a bug, not a storage error")

    async def main():
        batcher = batch.DeliveryBatcher(asyncio.get_running_loop())
        futures = [batcher.submit(stager(tmp_path, "good", "one"), "q1"),
                   batcher.submit(stager(tmp_path, "bad", "two"), "q2"),
                   batcher.submit(broken, "q3"),
                   batcher.submit(stager(tmp_path, "good", "three"), "q4")]
        return await asyncio.gather(*futures, return_exceptions=True)

    one, two, three, four = asyncio.run(main())
    assert two is batch.STORAGE_ERROR and two.code == 451
    assert isinstance(three, ValueError)
    assert len(one) == len(four) == 1
    assert sorted(p.name for p in (tmp_path / "example.test" / "good" / "new").iterdir()) == sorted(
        os.path.basename(p) for p in (*one, *four))


def test_a_failed_directory_fsync_fails_only_the_messages_in_that_folder(tmp_path, monkeypatch):
    # With delivery.sync = "file" (or where syncfs is not trusted) each folder is fsynced.
    real = maildir.fsync_dir

    def failing(path):
        if os.fspath(path).endswith("/bad/new"):
            raise OSError(5, "Input/output error")
        real(path)

    monkeypatch.setattr(maildir, "fsync_dir", failing)
    outcomes = maildir.commit_group([stager(tmp_path, "good", "one", batch=False),
                                     stager(tmp_path, "bad", "two", batch=False)])
    assert isinstance(outcomes[1], OSError) and outcomes[1].errno == 5
    assert len(outcomes[0]) == 1 and os.path.exists(outcomes[0][0])
    assert not list((tmp_path / "example.test" / "bad").glob("*/*")), "nothing left behind"


CONFIG = {"directory": {"domains": ["example.test"], "users": [
    {"address": f"u{i}@example.test", "password": "pw"} for i in range(3)] + [
    {"address": "bad@example.test", "password": "pw"}]}}
SESSIONS = 12
MESSAGES = 6


def test_concurrent_sessions_nothing_lost_or_duplicated_and_a_failure_stays_its_own(
        ingress_inprocess_server, monkeypatch):
    server = ingress_inprocess_server(CONFIG)
    flushes = record_entry_flushes(monkeypatch, server.maildir)
    groups = record_batches(monkeypatch)
    bad = server.maildir / "example.test" / "bad"
    bad.mkdir(parents=True)
    (bad / "tmp").write_text("a file where a folder should be")
    accepted: list[str] = []
    refused: list[tuple[str, int]] = []
    lock = threading.Lock()

    def sender(i: int) -> None:
        with smtplib.SMTP(server.host, server.port, timeout=30) as client:
            for j in range(MESSAGES):
                subject = f"m-{i}-{j}"
                rcpt = "bad@example.test" if (i, j) == (0, 3) else f"u{(i + j) % 3}@example.test"
                try:
                    client.sendmail("s@example.org", [rcpt], f"Subject: {subject}\r\n\r\nx\r\n")
                except smtplib.SMTPDataError as exc:
                    with lock:
                        refused.append((subject, exc.smtp_code))
                    continue
                with lock:
                    accepted.append(subject)

    threads = [threading.Thread(target=sender, args=(i,)) for i in range(SESSIONS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert refused == [("m-0-3", 451)]
    assert len(accepted) == SESSIONS * MESSAGES - 1
    stored = server.all_messages()
    subjects = sorted(p.read_bytes().split(b"Subject: ")[1].split(b"\r\n")[0].decode()
                      for p in stored)
    assert subjects == sorted(accepted), "every 250 stored once, nothing else"
    assert sum(groups) == SESSIONS * MESSAGES
    # each entry was in a new/ folder when an fsync of it or a flush of its file system started
    assert all(entry_was_flushed(path, flushes) for path in stored)
    assert not list(server.maildir.glob("*/*/tmp/*"))


@pytest.mark.parametrize("quarantine", [False, True])
def test_commit_group_stores_each_message(tmp_path, quarantine):
    def staging(i: int):
        def run(commit):
            boxes = [("example.test", "a"), ("example.test", "b")]
            finals, folders = maildir.stage(commit, tmp_path, boxes, b"X: 1\r\n", Body(f"m{i}"),
                                            "mx", quarantine)
            return finals, finals, folders
        return run

    outcomes = maildir.commit_group([staging(i) for i in range(3)])
    folder = ".Quarantine/new" if quarantine else "new"
    for finals in outcomes:
        assert [p.split("/")[-3 if not quarantine else -4] for p in finals] == ["a", "b"]
        assert all(f"/{folder}/" in p for p in finals)
        with open(finals[1], "rb") as f:
            assert f.read().startswith(b"X: 1\r\nSubject: m")


def test_what_becomes_ready_while_every_batch_runs_goes_together_next(tmp_path, monkeypatch):
    groups = record_batches(monkeypatch)
    release = threading.Event()
    slow = held_stager(tmp_path, release)

    async def main():
        loop = asyncio.get_running_loop()
        batcher = batch.DeliveryBatcher(loop, parallel=1)
        first = batcher.submit(slow, "q0")
        await asyncio.sleep(0.05)  # the first batch is in its thread, waiting
        later = [batcher.submit(stager(tmp_path, "b", f"m{i}"), f"q{i + 1}") for i in range(3)]
        await asyncio.sleep(0.05)
        assert groups == [1], "nothing else starts while the only batch runs"
        release.set()
        return await asyncio.gather(first, *later)

    results = asyncio.run(main())
    assert groups == [1, 3]
    assert all(len(finals) == 1 and os.path.exists(finals[0]) for finals in results)


def test_a_message_whose_session_stopped_waiting_is_not_stored_later(tmp_path):
    # A session cut by the hook timeout has answered 451; its client will send the message
    # again, so the batch that starts after the timeout must not store this copy.
    release = threading.Event()
    slow = held_stager(tmp_path, release)

    async def main():
        batcher = batch.DeliveryBatcher(asyncio.get_running_loop(), parallel=1)
        first = batcher.submit(slow, "q0")
        await asyncio.sleep(0.05)  # the only batch is in its thread, waiting for the disk
        given_up = batcher.submit(stager(tmp_path, "b", "late"), "q1")
        kept = batcher.submit(stager(tmp_path, "c", "kept"), "q2")
        with pytest.raises((asyncio.TimeoutError, TimeoutError)):
            await asyncio.wait_for(given_up, 0.05)
        release.set()
        return await asyncio.gather(first, kept)

    first, kept = asyncio.run(main())
    assert os.path.exists(first[0]) and os.path.exists(kept[0])
    assert not (tmp_path / "example.test" / "b").exists()  # never staged, not even its folder


def test_a_message_stored_after_its_session_stopped_waiting_is_removed_again(tmp_path, caplog):
    # The session gave up (hook timeout) while its message was being written: it answered
    # 451, so the client sends the message again, and the copy stored meanwhile must go. The
    # other message of the same batch stays.
    release = threading.Event()
    writing = threading.Event()

    def slow(commit):
        writing.set()
        return held_stager(tmp_path, release)(commit)

    async def main():
        batcher = batch.DeliveryBatcher(asyncio.get_running_loop(), parallel=1)
        kept = batcher.submit(stager(tmp_path, "c", "kept"), "q0")
        given_up = batcher.submit(slow, "q1")
        await until(writing.is_set)
        with pytest.raises((asyncio.TimeoutError, TimeoutError)):
            await asyncio.wait_for(given_up, 0.05)
        release.set()
        result = await kept
        await until(lambda: not list((tmp_path / "example.test" / "a").glob("*/*")))
        return result

    with caplog.at_level("WARNING", logger="ingress.delivery"):
        kept = asyncio.run(main())
    assert os.path.exists(kept[0])
    assert "queue id q1: stored after its session stopped waiting" in caplog.text


async def until(condition, seconds: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + seconds
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_a_young_batch_holds_the_next_back_and_only_a_stalled_one_does_not(tmp_path,
                                                                         monkeypatch):
    groups = record_batches(monkeypatch)
    releases = [threading.Event(), threading.Event()]

    async def main():
        batcher = batch.DeliveryBatcher(asyncio.get_running_loop(), parallel=3)
        batcher.STALL_SECONDS = 1.0
        first = batcher.submit(held_stager(tmp_path, releases[0]), "q0")
        await until(lambda: groups == [1])  # in its thread, stuck on the "disk"
        second = batcher.submit(held_stager(tmp_path, releases[1]), "q1")
        await asyncio.sleep(0.2)
        assert groups == [1], "while the running batch is young, the next one waits for it"
        await until(lambda: groups == [1, 1])  # the first stalled: the second went beside it
        third = batcher.submit(stager(tmp_path, "b", "third"), "q2")
        await asyncio.sleep(0.2)
        assert groups == [1, 1], "the youngest running batch (the second) is young again"
        stored = await asyncio.wait_for(third, 10)
        assert groups == [1, 1, 1] and not first.done() and not second.done()
        for release in releases:
            release.set()
        return [await first, await second, stored]

    results = asyncio.run(main())
    assert all(len(finals) == 1 and os.path.exists(finals[0]) for finals in results)


@needs_syncfs
def test_the_next_batchs_data_flush_carries_the_previous_batchs_entries(tmp_path, monkeypatch):
    flushes = record_entry_flushes(monkeypatch, tmp_path)
    tmp_at_flush: list[int] = []
    recording = maildir.syncfs

    def syncfs(fd):
        tmp_at_flush.append(len(list(tmp_path.glob("example.test/*/tmp/*"))))
        recording(fd)

    monkeypatch.setattr(maildir, "syncfs", syncfs)
    release = threading.Event()

    async def main():
        batcher = batch.DeliveryBatcher(asyncio.get_running_loop(), parallel=1)
        first = batcher.submit(held_stager(tmp_path, release), "q0")
        await asyncio.sleep(0.05)  # the first batch is in its thread, waiting
        later = [batcher.submit(stager(tmp_path, "b", f"m{i}"), f"q{i + 1}") for i in range(3)]
        release.set()
        return await asyncio.gather(first, *later)

    first, *later = asyncio.run(main())
    # (the folders' parents are fsynced when a mailbox is made: not entry flushes)
    flushes = [(f, entries) for f, entries in flushes if f == "syncfs" or f.endswith("/new")]
    assert [f for f, _ in flushes] == ["syncfs"] * 3, "three flushes for two batches, not four"
    assert tmp_at_flush == [1, 3, 0]
    # the second flush started with the first batch's entry in new/ and the second's data in
    # tmp/: it made both durable; the third carried the second batch's entries
    assert entry_was_flushed(first[0], flushes[1:2])
    assert not entry_was_flushed(first[0], flushes[:1])
    assert all(entry_was_flushed(p[0], flushes[2:]) for p in later)
    assert not any(entry_was_flushed(p[0], flushes[:2]) for p in later)


@pytest.mark.parametrize("case", ["slow next batch", "big next batch", "file mode"])
def test_a_batch_is_not_held_back_by_the_next_ones_writes(tmp_path, case):
    # The next batch's second message is written only once the first batch was answered: if
    # the first batch waited for the whole next batch's writes, this would never end.
    first_answered = threading.Event()
    release = threading.Event()

    def sleeper(commit):
        time.sleep(0.2)  # longer than STALL_SECONDS
        return stager(tmp_path, "b", "slow")(commit)

    def gated(commit):
        assert first_answered.wait(10), "the first batch was held back"
        return stager(tmp_path, "b", "gated")(commit)

    async def main():
        batcher = batch.DeliveryBatcher(asyncio.get_running_loop(), parallel=1)
        batcher.STALL_SECONDS = 0.05
        first = batcher.submit(held_stager(tmp_path, release, batch=case != "file mode"), "q0")
        first.add_done_callback(lambda _: first_answered.set())
        await asyncio.sleep(0.05)  # the first batch is in its thread, waiting
        later = []
        if case == "slow next batch":
            later.append(batcher.submit(sleeper, "q1"))
        later.append(batcher.submit(gated, "q2", size=(2 << 20) if case == "big next batch" else 0))
        release.set()
        return await asyncio.wait_for(asyncio.gather(first, *later), 20)

    results = asyncio.run(main())
    assert all(os.path.exists(finals[0]) for finals in results)
