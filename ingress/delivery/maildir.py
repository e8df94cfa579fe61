"""Maildir writing (blocking; called from worker threads). Private to the core."""

from __future__ import annotations

import collections
import errno
import itertools
import os
import re
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from ingress import addresses, process
from ingress.directory import Directory

T = TypeVar("T")

_counter = itertools.count(1)
_created: set[str] = set()  # mailboxes known to exist with tmp/new/cur


def fold_safe(value: str) -> str:
    """A header value that cannot start a new header line: CR/LF only as folding."""
    value = re.sub(r"\r\n|\r|\n", "\r\n", value)
    return re.sub(r"\r\n(?![ \t])", "\r\n ", value)


def fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DirectorySync:
    """Group commit of one directory's fsync across the threads that deliver concurrently.

    A caller's change (a link into ``new/``) is durable once an fsync of the directory that
    *started after* the change has finished. So a caller that finds an fsync running waits for
    it to end and then shares the next one with everyone else who arrived meanwhile: N
    concurrent deliveries into one folder cost about two directory fsyncs, not N, and each
    caller still returns only once its own entry is on disk (or raises that fsync's error).
    """

    def __init__(self, path: str):
        self.path = path
        self._cond = threading.Condition()
        self._started = 0  # number of the last fsync started
        self._done = 0  # number of the last fsync finished
        self._running = False
        self._errors: dict[int, OSError] = {}  # failed fsyncs by number (kept briefly)
        self.users = 0  # threads inside sync_dir() for this directory

    def sync(self) -> None:
        with self._cond:
            mine = self._started + 1  # the first fsync to start from now on covers my change
            while self._done < mine:
                if self._running:
                    self._cond.wait()
                    continue
                self._running = True
                self._started += 1
                number = self._started
                error = None
                self._cond.release()
                try:
                    fsync_dir(self.path)
                except OSError as exc:
                    error = exc
                finally:
                    self._cond.acquire()
                    self._running = False
                    self._done = number
                    if error is not None:
                        self._errors[number] = error
                    self._errors.pop(number - 64, None)
                    self._cond.notify_all()
            error = self._errors.get(mine)
        if error is not None:
            raise OSError(error.errno, f"fsync of {self.path} failed: {error.strerror}")


_syncs: dict[str, DirectorySync] = {}  # only directories being synced now
_syncs_lock = threading.Lock()


def sync_dir(path: str | Path) -> None:
    """fsync *path*, sharing the fsync with concurrent callers (see :class:`DirectorySync`)."""
    path = os.fspath(path)
    with _syncs_lock:
        syncer = _syncs.get(path)
        if syncer is None:
            syncer = _syncs[path] = DirectorySync(path)
        syncer.users += 1
    try:
        syncer.sync()
    finally:
        with _syncs_lock:
            syncer.users -= 1
            if not syncer.users:
                del _syncs[path]


def ensure_maildir(box: str) -> None:
    if box in _created:
        return
    path = Path(box)
    missing = [p for p in (path, *path.parents) if not p.exists()]
    for sub in ("tmp", "new", "cur"):
        (path / sub).mkdir(parents=True, exist_ok=True)
    # New directories must survive a crash too: fsync each created one's parent.
    for p in [path / "tmp", path / "new", path / "cur", *missing]:
        fsync_dir(p.parent)
    _created.add(box)


