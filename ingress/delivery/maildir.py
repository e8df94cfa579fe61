"""Maildir writing (blocking; called from worker threads). Private to the core."""

from __future__ import annotations

import collections
import ctypes
import errno
import itertools
import logging
import os
import re
import sys
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from ingress import addresses, process
from ingress.directory import Directory

T = TypeVar("T")
log = logging.getLogger("ingress.delivery")

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


class GroupSync:
    """One flush at a time, shared by every caller waiting for it (group commit).

    A caller's change is durable once a flush that *started after* the change has finished. So
    a caller that finds a flush running waits for it to end and then shares the next one with
    everyone else who arrived meanwhile: N concurrent callers cost about two flushes, not N.
    :meth:`sync` raises if any flush numbered above the caller's *mark* failed (taken with
    :meth:`mark` before the change; by default when :meth:`sync` is called): a flush that
    failed may have been the one that wrote the change.
    """

    def __init__(self, name: str):
        self.name = name
        self._cond = threading.Condition()
        self._started = 0  # number of the last flush started
        self._done = 0  # number of the last flush finished
        self._running = False
        self._failures: collections.deque[tuple[int, BaseException]] = (
            collections.deque(maxlen=64))

    def flush(self) -> None:
        raise NotImplementedError

    def mark(self) -> int:
        with self._cond:
            return self._done

    def started(self) -> int:
        """The number of the last flush started: any flush numbered above it starts later."""
        with self._cond:
            return self._started

    def sync(self, mark: int | None = None, after: int | None = None) -> None:
        """Return once a flush that started after the caller's change has finished: after
        :meth:`started` returned *after* (taken once the change was made), else after now."""
        with self._cond:
            if mark is None:
                mark = self._done
            mine = (self._started if after is None else after) + 1
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
                    self.flush()
                except BaseException as exc:  # whatever it was, nobody may take it as done
                    error = exc
                finally:
                    self._cond.acquire()
                    self._running = False
                    self._done = number
                    if error is not None:
                        self._failures.append((number, error))
                    self._cond.notify_all()
            # Any failure after the mark counts; the deque drops only older ones.
            error = next((e for n, e in self._failures if n > mark), None)
        if isinstance(error, OSError):
            raise OSError(error.errno, f"{self.name} failed: {error.strerror}")
        if error is not None:
            raise RuntimeError(f"{self.name} failed") from error


class DirectorySync(GroupSync):
    """Group commit of one directory's fsync across the threads that deliver concurrently."""

    def __init__(self, path: str):
        super().__init__(f"fsync of {path}")
        self.path = path
        self.users = 0  # threads inside sync_dir() for this directory

    def flush(self) -> None:
        fsync_dir(self.path)


_syncs: dict[str, DirectorySync] = {}  # only directories being synced now
_syncs_lock = threading.Lock()


def sync_dir(path: str | Path) -> None:
    """fsync *path*, sharing the fsync with concurrent callers (see :class:`GroupSync`)."""
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


def _load_syncfs() -> Callable[[int], int] | None:
    """libc's ``syncfs`` where it reports every error of the flush (Linux 5.17 and later:
    write-back errors since 5.8, the file system's own sync since 5.17), else None.

    Python has no binding for it (``os.sync`` flushes every file system), hence ctypes."""
    version = re.match(r"(\d+)\.(\d+)", os.uname().release) if sys.platform == "linux" else None
    if version is None or (int(version[1]), int(version[2])) < (5, 17):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int]
    function.restype = ctypes.c_int
    return function


_syncfs = _load_syncfs()
FILE_SYSTEM_FLUSH = _syncfs is not None  # else every file's data is fsynced on its own
# Local file systems whose syncfs writes back and flushes what fsync would. Network and FUSE
# file systems may not pass a syncfs on to the server, and an overlay's errors may land on the
# layer below: those get an fsync per file.
FLUSHED_TYPES = frozenset({"ext4", "ext3", "xfs", "btrfs", "tmpfs"})


def syncfs(fd: int) -> None:
    """Flush the file system holding *fd*; raise its write-back errors since the last call."""
    if _syncfs(fd) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def file_system_type(device: int) -> str | None:
    """The type of the file system mounted from *device* (``/proc/self/mountinfo``)."""
    wanted = f"{os.major(device)}:{os.minor(device)}"
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as mounts:
            for line in mounts:
                fields = line.split(" ", 3)
                if len(fields) > 3 and fields[2] == wanted and " - " in line:
                    return line.split(" - ", 1)[1].split(" ", 1)[0]
    except OSError:
        pass
    return None


