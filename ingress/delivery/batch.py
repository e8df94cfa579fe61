"""Delivery batches: the messages of one event loop whose end of data is ready are stored
together, in one hop to a worker thread. Private to the core.

A batch writes each message's files, makes their data durable (one flush per file system for
all of them), publishes them into place, then makes their directory entries durable
(:class:`ingress.delivery.maildir.Group`). Each message's future is resolved only once its own
files and directory entries are durable; a message that fails gets a ``451`` and leaves nothing
behind, without failing the others (except that a failed flush of a file system fails every
message it may have carried). A message whose session stopped waiting (the hook timeout) is
not stored if its batch has not started, and removed again if it was stored.

Batches run as a pipeline in one thread (see :class:`DeliveryBatcher`): what becomes ready
while a batch is stored goes as the next batch, and the flush that makes the next batch's data
durable also carries the previous batch's entries. Under load that is what fills the batches;
when idle a message waits one turn of the loop at most.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import queue
import threading
import time
import weakref
from collections.abc import Callable

from ingress.delivery.maildir import Commit, Group, remove_quietly
from ingress.reply import Reply

log = logging.getLogger("ingress.delivery")

STORAGE_ERROR = Reply(451, "4.3.0", "Local storage error, try again later")

# A stager writes one message's files through the batch's Commit and returns
# (result, final paths, folders).
Stager = Callable[[Commit], "tuple[object, list[str], list[str]]"]
Entry = tuple[Stager, str, asyncio.Future, int]  # a message: stager, queue id, future, bytes
Waiter = tuple[str, asyncio.Future]  # a message being stored: queue id, its future


class DeliveryBatcher:
    """The delivery batches of one event loop, stored by threads of its own.

    A pipeline (one thread) stores batch after batch while there is work: in each cycle it
    takes everything that became ready as the next batch, writes it, flushes the file system
    once (the new batch's data and the previous batch's directory entries), answers the
    previous batch, then publishes the new one; when nothing more comes, a last flush answers
    the last batch. So a busier server makes larger batches, and one flush per batch serves
    them all (with 16 busy sessions on a virtio disk, eight small batches at once cost about
    25 % more CPU per message than one at a time, and this pipeline delivered about 25 % more
    than a flush plus a folder fsync per batch, one batch after the other). The pending
    batch waits for the next one's writes :attr:`STALL_SECONDS` at most (checked between
    messages), and not at all for a next batch over :attr:`CARRY_BYTES`. Where entries are
    fsynced folder by folder (``delivery.sync = "file"``, an untrusted file system), a batch
    is answered as soon as it is published.

    Once the youngest running pipeline's cycle has run for :attr:`STALL_SECONDS` (a huge
    message, a slow disk), another pipeline may start beside it, up to :attr:`parallel` at
    once, one per thread, so a slow message holds up the others for that long only. A thread
    hands each batch's outcomes back with one ``call_soon_threadsafe``; it ends after
    :attr:`IDLE_SECONDS` without work.
    """

    IDLE_SECONDS = 30.0
    STALL_SECONDS = 0.05
    CARRY_BYTES = 1 << 20  # a next batch larger than this is written after the pending answer

    def __init__(self, loop: asyncio.AbstractEventLoop, parallel: int = 8):
        self._loop = loop
        self.parallel = parallel
        # Submitted by the loop, taken by the pipelines (deque operations are atomic).
        self._waiting: collections.deque[Entry] = collections.deque()
        self._scheduled = False  # a launch is due at the next turn of the loop
        self._recheck: asyncio.TimerHandle | None = None  # a launch due once a cycle stalls
        self._lock = threading.Lock()  # pipelines and threads coming and going
        self._cycles: dict[int, float] = {}  # running pipelines: start of their cycle
        self._numbers = itertools.count()
        self._starts: queue.SimpleQueue[int] = queue.SimpleQueue()  # pipelines to run
        self._threads = 0

    def submit(self, stager: Stager, queue_id: str, size: int = 0) -> asyncio.Future:
        """Store a message (of about *size* bytes) with the next batch: a future of the
        stager's result once the message is durable, of :data:`STORAGE_ERROR` if an ``OSError``
        failed it (logged with *queue_id*), or of any other exception it raised."""
        future = self._loop.create_future()
        self._waiting.append((stager, queue_id, future, size))
        if not self._scheduled:
            # Messages completed in this same turn of the loop join the batch too.
            self._scheduled = True
            self._loop.call_soon(self._launch)
        return future

    def _launch(self, recheck: bool = False) -> None:
        """Start a pipeline for the waiting messages unless a running one will take them."""
        if recheck:
            self._recheck = None
        else:
            self._scheduled = False
        with self._lock:
            if not self._waiting or len(self._cycles) >= self.parallel:
                return
            if self._cycles:  # another pipeline only once the youngest one has stalled
                wait = max(self._cycles.values()) + self.STALL_SECONDS - time.monotonic()
                if wait > 0:
                    if self._recheck is None:
                        self._recheck = self._loop.call_later(wait, self._launch, True)
                    return
            number = next(self._numbers)
            self._cycles[number] = time.monotonic()
            self._starts.put(number)
            if self._threads < len(self._cycles):  # busy threads < pipelines: start one
                self._threads += 1
                threading.Thread(target=self._serve, name="ingress-delivery",
                                 daemon=True).start()

    def _serve(self) -> None:
        """A thread: run pipelines as they are started."""
        while True:
            try:
                number = self._starts.get(timeout=self.IDLE_SECONDS)
            except queue.Empty:
                with self._lock:
                    if self._starts.empty():
                        self._threads -= 1
                        return
                continue
            try:
                self._pipeline(number)
            finally:  # normally a no-op; after a bug, the next submit starts a pipeline
                with self._lock:
                    self._cycles.pop(number, None)

    def _take(self) -> tuple[list[Stager], list[Waiter], int]:
        """Everything waiting whose session still waits: stagers, waiters, their bytes."""
        stagers: list[Stager] = []
        waiters: list[Waiter] = []
        size = 0
        while True:
            try:
                stager, queue_id, future, message_size = self._waiting.popleft()
            except IndexError:
                return stagers, waiters, size
            # A session that stopped waiting (hook timeout) has answered 451: storing its
            # message now would make a copy the client sends again.
            if not future.done():
                stagers.append(stager)
                waiters.append((queue_id, future))
                size += message_size

    def _pipeline(self, number: int) -> None:
        """Store batches until there is nothing more to take (see the class)."""
        # The batch published last whose entries await a flush, and when it was published.
        pending: tuple[list[Waiter], Group, float] | None = None

        def settle() -> None:
            """Make the pending batch's entries durable (unless done already); answer it."""
            nonlocal pending
            if pending is None:
                return
            waiters, group, _ = pending
            pending = None
            try:
                group.flush_entries()
            except BaseException as exc:  # Group hands errors back; this is a bug
                group.abandon(exc)
            self._answer(waiters, group.outcomes, group.files)

        def between() -> None:
            """While the next batch is written: the pending one waits that long at most."""
            if pending is not None and time.monotonic() - pending[2] > self.STALL_SECONDS:
                settle()

        while True:
            stagers, waiters, size = self._take()
            if not stagers and pending is None:
                with self._lock:
                    if not self._waiting:
                        del self._cycles[number]
                        return
                continue
            self._cycles[number] = time.monotonic()
            group = None
            try:
                if size > self.CARRY_BYTES:  # slow to write: answer the pending batch first
                    settle()
                if stagers:
                    group = Group(stagers, between)
                    # Let go of the transactions: once the loop hears of the outcome the
                    # session may go on, and what a transaction holds (a catch-all place) goes
                    # with it.
                    del stagers
                    group.flush_data()  # and with it, the pending batch's entries
                settle()
                if group is not None:
                    group.publish()
                    pending = (waiters, group, time.monotonic())
                    if not group.carried:  # its entries were fsynced folder by folder
                        settle()
            except BaseException as exc:  # Group hands errors back; this is a bug
                if group is not None and (pending is None or pending[1] is not group):
                    group.abandon(exc)
                    self._answer(waiters, group.outcomes)
                elif group is None and waiters:
                    self._answer(waiters, [exc] * len(waiters))
                settle()
            del group

    def _answer(self, waiters: list[Waiter], outcomes: list,
                files: Callable[[], list[list[str]]] | None = None) -> None:
        try:
            self._loop.call_soon_threadsafe(self._finish, waiters, outcomes, files)
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass

    def _finish(self, waiters: list[Waiter], outcomes: list,
                files: Callable[[], list[list[str]]] | None = None) -> None:
        """Resolve the futures; *files* gives each message's files, for those whose session
        stopped waiting."""
        unwanted: list[tuple[str, list[str]]] = []
        for i, ((queue_id, future), outcome) in enumerate(zip(waiters, outcomes, strict=True)):
            if future.done():
                # Its session stopped waiting while the message was stored (the hook timeout)
                # and answered 451: the client sends it again, so this copy goes, as if it
                # had never been written.
                if files is not None and not isinstance(outcome, BaseException):
                    paths = files()[i]
                    if paths:
                        unwanted.append((queue_id, paths))
                continue
            if isinstance(outcome, OSError):
                log.error("queue id %s: storage failed: %s", queue_id, outcome)
                future.set_result(STORAGE_ERROR)
            elif isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)
        if unwanted:
            try:
                self._loop.run_in_executor(None, withdraw, unwanted)
            except RuntimeError:  # the loop is ending (its executor shut down): do it here
                withdraw(unwanted)


def withdraw(unwanted: list[tuple[str, list[str]]]) -> None:
    """Remove messages stored for sessions that had stopped waiting (blocking)."""
    for queue_id, paths in unwanted:
        # A queue entry's .json (it marks it complete) first. What cannot be removed was
        # already moved (an IMAP server, a queue consumer) or removed.
        gone = remove_quietly(reversed(paths))
        if gone:
            log.warning("queue id %s: stored after its session stopped waiting (hook timeout); "
                        "%d of its %d files had already been taken, so the client's retry may "
                        "make a second copy", queue_id, gone, len(paths))
        else:
            log.warning("queue id %s: stored after its session stopped waiting (hook timeout); "
                        "removed, since the client was not told 250 and will retry", queue_id)


_batchers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, DeliveryBatcher] = (
    weakref.WeakKeyDictionary())


def for_loop() -> DeliveryBatcher:
    """The batcher of the running event loop (made on first use)."""
    loop = asyncio.get_running_loop()
    batcher = _batchers.get(loop)
    if batcher is None:
        for closed in [old for old in _batchers if old.is_closed()]:
            del _batchers[closed]  # a batcher holds its loop: the weak key alone never goes
        batcher = _batchers[loop] = DeliveryBatcher(loop)
    return batcher
