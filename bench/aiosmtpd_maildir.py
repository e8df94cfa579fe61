"""The "before" server of bench/streaming.py: a bare aiosmtpd handler that holds each message in
memory, as aiosmtpd does, and writes it to a Maildir with the same durability steps as ingress
(Return-Path, write to tmp/, fsync, link into new/, fsync new/, in a worker thread).

    python bench/aiosmtpd_maildir.py MAILDIR    # prints "listening on 127.0.0.1:<port>"
"""

from __future__ import annotations

import asyncio
import itertools
import os
import sys
from pathlib import Path

from aiosmtpd.smtp import SMTP

_counter = itertools.count(1)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def store(root: Path, mail_from: str, rcpts: list[str], content: bytes) -> None:
    name = f"{os.getpid()}.{next(_counter)}.bench"
    boxes = []
    for rcpt in rcpts:
        local, _, domain = rcpt.rpartition("@")
        box = root / domain.lower() / local.lower()
        for sub in ("tmp", "new", "cur"):
            (box / sub).mkdir(parents=True, exist_ok=True)
        boxes.append(box)
    tmp = boxes[0] / "tmp" / name
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, f"Return-Path: <{mail_from}>\r\n".encode())
        view = memoryview(content)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    for box in boxes:
        os.link(tmp, box / "new" / name)
    for box in boxes:
        fsync_dir(box / "new")
    os.unlink(tmp)


class Handler:
    def __init__(self, root: Path):
        self.root = root

    async def handle_DATA(self, server, session, envelope):
        await asyncio.to_thread(store, self.root, envelope.mail_from, envelope.rcpt_tos,
                                envelope.original_content)
        return "250 2.0.0 OK"


async def main(root: Path) -> None:
    loop = asyncio.get_running_loop()
    handler = Handler(root)
    server = await loop.create_server(
        lambda: SMTP(handler, data_size_limit=None, hostname="bench.test", loop=loop),
        "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    print(f"listening on 127.0.0.1:{port}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    try:
        asyncio.run(main(Path(sys.argv[1])))
    except KeyboardInterrupt:
        pass