class FileSystemSync(GroupSync):
    """Group commit of file data on one file system: one ``syncfs`` makes the data of every
    file written on it before the call durable, in one pass of write-back and one cache flush,
    instead of a write-back and a flush per file. Write-back errors reach a ``syncfs`` through
    its descriptor (opened once, before the first file it covers was written); each is counted
    against every caller whose mark precedes it."""

    def __init__(self, fd: int, folder: str, kind: str | None):
        super().__init__(f"flush of the file system of {folder}")
        self.fd = fd
        self.usable = kind in FLUSHED_TYPES
        if self.usable:
            # A new descriptor reports every error nobody has collected through syncfs yet,
            # however old; collect them now, before anything this one covers is written.
            _syncfs(fd)
        log.info("delivery: the data of new files on the file system of %s (%s) is made "
                 "durable %s", folder, kind or "type unknown",
                 "per batch (syncfs)" if self.usable else "by an fsync per file")

    def flush(self) -> None:
        syncfs(self.fd)


_file_systems: dict[int, FileSystemSync] = {}  # by device, this process's own descriptors
_file_systems_lock = threading.Lock()


def file_system_for(device: int, folder: str) -> FileSystemSync | None:
    """The flusher of *device*, made with *folder* (a folder on it) when first needed; None
    when data there must be fsynced file by file."""
    syncer = _file_systems.get(device)
    if syncer is None:
        with _file_systems_lock:
            syncer = _file_systems.get(device)
            if syncer is None:
                fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                if os.fstat(fd).st_dev != device:  # the folder moved meanwhile: not now
                    os.close(fd)
                    return None
                syncer = _file_systems[device] = FileSystemSync(fd, folder,
                                                                file_system_type(device))
    return syncer if syncer.usable else None


def _forget_file_systems() -> None:
    """After fork: write-back errors are counted per open file, so a worker process must not
    share its parent's descriptors (one process would see an error and the other not)."""
    global _file_systems_lock
    for syncer in _file_systems.values():
        os.close(syncer.fd)
    _file_systems.clear()
    _file_systems_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_file_systems)


class _Work:
    """One stager's share of a :class:`Commit`."""

    __slots__ = ("temporary", "steps", "file_systems", "files", "touched")

    def __init__(self) -> None:
        self.temporary: list[str] = []  # files written, to remove if it fails
        self.steps: list[Callable[[], None]] = []  # what publishes them, run in order
        self.file_systems: set[FileSystemSync] = set()
        self.files: list[str] = []
        self.touched: list[str] = []


class Commit:
    """The durability work of one delivery batch (see :func:`commit_group`). A stager writes
    its files with :meth:`write` and hands what makes them visible (renames into ``new/``,
    links) to :meth:`publish`: those steps run only once the data of every file the stager
    wrote is durable, so a crash never leaves a published file without its content."""

    def __init__(self) -> None:
        self.marks: dict[FileSystemSync, int] = {}
        self.work: _Work  # the share of the stager running now (begin)

    def begin(self) -> _Work:
        """Start the share of the next stager: what it writes and publishes goes there."""
        self.work = _Work()
        return self.work

    def write(self, path: str, header: bytes, message=None, *, batch: bool = True) -> None:
        """Create *path* with *header* and the message (None: the header alone). *batch*:
        its data is made durable with the batch's other files on its file system (one flush
        for all), where that file system can be trusted to; else it is fsynced here."""
        path = os.fspath(path)
        self.work.temporary.append(path)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            syncer = None
            if batch and FILE_SYSTEM_FLUSH:
                # The file's own device (a folder may be a mount point or a symbolic link),
                # and the mark taken before any of its data is written.
                syncer = file_system_for(os.fstat(fd).st_dev, os.path.dirname(path))
                if syncer is not None and syncer not in self.marks:
                    self.marks[syncer] = syncer.mark()
            write_message(fd, header, message)
            if syncer is None:
                os.fsync(fd)
            else:
                self.work.file_systems.add(syncer)
        finally:
            os.close(fd)

    def publish(self, step: Callable[[], None]) -> None:
        self.work.steps.append(step)


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


def write_message(fd: int, header: bytes, message=None) -> None:
    """Write *header* and the message (None: the header alone) to *fd*. Plain descriptor
    calls: this runs in a worker thread for every message, and each call there is a turn at
    the GIL."""
    data = b"" if message is None else message.getvalue()
    if data is not None:
        write_all(fd, [header, data])
    else:
        write_all(fd, [header])
        for chunk in message.chunks(1 << 20):
            write_all(fd, [chunk])


