"""Delivery batches: the messages of one event loop whose end of data is ready are stored
together, in one hop to a worker thread. Private to the core.

A batch writes each message's files and fsyncs their data one after the other, then fsyncs
each directory it touched once for all of them (:func:`ingress.delivery.maildir.commit_group`).
Each message's future is resolved only once its own files and directory entries are durable;
a message that fails gets a ``451`` and leaves nothing behind, without failing the others.

One batch runs at a time per loop, in a thread of its own: what becomes ready while it runs
waits for it to finish and then goes as the next batch. Under load that is what fills the
batches; when idle a message waits one turn of the loop at most.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import weakref
from collections.abc import Callable

from ingress.delivery import maildir
from ingress.reply import Reply

log = logging.getLogger("ingress.delivery")

STORAGE_ERROR = Reply(451, "4.3.0", "Local storage error, try again later")

# A stager writes one message's files (data fsynced) and returns (result, files, folders).
Stager = Callable[[], "tuple[object, list[str], list[str]]"]


class DeliveryBatcher:
    """The delivery batches of one event loop, stored by a thread of its own.

    The thread takes a batch from a queue and hands the outcomes back with one
    ``call_soon_threadsafe``: cheaper than an executor's future per batch. It ends after
    :data:`IDLE_SECONDS` without work and is started again when needed.
    """

    IDLE_SECONDS = 30.0

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._waiting: list[tuple[Stager, str, asyncio.Future]] = []
        self._running = False  # a batch is with the thread
        self._sent: list[tuple[Stager, str, asyncio.Future]] = []  # that batch
        self._scheduled = False  # a launch is due at the next turn of the loop
        self._batches: queue.SimpleQueue[list[Stager]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._thread_lock = threading.Lock()  # the thread's coming and going

    def submit(self, stager: Stager, queue_id: str) -> asyncio.Future:
        """Store a message with the next batch: a future of the stager's result once the
        message is durable, of :data:`STORAGE_ERROR` if an ``OSError`` failed it (logged with
        *queue_id*), or of any other exception it raised."""
        future = self._loop.create_future()
        self._waiting.append((stager, queue_id, future))
        if not self._running and not self._scheduled:
            # Messages completed in this same turn of the loop join the batch too.
            self._scheduled = True
            self._loop.call_soon(self._launch)
        return future

    def _launch(self) -> None:
        self._scheduled = False
        if self._running or not self._waiting:
            return
        self._running = True
        self._sent = self._waiting
        self._waiting = []
        with self._thread_lock:
            self._batches.put([stager for stager, _, _ in self._sent])
            if self._thread is None:
                self._thread = threading.Thread(target=self._store, name="ingress-delivery",
                                                daemon=True)
                self._thread.start()

    def _store(self) -> None:
        """The thread: store each batch, hand its outcomes to the loop."""
        while True:
            try:
                stagers = self._batches.get(timeout=self.IDLE_SECONDS)
            except queue.Empty:
                with self._thread_lock:
                    if self._batches.empty():
                        self._thread = None
                        return
                continue
            try:
                outcomes: list = maildir.commit_group(stagers)
            except BaseException as exc:  # commit_group hands errors back; this is a bug
                outcomes = [exc] * len(stagers)
            try:
                self._loop.call_soon_threadsafe(self._finish, outcomes)
            except RuntimeError:  # the loop is closed: nobody waits any more
                pass

    def _finish(self, outcomes: list) -> None:
        batch, self._sent = self._sent, []
        self._running = False
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
        batcher = _batchers[loop] = DeliveryBatcher(loop)
    return batcher
