"""Maildir writing (blocking; called from a worker thread). Private to the core."""

from __future__ import annotations

import itertools
import os
import re
import time
from pathlib import Path

_counter = itertools.count(1)
_created: set[Path] = set()  # mailboxes known to exist with tmp/new/cur


def fold_safe(value: str) -> str:
    """A header value that cannot start a new header line: CR/LF only as folding."""
    value = re.sub(r"\r\n|\r|\n", "\r\n", value)
    return re.sub(r"\r\n(?![ \t])", "\r\n ", value)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_maildir(box: Path) -> None:
    if box in _created:
        return
    missing = [p for p in (box, *box.parents) if not p.exists()]
    for sub in ("tmp", "new", "cur"):
        (box / sub).mkdir(parents=True, exist_ok=True)
    # New directories must survive a crash too: fsync each created one's parent.
    for p in [box / "tmp", box / "new", box / "cur", *missing]:
        fsync_dir(p.parent)
    _created.add(box)


def unique_name(hostname: str) -> str:
    now = time.time_ns()
    host = hostname.replace("/", "\\057").replace(":", "\\072")
    return f"{now // 10**9}.M{(now // 1000) % 10**6}P{os.getpid()}Q{next(_counter)}.{host}"


def write_file(path: Path, header: bytes, message) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb", closefd=False) as f:
            f.write(header)
            data = message.getvalue()
            if data is not None:
                f.write(data)
            else:
                for chunk in message.chunks(1 << 20):
                    f.write(chunk)
            f.flush()
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_quietly(paths) -> None:
    for p in paths:
        try:
            os.unlink(p)
        except OSError:
            pass


def deliver(root: Path, mailboxes: list[tuple[str, str]], header: bytes, message,
            hostname: str) -> list[str]:
    """Write one copy and link it into every mailbox's ``new/``; return the final paths."""
    boxes = [root / domain / local for domain, local in mailboxes]
    for box in boxes:
        ensure_maildir(box)
    name = unique_name(hostname)
    tmp = boxes[0] / "tmp" / name
    finals: list[str] = []
    try:
        write_file(tmp, header, message)
        for box in boxes:
            final = box / "new" / name
            os.link(tmp, final)
            finals.append(str(final))
        for box in boxes:
            fsync_dir(box / "new")
    except BaseException:
        remove_quietly(finals)
        raise
    finally:
        remove_quietly([tmp])
    return finals