def remove_quietly(paths) -> int:
    """Unlink each of *paths*, in order; how many could not be (gone already, say)."""
    missed = 0
    for p in paths:
        try:
            os.unlink(p)
        except OSError:
            missed += 1
    return missed


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
            hostname: str, quarantine: bool = False, batch: bool = True) -> list[str]:
    """Write one copy into the first mailbox's ``tmp/``, make its data durable, hard-link it
    into the other mailboxes' ``new/``, rename it into the first one's ``new/``, fsync those
    ``new/`` folders (no batch follows to carry the entries); return the final paths.
    *quarantine*: into each mailbox's ``Quarantine`` folder instead. *batch*: see
    :meth:`Commit.write`."""
    def stager(commit: Commit):
        finals, folders = stage(commit, root, mailboxes, header, message, hostname, quarantine,
                                batch)
        return finals, finals, folders

    return commit_one(stager)


def commit_one(stager: Callable[[Commit], tuple[T, list[str], list[str]]]) -> T:
    """:func:`commit_group` of a single stager: its result, or the exception that failed it
    raised."""
    outcome = commit_group([stager])[0]
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


def commit_group(stagers: Sequence[Callable[[Commit], tuple[T, list[str], list[str]]]]
                 ) -> list[T | BaseException]:
    """Store a batch. Each of *stagers* writes its files through the :class:`Commit` it is
    given and returns ``(result, final paths, folders whose entries must be made durable)``.
    Then the data of every file is made durable (one flush per file system, or fsync per file),
    each stager's files are published (renamed or linked into place), and every folder named is
    fsynced once for all. Per stager: its result once all of that is done for its files, or the
    exception that failed it, after its files were removed. One failure fails only the stagers
    concerned. (:class:`Group` does it in steps, so that the delivery batcher can overlap
    consecutive batches.)"""
    group = Group(stagers)
    group.flush_data()
    group.publish(carry=False)  # no next batch to share a flush with: fsync the folders
    group.flush_entries()
    return group.outcomes