class MailboxCap:
    """How many mailbox folders a domain folder has, and admission of new ones under a cap.

    The count is what is on disk (so it holds across worker processes and restarts), listed
    again only when the folder's modification time changed since the last listing: a RCPT to a
    known mailbox costs one ``stat``. A listing is cached only once the folder's time is
    :data:`SETTLED` seconds old, since two changes within one tick of the file system's clock
    leave the same time. New names accepted at RCPT but not yet delivered are held per process
    until their transaction is gone, so concurrent sessions cannot all take the last place.
    """

    SETTLED = 2.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._listed: dict[str | Path, tuple[int, int, int]] = {}  # folder -> (inode, mtime, count)
        self._held: dict[str | Path, dict[str, int]] = {}  # folder -> {local part: holders}
        # Finalizers run whenever the garbage goes, in any thread, even inside admit(): they
        # only queue the release (deque.append is atomic); admit() applies it.
        self._released: collections.deque[tuple[str | Path, str]] = collections.deque()

    def on_disk(self, folder: str | Path) -> int:
        """Sub-folders of *folder* (0 when it does not exist)."""
        try:
            st = os.stat(folder)
        except FileNotFoundError:
            return 0
        key = (st.st_ino, st.st_mtime_ns)
        cached = self._listed.get(folder)
        if cached is not None and cached[:2] == key:
            return cached[2]
        with os.scandir(folder) as entries:
            count = sum(1 for e in entries if e.is_dir(follow_symlinks=False))
        if time.time() - st.st_mtime > self.SETTLED:
            self._listed[folder] = (*key, count)
        else:
            self._listed.pop(folder, None)
        return count

    def admit(self, folder: str | Path, name: str, cap: int, holder: object) -> bool:
        """Whether mail for *name* may go to ``folder/name``: yes when that mailbox exists,
        else only if the folders on disk plus the names held by live transactions stay within
        *cap*; then *name* is held until *holder* (the transaction) is garbage."""
        if os.path.isdir(os.path.join(folder, name)):
            return True
        with self._lock:
            while self._released:
                self._release(*self._released.popleft())
            held = self._held.setdefault(folder, {})
            if name not in held and not self._room(folder, held, cap):
                return False
            held[name] = held.get(name, 0) + 1
        weakref.finalize(holder, self._released.append, (folder, name))
        return True

    def _room(self, folder: str | Path, held: dict[str, int], cap: int) -> bool:
        """Whether one more name fits: folders on disk plus held names not yet on disk. A held
        name whose message was delivered is on disk already while its transaction lives on a
        moment after the 250; only near the cap is it worth a stat per held name to see."""
        if self.on_disk(folder) + len(held) < cap:
            return True
        # Held names first, then the listing: a folder made in between counts twice (a 452
        # too many), never zero times (a mailbox over the cap).
        pending = sum(not os.path.isdir(os.path.join(folder, n)) for n in held)
        return self.on_disk(folder) + pending < cap

    def _release(self, folder: str | Path, name: str) -> None:
        held = self._held[folder]
        held[name] -= 1
        if not held[name]:
            del held[name]
        if not held:
            del self._held[folder]


_name_hosts: dict[str, str] = {}  # hostname -> its form in file names


def unique_name(hostname: str) -> str:
    host = _name_hosts.get(hostname)
    if host is None:
        host = _name_hosts[hostname] = hostname.replace("/", "\\057").replace(":", "\\072")
    seconds, nanoseconds = divmod(time.time_ns(), 1_000_000_000)
    return f"{seconds}.M{nanoseconds // 1000}P{process.pid}Q{next(_counter)}.{host}"


def write_all(fd: int, buffers: list) -> None:
    """Write *buffers* in order with as few system calls as the kernel allows."""
    written = os.writev(fd, buffers)
    for buffer in buffers:
        if written >= len(buffer):
            written -= len(buffer)
            continue
        view = memoryview(buffer)[written:]
        written = 0
        while view:
            view = view[os.write(fd, view):]


def write_file(path: str | Path, header: bytes, message) -> None:
    """Create *path* with *header* and the message, and fsync it. Plain descriptor calls: this
    runs in a worker thread for every message, and each call there is a turn at the GIL."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        data = message.getvalue()
        if data is not None:
            write_all(fd, [header, data])
        else:
            write_all(fd, [header])
            for chunk in message.chunks(1 << 20):
                write_all(fd, [chunk])
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_quietly(paths) -> None:
    for p in paths:
        try:
            os.unlink(p)
        except OSError:
            pass


def mailbox_path(root: str | Path, domain: str, local: str) -> str:
    """``root/domain/folder``, the folder being the local part's NFC form (as compared), refusing
    (``PermissionError``) any name that would leave *root* or nest folders, whatever the
    directory let through: defence in depth."""
    if (not Directory.is_safe_local_part(local) or not domain or domain.startswith(".")
            or any(c in domain for c in "/\\\0")):
        raise PermissionError(errno.EPERM, f"unsafe mailbox name {local!r} in {domain!r}")
    return os.path.join(root, domain, addresses.local_key(local))


QUARANTINE = ".Quarantine"  # the Maildir++ folder "Quarantine" of a mailbox


def deliver(root: str | Path, mailboxes: list[tuple[str, str]], header: bytes, message,
            hostname: str, quarantine: bool = False) -> list[str]:
    """Write one copy into the first mailbox's ``tmp/``, hard-link it into the other mailboxes'
    ``new/``, rename it into the first one's ``new/``, fsync those ``new/`` folders; return the
    final paths. *quarantine*: into each mailbox's ``Quarantine`` folder instead."""
    finals, folders = stage(root, mailboxes, header, message, hostname, quarantine)
    try:
        for folder in folders:
            sync_dir(folder)
    except BaseException:
        remove_quietly(finals)
        raise
    return finals


