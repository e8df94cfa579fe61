"""The baseline: a bare aiosmtpd server whose handler stores mail the way ingress does.

    python bench/baseline.py --listen 127.0.0.1:0 --maildir DIR --domain bench.test --users 4

What a user would write instead of ingress: aiosmtpd's own ``SMTP`` protocol with a small handler
that accepts ``user0..user<N-1>@domain`` at RCPT and, at the end of DATA, writes the message into
``<maildir>/<domain>/<user>/tmp`` with ``Return-Path:`` first, fsyncs it, links it into ``new/``,
fsyncs ``new/`` and answers 250, the blocking part in a worker thread. Same event loop as ingress
(uvloop when installed). Prints ``baseline: listening on HOST:PORT`` when ready; SIGTERM stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import signal
import sys
import time
from pathlib import Path

import common
from aiosmtpd.smtp import SMTP

_counter = itertools.count(1)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def store(root: Path, mail_from: str, recipients: list[str], content: bytes) -> None:
    boxes = []
    for rcpt in recipients:
        local, _, domain = rcpt.rpartition("@")
        box = root / domain.lower() / local.lower()
        if not (box / "new").is_dir():
            for sub in ("tmp", "new", "cur"):
                (box / sub).mkdir(parents=True, exist_ok=True)
        boxes.append(box)
    now = time.time_ns()
    name = f"{now // 10**9}.M{now // 1000 % 10**6}P{os.getpid()}Q{next(_counter)}.bench.test"
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
    try:
        for box in boxes:
            os.link(tmp, box / "new" / name)
        for box in boxes:
            fsync_dir(box / "new")
    finally:
        os.unlink(tmp)


class MaildirHandler:
    def __init__(self, root: Path, users: set[str]):
        self.root = root
        self.users = users

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address.lower() not in self.users:
            return "550 5.1.1 Mailbox unavailable"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        try:
            await asyncio.to_thread(store, self.root, envelope.mail_from, envelope.rcpt_tos,
                                    envelope.original_content)
        except OSError:
            return "451 4.3.0 Local storage error"
        return "250 2.0.0 OK"


async def serve(args) -> None:
    host, _, port = args.listen.rpartition(":")
    users = {f"user{i}@{args.domain}" for i in range(args.users)}
    handler = MaildirHandler(Path(args.maildir), users)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(handler, hostname="bench.test", data_size_limit=args.data_size_limit),
        host, int(port), backlog=1024)
    addr = server.sockets[0].getsockname()
    print(f"baseline: listening on {addr[0]}:{addr[1]}", flush=True)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()
    server.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--listen", default="127.0.0.1:0")
    p.add_argument("--maildir", required=True)
    p.add_argument("--domain", default="bench.test")
    p.add_argument("--users", type=int, default=4)
    p.add_argument("--data-size-limit", type=int, default=None,
                   help="bytes; default: no limit (aiosmtpd keeps the whole message in memory)")
    p.add_argument("--no-uvloop", action="store_true")
    args = p.parse_args(argv)
    common.run(serve(args), uvloop=not args.no_uvloop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