class Group:
    """One batch being stored, in four steps: write (made with the stagers), :meth:`flush_data`,
    :meth:`publish`, :meth:`flush_entries`; then :attr:`outcomes` hold each stager's result or
    exception (see :func:`commit_group`).

    Entries in folders on a file system flushed per batch are made durable by the first flush
    of that file system that starts after they were published (write-back of the directory
    blocks with everything else, or a journal commit), not by an fsync per folder. So when
    batches follow each other, the next batch's data flush carries this one's entries: one
    flush per batch instead of two. Folders elsewhere are fsynced during :meth:`publish`.
    """

    def __init__(self, stagers: Sequence[Callable[[Commit], tuple[T, list[str], list[str]]]],
                 between: Callable[[], None] | None = None):
        """Write: run *stagers*, calling *between* (if given) before each."""
        self.commit = commit = Commit()
        self.outcomes: list = []
        self._works: list[_Work | None] = []
        for stager in stagers:
            if between is not None:
                between()
            work = commit.begin()
            try:
                result, work.files, work.touched = stager(commit)
            except BaseException as exc:  # handed to that message's session
                remove_quietly(work.temporary)
                self.outcomes.append(exc)
                self._works.append(None)
                continue
            self.outcomes.append(result)
            self._works.append(work)
        self._flushed: dict[FileSystemSync, BaseException | None] = {}
        # folder -> the file system whose flush makes its entries durable (None: fsync it),
        # and what that flush failed with
        self._carriers: dict[str, FileSystemSync | None] = {}
        self._folder_errors: dict[str, BaseException | None] = {}
        self._entry_marks: dict[FileSystemSync, tuple[int, int]] = {}  # (mark, started)

    def _fail(self, i: int, error: BaseException, paths: list[str]) -> None:
        remove_quietly(paths)
        self.outcomes[i] = error
        self._works[i] = None

    def flush_data(self) -> None:
        """Make the data of every file written durable (a flush per file system)."""
        for syncer, mark in self.commit.marks.items():
            try:
                syncer.sync(mark)
                self._flushed[syncer] = None
            except BaseException as exc:
                self._flushed[syncer] = exc

    @property
    def carried(self) -> bool:
        """Whether published entries wait for a flush of their file system (else they are
        durable once :meth:`publish` returns, and :meth:`flush_entries` only settles)."""
        return bool(self._entry_marks)

    def publish(self, carry: bool = True) -> None:
        """Publish each stager's files whose data is durable; fsync the folders whose entries
        no file system flush will carry (every folder unless *carry*); note where the others'
        flushes stand."""
        flushed = self._flushed
        # folder -> the file systems that flushed the data of every stager publishing there
        batched: dict[str, set[FileSystemSync]] = {}
        for i, work in enumerate(self._works):
            if work is None:
                continue
            error = next((flushed[f] for f in work.file_systems if flushed[f] is not None), None)
            if error is None:
                # A mailbox removed by hand since the write fails here (451, the client retries;
                # the next write makes the folder again).
                try:
                    for step in work.steps:
                        step()
                except BaseException as exc:
                    error = exc
            if error is not None:
                self._fail(i, error, [*work.files, *work.temporary])
                continue
            for folder in work.touched:
                self._folder_errors[folder] = None
                mine = batched.setdefault(folder, set(work.file_systems))
                mine &= work.file_systems
        for folder in self._folder_errors:
            try:
                # Only where every stager there had its data flushed per file system:
                # delivery.sync = "file" keeps syncfs off a file system with heavy writers.
                carrier = None
                if carry and batched[folder]:
                    carrier = _file_systems.get(os.stat(folder).st_dev)
                if carrier not in batched[folder]:
                    carrier = None
                    sync_dir(folder)
                self._carriers[folder] = carrier
            except BaseException as exc:
                self._carriers[folder] = None
                self._folder_errors[folder] = exc
        for carrier in set(self._carriers.values()):
            if carrier is not None:  # once every entry is in place
                # Failures count from before the data was written, as for the data.
                self._entry_marks[carrier] = (self.commit.marks[carrier], carrier.started())

    def flush_entries(self) -> None:
        """Wait for the file system flushes that carry the published entries (starting one if
        none has started since); fail the stagers whose entries may not be durable."""
        for carrier, (mark, after) in self._entry_marks.items():
            try:
                carrier.sync(mark, after)
            except BaseException as exc:
                for folder, its_carrier in self._carriers.items():
                    if its_carrier is carrier and self._folder_errors[folder] is None:
                        self._folder_errors[folder] = exc
        self._entry_marks = {}
        for i, work in enumerate(self._works):
            if work is None:
                continue
            errors = self._folder_errors
            error = next((errors[f] for f in work.touched if errors[f] is not None), None)
            if error is not None:
                self._fail(i, error, work.files)

    def files(self) -> list[list[str]]:
        """Each stager's published files (none for one that failed); asked for only when a
        session stopped waiting, so it is not built for every batch."""
        return [list(work.files) if work is not None else [] for work in self._works]

    def abandon(self, error: BaseException) -> None:
        """Fail every stager still standing and remove its files (after a bug in a step)."""
        for i, work in enumerate(self._works):
            if work is not None:
                self._fail(i, error, [*work.files, *work.temporary])


def stage(commit: Commit, root: str | Path, mailboxes: list[tuple[str, str]], header: bytes,
          message, hostname: str, quarantine: bool = False, batch: bool = True
          ) -> tuple[list[str], list[str]]:
    """Write the message for *mailboxes* through *commit* (see :func:`place`): the final paths
    and the ``new/`` folders whose entries must be made durable once it is published."""
    boxes = [mailbox_path(root, domain, local) for domain, local in mailboxes]
    if quarantine:
        boxes = [box + "/" + QUARANTINE for box in boxes]
    for box in boxes:
        ensure_maildir(box)
    try:
        finals = place(commit, boxes, header, message, hostname, batch)
    except FileNotFoundError:
        # A mailbox removed while we run (by hand, by a cleanup job): make it again, once.
        for box in boxes:
            _created.discard(box)
            ensure_maildir(box)
        finals = place(commit, boxes, header, message, hostname, batch)
    return finals, [box + "/new" for box in boxes]


def place(commit: Commit, boxes: list[str], header: bytes, message, hostname: str,
          batch: bool = True) -> list[str]:
    """Write the file in the first box's ``tmp/``; once its data is durable, link it into the
    other boxes' ``new/`` and rename it into the first one's. The final paths."""
    name = unique_name(hostname)
    tmp = boxes[0] + "/tmp/" + name
    finals = [box + "/new/" + name for box in boxes]
    commit.write(tmp, header, message, batch=batch)

    def publish() -> None:
        for final in finals[1:]:
            os.link(tmp, final)
        os.rename(tmp, finals[0])

    commit.publish(publish)
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