def commit_group(stagers: Sequence[Callable[[], tuple[T, list[str], list[str]]]]
                 ) -> list[T | BaseException]:
    """Run each of *stagers* (each writes its files with their data fsynced and returns
    ``(result, files written, folders whose entries must be fsynced)``), then fsync every folder
    they named once, through :func:`sync_dir`. Per stager: its result once all of its folders are
    durable, or the exception that failed it, after its files were removed. One failure fails
    only the stagers concerned."""
    outcomes: list[T | BaseException] = []
    written: list[tuple[list[str], list[str]]] = []
    folders: dict[str, OSError | None] = {}
    for stager in stagers:
        try:
            result, files, touched = stager()
        except BaseException as exc:  # handed to that message's session
            outcomes.append(exc)
            written.append(([], []))
            continue
        outcomes.append(result)
        written.append((files, touched))
        for folder in touched:
            folders[folder] = None
    for folder in folders:
        try:
            sync_dir(folder)
        except OSError as exc:
            folders[folder] = exc
    for i, (files, touched) in enumerate(written):
        error = next((folders[f] for f in touched if folders[f] is not None), None)
        if error is not None:
            remove_quietly(files)
            outcomes[i] = error
    return outcomes


def stage(root: str | Path, mailboxes: list[tuple[str, str]], header: bytes, message,
          hostname: str, quarantine: bool = False) -> tuple[list[str], list[str]]:
    """:func:`deliver` but for the directory fsyncs: the final paths (the file's data is
    durable) and the ``new/`` folders whose entries the caller must still fsync."""
    boxes = [mailbox_path(root, domain, local) for domain, local in mailboxes]
    if quarantine:
        boxes = [box + "/" + QUARANTINE for box in boxes]
    for box in boxes:
        ensure_maildir(box)
    try:
        finals = place(boxes, header, message, hostname)
    except FileNotFoundError:
        # A mailbox removed while we run (by hand, by a cleanup job): make it again, once.
        for box in boxes:
            _created.discard(box)
            ensure_maildir(box)
        finals = place(boxes, header, message, hostname)
    return finals, [box + "/new" for box in boxes]


def place(boxes: list[str], header: bytes, message, hostname: str) -> list[str]:
    """Write the file in the first box's ``tmp/`` with its data fsynced, link it into the other
    boxes' ``new/`` and rename it into the first one's; nothing is left on failure."""
    name = unique_name(hostname)
    tmp = boxes[0] + "/tmp/" + name
    finals: list[str] = []
    try:
        write_file(tmp, header, message)
        for box in boxes[1:]:
            final = box + "/new/" + name
            os.link(tmp, final)
            finals.append(final)
        first = boxes[0] + "/new/" + name
        os.rename(tmp, first)
        finals.insert(0, first)
    except BaseException:
        remove_quietly([*finals, tmp])
        raise
    return finals


TMP_MAX_AGE = 36 * 3600  # seconds: a tmp/ file older than this is a crash's leftover


def sweep_tmp(root: Path, max_age: float = TMP_MAX_AGE) -> int:
    """Remove the files in ``root/<domain>/<local>/tmp/`` last modified more than *max_age*
    seconds ago (what a crash left there; no delivery takes that long, so it never races a
    writer, in this process or another). Return how many were removed. Symbolic links are never
    followed; unreadable folders are skipped."""
    cutoff = time.time() - max_age
    removed = 0
    for domain in _subfolders(root):
        for box in _subfolders(Path(domain.path)):
            try:
                entries = list(os.scandir(os.path.join(box.path, "tmp")))
            except OSError:
                continue
            for entry in entries:
                try:
                    if (entry.is_file(follow_symlinks=False)
                            and entry.stat(follow_symlinks=False).st_mtime < cutoff):
                        os.unlink(entry.path)
                        removed += 1
                except OSError:
                    continue
    return removed


def _subfolders(path: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(path) as entries:
            return [e for e in entries if e.is_dir(follow_symlinks=False)]
    except OSError:
        return []
