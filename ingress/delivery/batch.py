"""Delivery batches: the messages of one event loop whose end of data is ready are stored
together, in one hop to a worker thread. Private to the core.

A batch writes each message's files, makes their data durable (one flush per file system for
all of them), publishes them into place, then fsyncs each directory it touched once for all of
them (:func:`ingress.delivery.maildir.commit_group`).
Each message's future is resolved only once its own files and directory entries are durable;
a message that fails gets a ``451`` and leaves nothing behind, without failing the others
(except that a failed flush of a file system fails every message it may have carried).

One batch runs at a time, in a thread, unless it stalls (see :class:`DeliveryBatcher`); what
becomes ready meanwhile goes as the next batch. Under load that is what fills the batches;
when idle a message waits one turn of the loop at most.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import weakref
from collections.abc import Callable

from ingress.delivery.maildir import Commit, commit_group
from ingress.reply import Reply

log = logging.getLogger("ingress.delivery")

STORAGE_ERROR = Reply(451, "4.3.0", "Local storage error, try again later")

# A stager writes one message's files through the batch's Commit and returns
# (result, final paths, folders).
Stager = Callable[[Commit], "tuple[object, list[str], list[str]]"]
Entry = tuple[Stager, str, asyncio.Future]  # a message: stager, queue id, its future


class DeliveryBatcher:
    """The delivery batches of one event loop, stored by threads of its own.

    One batch runs at a time while it is quick: what becomes ready meanwhile waits and then
    goes together, so a busier server makes larger batches, and one flush of the file system
    and one fsync per folder serve them all (with 16 busy sessions on a virtio disk, this cost
    about 25 % less CPU per message than eight small batches at once, and delivered more).
    Once the youngest running batch has run for :attr:`STALL_SECONDS` (a huge message, a slow
    disk), another may start beside it, up to :attr:`parallel` at once, one per thread, so a
    slow message holds up the others for that long only. A thread takes its batch from a
    queue and hands the outcomes back with one ``call_soon_threadsafe``; it ends after
    :attr:`IDLE_SECONDS` without work.
    """

    IDLE_SECONDS = 30.0
    STALL_SECONDS = 0.05

    def __init__(self, loop: asyncio.AbstractEventLoop, parallel: int = 8):
        self._loop = loop
        self.parallel = parallel
        self._waiting: list[Entry] = []
        self._running = 0  # batches handed to the threads and not finished yet
        self._scheduled = False  # a launch is due at the next turn of the loop
        # The threads get a batch's number and stagers; its entries stay with the loop.
        self._batches: queue.SimpleQueue[tuple[int, list[Stager]]] = queue.SimpleQueue()
        self._in_flight: dict[int, list[Entry]] = {}
        self._started: dict[int, float] = {}  # running batches' start times (loop clock)
        self._numbers = itertools.count()
        self._threads = 0
        self._threads_lock = threading.Lock()  # the threads' coming and going

    def submit(self, stager: Stager, queue_id: str) -> asyncio.Future:
        """Store a message with the next batch: a future of the stager's result once the
        message is durable, of :data:`STORAGE_ERROR` if an ``OSError`` failed it (logged with
        *queue_id*), or of any other exception it raised."""
        future = self._loop.create_future()
        self._waiting.append((stager, queue_id, future))
        if self._running < self.parallel and not self._scheduled:
            # Messages completed in this same turn of the loop join the batch too.
            self._scheduled = True
            self._loop.call_soon(self._launch)
        return future

    def _launch(self) -> None:
        self._scheduled = False
        if self._running >= self.parallel or not self._waiting:
            return
        if self._running:  # another batch only once the youngest running one has stalled
            due = max(self._started.values()) + self.STALL_SECONDS
            if self._loop.time() < due:
                self._scheduled = True
                self._loop.call_at(due, self._launch)
                return
        # A session that stopped waiting (hook timeout) has answered 451: storing its message
        # now would make a copy the client sends again.
        batch = [entry for entry in self._waiting if not entry[2].done()]
        self._waiting = []
        if not batch:
            return
        self._running += 1
        number = next(self._numbers)
        self._in_flight[number] = batch
        self._started[number] = self._loop.time()
        with self._threads_lock:
            self._batches.put((number, [stager for stager, _, _ in batch]))
            if self._threads < self._running:  # busy threads < running: one is free or coming
                self._threads += 1
                threading.Thread(target=self._store, name="ingress-delivery",
                                 daemon=True).start()

    def _store(self) -> None:
        """A thread: store batches, hand each one's outcomes to the loop."""
        while True:
            try:
                number, stagers = self._batches.get(timeout=self.IDLE_SECONDS)
            except queue.Empty:
                with self._threads_lock:
                    if self._batches.empty():
                        self._threads -= 1
                        return
                continue
            try:
                outcomes: list = commit_group(stagers)
            except BaseException as exc:  # commit_group hands errors back; this is a bug
                outcomes = [exc] * len(stagers)
            # Let go of the transactions before the loop hears of the outcome: the session may
            # go on at once, and what a transaction holds (a catch-all place) goes with it.
            del stagers
            try:
                self._loop.call_soon_threadsafe(self._finish, number, outcomes)
            except RuntimeError:  # the loop is closed: nobody waits any more
                pass
            del outcomes

    def _finish(self, number: int, outcomes: list) -> None:
        self._running -= 1
        batch = self._in_flight.pop(number)
        del self._started[number]
        for (_, queue_id, future), outcome in zip(batch, outcomes, strict=True):
            if future.done():  # its session stopped waiting (hook timeout, shutdown)
                continue
            if isinstance(outcome, OSError):
                log.error("queue id %s: storage failed: %s", queue_id, outcome)
                future.set_result(STORAGE_ERROR)
            elif isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)
        if self._waiting:
            self._launch()


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
