"""Removing what a crash left behind (contract: delivery guarantees). Private to the core.

At start, before serving (once, by the parent when there are worker processes): every file of
the spool and of the queue's ``tmp/``, and queue ``.eml`` files without their ``.json``; none of
them was acknowledged. Maildir ``tmp/`` files older than 36 hours: at start and then hourly, by
one process (the server, or worker 0), in a thread. Each removal is logged as one line with
counts.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import threading
from pathlib import Path

from ingress.delivery import maildir, queue

log = logging.getLogger("ingress.server")

MAILDIR_SWEEP_SECONDS = 3600.0  # Maildir tmp/ is swept at start and then this often


def remove_at_start(spool: Path, queue_root: Path) -> None:
    """Empty *spool* (made again, empty) and the queue's temporary and incomplete files."""
    spooled = 0
    if spool.exists():
        spooled = sum(1 for p in spool.rglob("*") if not p.is_dir())
        shutil.rmtree(spool, ignore_errors=True)
    spool.mkdir(parents=True, exist_ok=True)
    temporary, incomplete = queue.remove_leftovers(queue_root)
    if spooled or temporary or incomplete:
        log.info("removed crash leftovers: %d spool file(s), %d queue temporary file(s), "
                 "%d incomplete queue entr(ies)", spooled, temporary, incomplete)


async def in_own_thread(function, *args):
    """``function(*args)`` in a thread that ends with it: a thread of the loop's default executor
    would stay behind, idle, for every server (and every in-process test server)."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(result, error) -> None:
        if future.done():  # cancelled: the server is stopping
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def target() -> None:
        result, error = None, None
        try:
            result = function(*args)
        except Exception as exc:
            error = exc
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:  # the loop was closed meanwhile: nobody waits any more
            pass

    threading.Thread(target=target, name=getattr(function, "__name__", "worker"),
                     daemon=True).start()
    return await future


async def sweep_maildir(server) -> None:
    """Forever: remove Maildir ``tmp/`` files older than 36 hours, at once and then hourly.
    *server* is read each time, so that a reload's ``delivery.maildir`` is used."""
    while True:
        try:
            root = Path(server.config.data["delivery"]["maildir"])
            removed = await in_own_thread(maildir.sweep_tmp, root)
        except Exception:
            log.exception("Maildir tmp/ sweep failed")
        else:
            if removed:
                log.info("removed %d Maildir tmp/ file(s) older than 36 hours", removed)
        await asyncio.sleep(MAILDIR_SWEEP_SECONDS)
